package criu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

// Notify receives CRIU's notifications during a dump or restore. A non-nil
// error aborts the operation. Unknown scripts are acknowledged.
type Notify func(script string, pid int32) error

// swrk runs one request against a fresh `criu swrk` child. We start CRIU
// ourselves rather than through go-criu's Criu type because go-criu v7 does
// not pass inherited fds to the child, cannot be cancelled, and discards
// CRIU's stderr; the RPC message types are go-criu's.
//
// extra files appear in CRIU as fds 4, 5, ... (fd 3 is the RPC socket).
// When setsid is set, CRIU runs in a new session, so that a tree it restores
// detached does not belong to the caller's terminal.
func swrk(ctx context.Context, bin string, req *rpc.CriuReq, extra []*os.File, setsid bool, nfy Notify) (*rpc.CriuResp, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("criu rpc socketpair: %w", err)
	}
	cln := os.NewFile(uintptr(fds[0]), "criu-rpc-client")
	srv := os.NewFile(uintptr(fds[1]), "criu-rpc-server")
	defer cln.Close()

	cmd := exec.Command(bin, "swrk", "3")
	cmd.ExtraFiles = append([]*os.File{srv}, extra...)
	var stderr limitedBuffer
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: setsid}
	if err := cmd.Start(); err != nil {
		srv.Close()
		return nil, fmt.Errorf("start %s swrk: %w", bin, err)
	}
	srv.Close()

	// Cancellation: CRIU is asked to stop with SIGTERM (it unwinds and thaws
	// the tree), and killed only if it does not within 10 s.
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-done:
		case <-ctx.Done():
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				_ = cmd.Process.Kill()
			}
		}
	}()

	resp, rerr := converse(cln, req, nfy)
	cln.Close()
	werr := cmd.Wait()
	if rerr != nil {
		if ctx.Err() != nil {
			rerr = fmt.Errorf("%w (%v)", ctx.Err(), rerr)
		}
		if werr != nil {
			rerr = fmt.Errorf("%w; criu swrk: %v", rerr, werr)
		}
		if s := stderr.String(); s != "" {
			rerr = fmt.Errorf("%w; criu stderr: %s", rerr, lastLines(s, 3))
		}
		return resp, rerr
	}
	return resp, nil
}

func converse(sk *os.File, req *rpc.CriuReq, nfy Notify) (*rpc.CriuResp, error) {
	buf := make([]byte, 64<<10)
	for {
		b, err := proto.Marshal(req)
		if err != nil {
			return nil, err
		}
		if _, err := sk.Write(b); err != nil {
			return nil, fmt.Errorf("criu rpc write: %w", err)
		}
		n, err := sk.Read(buf)
		if err != nil {
			return nil, fmt.Errorf("criu rpc read (criu exited?): %w", err)
		}
		resp := &rpc.CriuResp{}
		if err := proto.Unmarshal(buf[:n], resp); err != nil {
			return nil, fmt.Errorf("criu rpc decode: %w", err)
		}
		if !resp.GetSuccess() {
			msg := resp.GetCrErrmsg()
			if msg == "" {
				msg = "no message"
			}
			return resp, fmt.Errorf("criu %s failed: %s (errno %d)", req.GetType(), msg, resp.GetCrErrno())
		}
		if resp.GetType() != rpc.CriuReqType_NOTIFY {
			return resp, nil
		}
		var nerr error
		if nfy != nil {
			nerr = nfy(resp.GetNotify().GetScript(), resp.GetNotify().GetPid())
		}
		t := rpc.CriuReqType_NOTIFY
		req = &rpc.CriuReq{Type: &t, NotifySuccess: proto.Bool(nerr == nil)}
		if nerr != nil {
			// Tell CRIU, let it unwind, and report our reason.
			b, _ := proto.Marshal(req)
			_, _ = sk.Write(b)
			_, _ = sk.Read(buf)
			return nil, fmt.Errorf("%s hook: %w", resp.GetNotify().GetScript(), nerr)
		}
	}
}

// limitedBuffer keeps the last 16 KiB written to it.
type limitedBuffer struct{ b []byte }

func (l *limitedBuffer) Write(p []byte) (int, error) {
	l.b = append(l.b, p...)
	if len(l.b) > 16<<10 {
		l.b = l.b[len(l.b)-16<<10:]
	}
	return len(p), nil
}

func (l *limitedBuffer) String() string { return string(l.b) }

// Version asks CRIU for its version over RPC (used by tests to check that the
// RPC path works with the binary found).
func Version(ctx context.Context, bin string) (int, error) {
	t := rpc.CriuReqType_VERSION
	resp, err := swrk(ctx, bin, &rpc.CriuReq{Type: &t}, nil, false, nil)
	if err != nil {
		return 0, err
	}
	v := resp.GetVersion()
	if v == nil {
		return 0, errors.New("criu version: empty answer")
	}
	return int(v.GetMajorNumber())*10000 + int(v.GetMinorNumber())*100 + int(v.GetSublevel()), nil
}
