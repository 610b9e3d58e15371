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
	defer l.Close() // one job per cryo run
	for {
		c, err := o.accept(ctx, e, l, key)
		if err != nil {
			return nil, nil, err
		}
		fmt.Fprintf(e.stderr, "cryo: receiving a job from %s (or its checkpoints, as its standby)\n", c.Remote())
		in, err := migrate.Receive(ctx, c, migrate.ReceiveOptions{Store: cfg.Store, WorkDir: cfg.WorkDir, Logger: cfg.Logger})
		if err != nil {
			c.Close()
			return nil, nil, fmt.Errorf("receive the job from %s: %w", c.Remote(), err)
		}
		if in.Standby && in.Ended == "migrating" {
			// The source moves the job here now, on a new connection, with
			// what this store holds as its starting point.
			c.Close()
			fmt.Fprintf(e.stderr, "cryo: holding generation %d; the job migrates here next\n", in.Generation)
			continue
		}
		if !in.Standby {
			fmt.Fprintf(e.stderr, "cryo: received the job after %d pre-copy rounds\n", in.Rounds)
		}
		return in, func() { c.Close(); in.Close() }, nil
	}
}

// accept waits for a connection that proves the key; others are refused
// and waited past.
func (o *runOpts) accept(ctx context.Context, e *env, l net.Listener, key []byte) (*wire.Conn, error) {
	var c *wire.Conn
	for c == nil {
		nc, err := l.Accept()
		if err != nil {
			return nil, fmt.Errorf("--receive: %w", err)
		}
		hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		c, err = wire.Handshake(hctx, nc, key)
		cancel()
		if err != nil {
			fmt.Fprintf(e.stderr, "cryo: refused a connection from %s: %v\n", nc.RemoteAddr(), err)
			c = nil
			if !errors.Is(err, wire.ErrAuth) && ctx.Err() != nil {
				return nil, ctx.Err()
			}
		}
	}
	return c, nil
}

// relayable is an output file of a migrated job to relay: not a device.
func relayable(p string) string {
	if p == "" || strings.HasPrefix(p, "/dev/") || strings.HasPrefix(p, "/proc/") {
		return ""
	}
	return p
}
