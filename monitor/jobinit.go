package monitor

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cryo-hpc/cryo/internal/jobns"
	"github.com/cryo-hpc/cryo/internal/proc"
	"golang.org/x/sys/unix"
)

// TreeSpec is one process tree of a job.
type TreeSpec struct {
	Name string   `json:"name"` // "host", "offload-1", ...
	Argv []string `json:"argv"`
	Dir  string   `json:"dir,omitempty"`
	Env  []string `json:"env,omitempty"`
	// Stdout and Stderr are appended to (O_APPEND: a restore cuts them back
	// to their size at the checkpoint, see internal/outputs), created 0600
	// if missing; a symbolic link is refused, but for /dev and /proc paths.
	Stdout string `json:"stdout"`
	Stderr string `json:"stderr"`
	Host   bool   `json:"host,omitempty"` // the job ends when the host tree ends
}

// InitSpec is what job-init is told to run.
type InitSpec struct {
	Trees  []TreeSpec    `json:"trees"`
	Events string        `json:"events"` // file job-init appends its events to
	Grace  time.Duration `json:"grace"`  // SIGTERM -> SIGKILL for the rest of the job when the host ends
	// Namespaced: job-init is PID 1 of the job's own namespaces (jobns)
	// and sets them up first: TmpDir becomes the job's private temporary
	// directory, and its own output goes to Log, opened there (a
	// descriptor of the node's mount namespace could not be checkpointed
	// with the job's).
	Namespaced bool   `json:"namespaced,omitempty"`
	TmpDir     string `json:"tmpdir,omitempty"`
	Log        string `json:"log,omitempty"`
	// SetUp: the namespaces are set up and job-init runs again without the
	// capabilities it set them up with (jobns.DropAndExec).
	SetUp bool `json:"set_up,omitempty"`
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
	// AfterHost is set on a tree that ended after the host tree had ended
	// (job-init ends the rest then): its end is no failure of the job.
	AfterHost bool `json:"after_host,omitempty"`
}

// InitEnv names the environment variable that carries the InitSpec.
const InitEnv = "CRYO_INIT_SPEC"

