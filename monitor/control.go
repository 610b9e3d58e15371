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
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Request is one line a client sends to the control socket.
type Request struct {
	Op  string `json:"op"`            // status, list, checkpoint, stop, swap-out, swap-in, run
	Job string `json:"job,omitempty"` // job name; may be omitted when there is one job
	// Run is the job to start, for op "run" (node daemons only).
	Run *JobSpec `json:"run,omitempty"`
}

// JobSpec is a job submitted to a node daemon (`cryo monitor`). Its trees
// run as the submitting user.
type JobSpec struct {
	Store       string        `json:"store"`
	Trees       []TreeSpec    `json:"trees"`
	Interval    time.Duration `json:"interval,omitempty"`
	MaxRestarts int           `json:"max_restarts"`
	Keep        int           `json:"keep,omitempty"`
	Fresh       bool          `json:"fresh,omitempty"`
}

// Response is the line the control socket answers with.
type Response struct {
	OK         bool     `json:"ok"`
	Error      string   `json:"error,omitempty"`
	Jobs       []Status `json:"jobs,omitempty"`
	Generation int      `json:"generation,omitempty"`
}

// Registry is the set of jobs a control socket serves.
type Registry struct {
	mu   sync.Mutex
	jobs map[string]*Supervisor
	uids map[string]int // job -> owner uid
	// Submit starts a job for op "run" on behalf of uid/gid; nil refuses
	// submissions (a single-job `cryo run`).
	Submit func(name string, spec JobSpec, uid, gid int) error
}

// Add registers a job owned by uid.
func (r *Registry) Add(s *Supervisor, uid int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.jobs == nil {
		r.jobs, r.uids = map[string]*Supervisor{}, map[string]int{}
	}
	r.jobs[s.cfg.Name] = s
	r.uids[s.cfg.Name] = uid
}

// Remove forgets a job.
func (r *Registry) Remove(name string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.jobs, name)
	delete(r.uids, name)
}

func (r *Registry) pick(name string, uid int) (*Supervisor, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if name == "" {
		if len(r.jobs) != 1 {
			return nil, fmt.Errorf("%d jobs here: name one", len(r.jobs))
		}
		for n := range r.jobs {
			name = n
		}
	}
	s, ok := r.jobs[name]
	if !ok {
		return nil, fmt.Errorf("no job %q", name)
	}
	if uid != 0 && r.uids[name] != uid {
		return nil, fmt.Errorf("job %q belongs to uid %d, not %d", name, r.uids[name], uid)
	}
	return s, nil
}

// Serve answers control requests on a unix socket at path until ctx ends.
// Only root and a job's owner may act on it (checked with SO_PEERCRED).
func (r *Registry) Serve(ctx context.Context, path string, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	_ = os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	// Anyone may connect; what they may do is decided per request by uid.
	_ = os.Chmod(path, 0o666)
	go func() { <-ctx.Done(); l.Close() }()
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				os.Remove(path)
				return nil
			}
			return err
		}
		go r.serveConn(ctx, c.(*net.UnixConn), log)
	}
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

func (r *Registry) serveConn(ctx context.Context, c *net.UnixConn, log *slog.Logger) {
	defer c.Close()
	cred, err := peerCred(c)
	enc := json.NewEncoder(c)
	if err != nil {
		enc.Encode(Response{Error: "cannot identify peer: " + err.Error()})
		return
	}
	uid, gid := int(cred.Uid), int(cred.Gid)
	sc := bufio.NewScanner(c)
	for sc.Scan() {
		var req Request
		if err := json.Unmarshal(sc.Bytes(), &req); err != nil {
			enc.Encode(Response{Error: "bad request: " + err.Error()})
			continue
		}
		log.Debug("control", "op", req.Op, "job", req.Job, "uid", uid)
		enc.Encode(r.answer(ctx, req, uid, gid))
	}
}

func (r *Registry) answer(ctx context.Context, req Request, uid, gid int) Response {
	switch req.Op {
	case "run":
		if r.Submit == nil {
			return Response{Error: "this cryo supervises one job; submit jobs to a node daemon (cryo monitor)"}
		}
		if req.Run == nil || req.Job == "" {
			return Response{Error: "run needs a job name and a job spec"}
		}
		r.mu.Lock()
		_, exists := r.jobs[req.Job]
		r.mu.Unlock()
		if exists {
			return Response{Error: fmt.Sprintf("job %q exists", req.Job)}
		}
		if err := r.Submit(req.Job, *req.Run, uid, gid); err != nil {
			return Response{Error: err.Error()}
		}
		return Response{OK: true}
	case "list":
		r.mu.Lock()
		var out []Status
		for name, s := range r.jobs {
			if uid == 0 || r.uids[name] == uid {
				out = append(out, s.Status())
			}
		}
		r.mu.Unlock()
		sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
		return Response{OK: true, Jobs: out}
	case "status":
		s, err := r.pick(req.Job, uid)
		if err != nil {
			return Response{Error: err.Error()}
		}
		return Response{OK: true, Jobs: []Status{s.Status()}}
	case "checkpoint", "stop", "swap-out", "swap-in":
		s, err := r.pick(req.Job, uid)
		if err != nil {
			return Response{Error: err.Error()}
		}
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
	}
	return Response{Error: fmt.Sprintf("unknown op %q (status, list, checkpoint, stop, swap-out, swap-in)", req.Op)}
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
