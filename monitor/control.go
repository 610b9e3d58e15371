package monitor

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"github.com/cryo-hpc/cryo/migrate"
	"golang.org/x/sys/unix"
)

// Request is one line a client sends to the control socket.
type Request struct {
	Op  string `json:"op"`            // status, list, checkpoint, stop, swap-out, swap-in, migrate
	Job string `json:"job,omitempty"` // the job's name; may be omitted
	// Migrate is the migration asked for, with Op "migrate".
	Migrate *MigrateRequest `json:"migrate,omitempty"`
}

// Response is the line the control socket answers with.
type Response struct {
	OK         bool     `json:"ok"`
	Error      string   `json:"error,omitempty"`
	Jobs       []Status `json:"jobs,omitempty"`
	Generation int      `json:"generation,omitempty"`
	// Migration says how a migration went (also when it failed and the
	// job continues here).
	Migration *migrate.Result `json:"migration,omitempty"`
	// RolledBack: the migration failed and the job runs on here.
	RolledBack bool `json:"rolled_back,omitempty"`
}

// ServeControl answers control requests for the job s supervises on a unix
// socket at path until ctx ends. The socket is 0600, and each peer is
// checked by SO_PEERCRED besides: only the user running the supervisor and
// root may use it.
func ServeControl(ctx context.Context, path string, s *Supervisor, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := removeSocket(path); err != nil {
		return fmt.Errorf("control socket %s: %w", path, err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	// Connecting needs write permission on the socket, which the umask
	// never gives others; 0600 takes it from the group too.
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return fmt.Errorf("control socket: %w", err)
	}
	go func() { <-ctx.Done(); l.Close() }()
	owner := os.Getuid()
	// A request that ended supervision (stop, migrate) is answered before
	// the socket goes: its client waits for that answer.
	var conns sync.WaitGroup
	defer func() {
		done := make(chan struct{})
		go func() { conns.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
		}
	}()
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				_ = removeSocket(path)
				return nil
			}
			return err
		}
		conns.Add(1)
		go func() {
			defer conns.Done()
			serveConn(ctx, c.(*net.UnixConn), s, owner, log)
		}()
	}
}

// removeSocket removes a stale socket at path, and nothing else.
func removeSocket(path string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if st.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%s exists and is not a socket", path)
	}
	return os.Remove(path)
}

func peerCred(c *net.UnixConn) (*unix.Ucred, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	return cred, cerr
}

func serveConn(ctx context.Context, c *net.UnixConn, s *Supervisor, owner int, log *slog.Logger) {
	defer c.Close()
	enc := json.NewEncoder(c)
	cred, err := peerCred(c)
	if err != nil {
		enc.Encode(Response{Error: "cannot identify peer: " + err.Error()})
		return
	}
	if uid := int(cred.Uid); uid != 0 && uid != owner {
		enc.Encode(Response{Error: fmt.Sprintf("the job belongs to uid %d, not %d", owner, uid)})
		return
	}
	sc := bufio.NewScanner(c)
	for sc.Scan() {
		var req Request
		if err := json.Unmarshal(sc.Bytes(), &req); err != nil {
			enc.Encode(Response{Error: "bad request: " + err.Error()})
			continue
		}
		log.Debug("control", "op", req.Op, "uid", cred.Uid)
		enc.Encode(answer(ctx, s, req))
	}
}

func answer(ctx context.Context, s *Supervisor, req Request) Response {
	if req.Job != "" && req.Job != s.cfg.Name {
		return Response{Error: fmt.Sprintf("no job %q here (this is %q)", req.Job, s.cfg.Name)}
	}
	switch req.Op {
	case "status", "list":
		return Response{OK: true, Jobs: []Status{s.Status()}}
	case "checkpoint", "stop", "swap-out", "swap-in":
		ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
		defer cancel()
		res, err := s.Request(ctx, req.Op)
		if err != nil {
			return Response{Error: err.Error()}
		}
		out := Response{OK: true, Jobs: []Status{s.Status()}}
		if res != nil {
			out.Generation = res.Generation
		}
		return out
	case "migrate":
		if req.Migrate == nil {
			return Response{Error: "migrate: no destination given"}
		}
		ctx, cancel := context.WithTimeout(ctx, 2*time.Hour)
		defer cancel()
		res, err := s.Migrate(ctx, *req.Migrate)
		if err != nil {
			return Response{Error: err.Error(), Migration: res, RolledBack: errors.Is(err, migrate.ErrRolledBack)}
		}
		return Response{OK: true, Jobs: []Status{s.Status()}, Migration: res}
	}
	return Response{Error: fmt.Sprintf("unknown op %q (status, checkpoint, stop, swap-out, swap-in, migrate)", req.Op)}
}

// Call sends one request to a control socket and returns the answer.
func Call(ctx context.Context, path string, req Request) (*Response, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	if err := json.NewEncoder(c).Encode(req); err != nil {
		return nil, err
	}
	var resp Response
	if err := json.NewDecoder(bufio.NewReader(c)).Decode(&resp); err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	if !resp.OK {
		return &resp, errors.New(resp.Error)
	}
	return &resp, nil
}
