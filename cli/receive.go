package cli

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/cryo-hpc/cryo/internal/wire"
	"github.com/cryo-hpc/cryo/migrate"
	"github.com/cryo-hpc/cryo/monitor"
)

// receiveJob waits on --receive for one authenticated source and takes
// its job up to a generation committed in cfg.Store. Connections that do
// not prove the key are refused and waited past. stop closes the
// connection, once the supervisor is done with it.
func (o *runOpts) receiveJob(ctx context.Context, e *env, cfg monitor.Config) (*migrate.Incoming, func(), error) {
	key, err := wire.LoadKey(o.key)
	if err != nil {
		return nil, nil, err
	}
	l, err := net.Listen("tcp", o.receive)
	if err != nil {
		return nil, nil, fmt.Errorf("--receive: %w", err)
	}
	fmt.Fprintf(e.stderr, "cryo: waiting for a job on %s\n", l.Addr())
	var c *wire.Conn
	for c == nil {
		nc, err := l.Accept()
		if err != nil {
			l.Close()
			return nil, nil, fmt.Errorf("--receive: %w", err)
		}
		hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		c, err = wire.Handshake(hctx, nc, key)
		cancel()
		if err != nil {
			fmt.Fprintf(e.stderr, "cryo: refused a connection from %s: %v\n", nc.RemoteAddr(), err)
			c = nil
			if !errors.Is(err, wire.ErrAuth) && ctx.Err() != nil {
				l.Close()
				return nil, nil, ctx.Err()
			}
		}
	}
	l.Close() // one job per cryo run
	fmt.Fprintf(e.stderr, "cryo: receiving a job from %s\n", c.Remote())
	in, err := migrate.Receive(ctx, c, migrate.ReceiveOptions{Store: cfg.Store, WorkDir: cfg.WorkDir, Logger: cfg.Logger})
	if err != nil {
		c.Close()
		return nil, nil, fmt.Errorf("receive the job from %s: %w", c.Remote(), err)
	}
	fmt.Fprintf(e.stderr, "cryo: received the job after %d pre-copy rounds\n", in.Rounds)
	return in, func() { c.Close(); in.Close() }, nil
}

// relayable is an output file of a migrated job to relay: not a device.
func relayable(p string) string {
	if p == "" || strings.HasPrefix(p, "/dev/") || strings.HasPrefix(p, "/proc/") {
		return ""
	}
	return p
}
