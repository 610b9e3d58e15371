package monitor

import (
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// TreeSpec is one process tree of a job.
type TreeSpec struct {
	Name   string   `json:"name"` // "host", "offload-1", ...
	Argv   []string `json:"argv"`
	Dir    string   `json:"dir,omitempty"`
	Env    []string `json:"env,omitempty"`
	Stdout string   `json:"stdout"` // appended to (O_APPEND: a job's log may grow after a checkpoint)
	Stderr string   `json:"stderr"`
	Host   bool     `json:"host,omitempty"` // the job ends when the host tree ends
	// UID and GID the tree runs as, when job-init runs as root for another
	// user (a node daemon's job); 0 keeps job-init's own.
	UID int `json:"uid,omitempty"`
	GID int `json:"gid,omitempty"`
}

// InitSpec is what job-init is told to run.
type InitSpec struct {
	Trees  []TreeSpec    `json:"trees"`
	Events string        `json:"events"` // file job-init appends its events to
	Grace  time.Duration `json:"grace"`  // SIGTERM -> SIGKILL for the other trees when the host ends
}

// InitEvent is one line of job-init's events file.
type InitEvent struct {
	Time   time.Time `json:"time"`
	Event  string    `json:"event"` // "started", "exited", "start-failed"
	Tree   string    `json:"tree"`
	PID    int       `json:"pid,omitempty"`
	Code   int       `json:"code"`             // exit code, or 128+signal
	Signal string    `json:"signal,omitempty"` // when killed by a signal
	Error  string    `json:"error,omitempty"`
}

// InitEnv names the environment variable that carries the InitSpec.
const InitEnv = "CRYO_INIT_SPEC"

// RunInit is job-init: it starts every tree of spec in a session of its
// own, reaps everything below it, records each tree's start and exit in
// the events file (opened per write, so no descriptor of it is part of a
// checkpoint), and when the host tree ends, ends the others and exits with
// the host's code. It returns the exit code.
func RunInit(spec InitSpec) int {
	// Orphans of the job stay below us, inside the checkpointed tree.
	_ = unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)

	roots := map[int]TreeSpec{}
	var mu sync.Mutex
	hostCode, hostDone := 0, false
	for _, t := range spec.Trees {
		pid, err := startTree(t)
		if err != nil {
			spec.event(InitEvent{Event: "start-failed", Tree: t.Name, Code: 127, Error: err.Error()})
			if t.Host {
				return 127
			}
			continue
		}
		roots[pid] = t
		spec.event(InitEvent{Event: "started", Tree: t.Name, PID: pid})
	}
	go func() {
		for s := range sigs {
			mu.Lock()
			for pid := range roots {
				_ = syscall.Kill(-pid, s.(syscall.Signal))
			}
			mu.Unlock()
		}
	}()
	var deadline <-chan time.Time
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, 0, nil)
		if err == syscall.EINTR {
			continue
		}
		if err == syscall.ECHILD {
			break
		}
		if err != nil {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		mu.Lock()
		t, isRoot := roots[pid]
		if isRoot {
			delete(roots, pid)
		}
		left := len(roots)
		mu.Unlock()
		if !isRoot {
			continue // a reaped orphan
		}
		code, sig := exitCode(ws)
		spec.event(InitEvent{Event: "exited", Tree: t.Name, PID: pid, Code: code, Signal: sig})
		if t.Host && !hostDone {
			hostDone, hostCode = true, code
			// The host is done: ask the other trees to end, then insist.
			mu.Lock()
			for p := range roots {
				_ = syscall.Kill(-p, syscall.SIGTERM)
			}
			mu.Unlock()
			grace := spec.Grace
			if grace <= 0 {
				grace = 5 * time.Second
			}
			deadline = time.After(grace)
			go func() {
				<-deadline
				mu.Lock()
				for p := range roots {
					_ = syscall.Kill(-p, syscall.SIGKILL)
					_ = syscall.Kill(p, syscall.SIGKILL)
				}
				mu.Unlock()
			}()
		}
		if hostDone && left == 0 {
			// Reap whatever orphans remain, without blocking on them forever.
			for {
				if p, _ := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil); p <= 0 {
					break
				}
			}
			break
		}
	}
	return hostCode
}