// RunInit is job-init: it starts every tree of spec in a session of its
// own and records each tree's start and end in the events file (opened per
// write, so no descriptor of it is part of a checkpoint). It is the child
// subreaper of everything below it, so every process of the job stays its
// descendant, and it never exits while one lives: when the host tree ends
// it asks the rest of the job to end (SIGTERM), kills what is left after
// the grace period (SIGKILL), reaps everything, and exits with the host's
// code, which it returns. Signals it gets (SIGTERM, SIGINT, SIGHUP) are
// passed on to the trees' process groups.
//
// The same holds when job-init is the init of a PID namespace of the
// job's own: its descendants are then the namespace's processes.
func RunInit(spec InitSpec) int {
	closeInherited()
	if spec.Namespaced && !spec.SetUp {
		err := enterJobNamespaces(spec)
		if err == nil && jobns.NeedsDrop() {
			err = dropAndRunAgain(spec) // returns only when it fails
		}
		if err != nil {
			spec.event(InitEvent{Event: "start-failed", Tree: "job-init", Code: 127, Error: err.Error()})
			return 127
		}
	}
	_ = unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)

	roots := map[int]TreeSpec{}
	var mu sync.Mutex
	for _, t := range spec.Trees {
		pid, err := startTree(t)
		if err != nil {
			spec.event(InitEvent{Event: "start-failed", Tree: t.Name, Code: 127, Error: err.Error()})
			if t.Host {
				endRest(spec.Grace, nil)
				reapAll()
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
	hostCode, hostDone := 0, false
	var ending endSignals // what endRest has sent the rest of the job
	ended := func(pid int, ws syscall.WaitStatus) (TreeSpec, bool) {
		mu.Lock()
		defer mu.Unlock()
		t, ok := roots[pid]
		delete(roots, pid)
		if ok {
			code, sig := exitCode(ws)
			// After the host, a tree's end is job-init's doing only if it
			// came from what job-init sent: killed by another signal (a
			// fault, or SIGKILL before job-init sent one) it failed of its
			// own, whatever order the two were reaped in.
			ours := hostDone && ending.caused(ws)
			spec.event(InitEvent{Event: "exited", Tree: t.Name, PID: pid, Code: code, Signal: sig, AfterHost: ours})
		}
		return t, ok
	}
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if errors.Is(err, syscall.ECHILD) {
			break // nothing of the job is left
		}
		if err != nil {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		t, isRoot := ended(pid, ws)
		if !isRoot || !t.Host || hostDone {
			continue // a reaped orphan, or a tree
		}
		hostCode, _ = exitCode(ws)
		// Trees already dead when the host's end is seen ended with it or
		// before it (an offload tree whose death made the host fail): they
		// are reported as such, before the host counts as done.
		for {
			var ws syscall.WaitStatus
			p, _ := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
			if p <= 0 {
				break
			}
			ended(p, ws)
		}
		mu.Lock()
		hostDone = true
		mu.Unlock()
		go endRest(spec.Grace, &ending)
	}
	return hostCode
}

// endRest ends every process below job-init: SIGTERM, and after grace
// (default 5 s) SIGKILL, again until none is left. The caller reaps.
func endRest(grace time.Duration, sent *endSignals) {
	if grace <= 0 {
		grace = 5 * time.Second
	}
	self := os.Getpid()
	if sent != nil {
		sent.term.Store(true)
	}
	if signalBelow(self, syscall.SIGTERM) == 0 {
		return
	}
	deadline := time.Now().Add(grace)
	for time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		if len(below(self)) == 0 {
			return
		}
	}
	if sent != nil {
		sent.kill.Store(true)
	}
	for signalBelow(self, syscall.SIGKILL) > 0 {
		time.Sleep(20 * time.Millisecond)
	}
}

// endSignals records what endRest has sent the rest of the job.
type endSignals struct{ term, kill atomic.Bool }

// caused tells whether an end ws follows from what was sent: an exit (the
// tree's answer to SIGTERM), SIGTERM, or SIGKILL once that was sent.
func (e *endSignals) caused(ws syscall.WaitStatus) bool {
	switch {
	case !e.term.Load():
		return false
	case ws.Exited():
		return true
	case ws.Signaled():
		return ws.Signal() == syscall.SIGTERM || (ws.Signal() == syscall.SIGKILL && e.kill.Load())
	}
	return false
}

// below lists job-init's live descendants.
func below(self int) []int {
	t, err := proc.All()
	if err != nil {
		return nil
	}
	var out []int
	ps := proc.Descendants(t, self)
	if len(ps) == 0 || !procIsOurs() {
		return nil
	}
	for _, p := range ps[1:] {
		if st := t[p]; st.State != 'Z' && st.State != 'X' {
			out = append(out, p)
		}
	}
	return out
}

// reapAll waits for every child until none is left.
func reapAll() {
	for {
		var ws syscall.WaitStatus
		if _, err := syscall.Wait4(-1, &ws, 0, nil); errors.Is(err, syscall.ECHILD) {
			return
		}
	}
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
		flags := syscall.O_WRONLY | syscall.O_APPEND | syscall.O_CLOEXEC | syscall.O_CREAT
		if !strings.HasPrefix(p, "/dev/") && !strings.HasPrefix(p, "/proc/") {
			flags |= syscall.O_NOFOLLOW
		}
		return syscall.Open(p, flags, 0o600)
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
	// An OpenMPI program started without mpirun (a "singleton": serial
	// LAMMPS from Debian is one) forks an orted and talks to it over TCP,
	// which a user's CRIU cannot checkpoint (no TCP repair); an isolated
	// singleton needs no orted, and loses only MPI_Comm_spawn and its
	// kin. Unless told otherwise, singletons of the job are isolated.
	// (Ranks started by mpirun are not singletons: it changes nothing
	// for them.)
	if !slices.ContainsFunc(env, func(kv string) bool { return strings.HasPrefix(kv, singletonIsolated+"=") }) {
		env = append(env, singletonIsolated+"=1")
	}
	// syscall.ForkExec, not os/exec: no pidfd is left in job-init, so
	// nothing in the checkpointed tree refers to a process outside it.
	return syscall.ForkExec(path, t.Argv, &syscall.ProcAttr{
		Dir:   t.Dir,
		Env:   env,
		Files: []uintptr{uintptr(in), uintptr(out), uintptr(errfd)},
		Sys:   &syscall.SysProcAttr{Setsid: true},
	})
}

// singletonIsolated is OpenMPI's setting for singletons without an orted.
const singletonIsolated = "OMPI_MCA_ess_singleton_isolated"

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
	f, err := os.OpenFile(s.Events, os.O_WRONLY|os.O_APPEND|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return
	}
	f.Write(append(b, '\n'))
	f.Close()
}

// enterJobNamespaces sets up the job's namespaces (jobns.Setup) and gives
// job-init a standard input, output and error of its own mount namespace.
func enterJobNamespaces(spec InitSpec) error {
	if err := jobns.Setup(spec.TmpDir); err != nil {
		return err
	}
	in, err := syscall.Open(os.DevNull, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	out := in
	if spec.Log != "" {
		if out, err = syscall.Open(spec.Log, syscall.O_WRONLY|syscall.O_APPEND|syscall.O_CREAT|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600); err != nil {
			return fmt.Errorf("job-init log %s: %w", spec.Log, err)
		}
	}
	for fd, from := range []int{in, out, out} {
		if err := unix.Dup2(from, fd); err != nil {
			return err
		}
	}
	syscall.Close(in)
	if out != in {
		syscall.Close(out)
	}
	return nil
}

// closeInherited closes the descriptors job-init inherited beyond its
// standard ones: they leaked from whoever started cryo run (a shell, a
// batch system) past exec, so they have no close-on-exec flag, which every
// descriptor Go opens has. The job must not hold them: they would pass on
// to its trees and into every checkpoint, and one of the node's mount
// namespace cannot be checkpointed with a job that has its own.
func closeInherited() {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd <= 2 {
			continue
		}
		if flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil && flags&unix.FD_CLOEXEC == 0 {
			_ = unix.Close(fd)
		}
	}
}

// dropAndRunAgain runs job-init again, set up, with no capability left in
// any thread (jobns.DropAndExec): the job starts from there.
func dropAndRunAgain(spec InitSpec) error {
	spec.SetUp = true
	b, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	self, err := os.Executable() // our own /proc: a path of the job's mount namespace
	if err != nil {
		return err
	}
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, InitEnv+"=") })
	return jobns.DropAndExec(self, []string{"cryo", "job-init"}, append(env, InitEnv+"="+string(b)))
}