func startTree(t TreeSpec) (int, error) {
	if len(t.Argv) == 0 {
		return 0, fmt.Errorf("tree %s: empty command", t.Name)
	}
	path := t.Argv[0]
	if lp, err := lookPath(path, t.Env); err == nil {
		path = lp
	}
	open := func(p string) (int, error) {
		if p == "" {
			p = os.DevNull
		}
		// A tree run for another user gets files the daemon created as
		// that user (monitor.Daemon); job-init never creates them for it.
		flags := syscall.O_WRONLY | syscall.O_APPEND | syscall.O_CLOEXEC
		if t.UID == 0 && t.GID == 0 {
			flags |= syscall.O_CREAT
		}
		return syscall.Open(p, flags, 0o644)
	}
	in, err := syscall.Open(os.DevNull, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer syscall.Close(in)
	out, err := open(t.Stdout)
	if err != nil {
		return 0, fmt.Errorf("tree %s: stdout %s: %w", t.Name, t.Stdout, err)
	}
	defer syscall.Close(out)
	errfd, err := open(t.Stderr)
	if err != nil {
		return 0, fmt.Errorf("tree %s: stderr %s: %w", t.Name, t.Stderr, err)
	}
	defer syscall.Close(errfd)
	env := t.Env
	if env == nil {
		env = os.Environ()
	}
	env = slices.DeleteFunc(slices.Clone(env), func(kv string) bool { return strings.HasPrefix(kv, InitEnv+"=") })
	// Go >= 1.24 opens MPTCP listeners where the kernel has MPTCP, and CRIU
	// cannot checkpoint MPTCP sockets: unless told otherwise, Go programs
	// of the job use plain TCP.
	if !slices.ContainsFunc(env, func(kv string) bool { return strings.HasPrefix(kv, "GODEBUG=") }) {
		env = append(env, "GODEBUG=multipathtcp=0")
	}
	// syscall.ForkExec, not os/exec: no pidfd is left in job-init, so
	// nothing in the checkpointed tree refers to a process outside it.
	return syscall.ForkExec(path, t.Argv, &syscall.ProcAttr{
		Dir:   t.Dir,
		Env:   env,
		Files: []uintptr{uintptr(in), uintptr(out), uintptr(errfd)},
		Sys:   sysAttr(t),
	})
}

func sysAttr(t TreeSpec) *syscall.SysProcAttr {
	a := &syscall.SysProcAttr{Setsid: true}
	if t.UID != 0 || t.GID != 0 {
		a.Credential = &syscall.Credential{Uid: uint32(t.UID), Gid: uint32(t.GID), NoSetGroups: true}
	}
	return a
}

// lookPath resolves a command name on the PATH of env.
func lookPath(name string, env []string) (string, error) {
	if len(name) > 0 && (name[0] == '/' || name[0] == '.') {
		return name, nil
	}
	path := os.Getenv("PATH")
	for _, kv := range env {
		if len(kv) > 5 && kv[:5] == "PATH=" {
			path = kv[5:]
		}
	}
	for _, dir := range splitList(path) {
		p := dir + "/" + name
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found on PATH", name)
}

func splitList(p string) []string {
	var out []string
	start := 0
	for i := 0; i <= len(p); i++ {
		if i == len(p) || p[i] == ':' {
			if i > start {
				out = append(out, p[start:i])
			}
			start = i + 1
		}
	}
	return out
}

func exitCode(ws syscall.WaitStatus) (int, string) {
	switch {
	case ws.Exited():
		return ws.ExitStatus(), ""
	case ws.Signaled():
		return 128 + int(ws.Signal()), unix.SignalName(ws.Signal())
	}
	return 1, ""
}

func (s InitSpec) event(e InitEvent) {
	if s.Events == "" {
		return
	}
	e.Time = time.Now().UTC()
	b, _ := json.Marshal(e)
	f, err := os.OpenFile(s.Events, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return
	}
	f.Write(append(b, '\n'))
	f.Close()
}
