package jobns

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// A run of the test binary with jobnsHelper set is job-init's stand-in:
// PID 1 of the namespaces, it calls Setup and reports what the job sees.
const jobnsHelper = "CRYO_JOBNS_TEST_HELPER"

type seen struct {
	PID      int    `json:"pid"`
	UID      int    `json:"uid"`
	CapEff   string `json:"cap_eff"`
	ProcSelf string `json:"proc_self"` // /proc/self as the job's /proc resolves it
	ShmFile  bool   `json:"shm_file"`  // the node's /dev/shm file is visible
	TmpFile  bool   `json:"tmp_file"`  // a file of the node's tmpDir is visible
	Err      string `json:"err,omitempty"`
}

func TestMain(m *testing.M) {
	if dir := os.Getenv(jobnsHelper); dir != "" {
		var s seen
		if err := Setup(filepath.Join(dir, "tmp")); err != nil {
			s.Err = err.Error()
		}
		s.PID, s.UID = os.Getpid(), os.Getuid()
		s.ProcSelf, _ = os.Readlink("/proc/self")
		_, err := os.Stat("/dev/shm/" + filepath.Base(dir))
		s.ShmFile = err == nil
		_, err = os.Stat(filepath.Join(dir, "tmp", "before"))
		s.TmpFile = err == nil
		if b, err := os.ReadFile("/proc/self/status"); err == nil {
			for _, l := range strings.Split(string(b), "\n") {
				if v, ok := strings.CutPrefix(l, "CapEff:"); ok {
					s.CapEff = strings.TrimSpace(v)
				}
			}
		}
		_ = json.NewEncoder(os.Stdout).Encode(s)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestSetup starts a process as cryo run starts job-init and checks what
// the job then sees: PID 1, its own /proc, an empty /dev/shm and temporary
// directory (the node's files under them hidden, not touched), its own
// uid, and, as a user, no capability left.
func TestSetup(t *testing.T) {
	user := os.Geteuid() != 0
	if err := Probe(user); err != nil {
		if os.Getenv("CRYO_NO_SKIP") == "1" {
			t.Fatalf("%v (CRYO_NO_SKIP=1 forbids skipping)", err)
		}
		t.Skip(err)
	}
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "tmp"), 0o700); err != nil {
		t.Fatal(err)
	}
	before := filepath.Join(dir, "tmp", "before")
	shm := "/dev/shm/" + filepath.Base(dir)
	for _, p := range []string{before, shm} {
		if err := os.WriteFile(p, []byte("node"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	defer os.Remove(shm)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), jobnsHelper+"="+dir)
	cmd.SysProcAttr = Attr(syscall.SysProcAttr{Setsid: true}, user)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("job-init stand-in: %v", err)
	}
	var s seen
	if err := json.Unmarshal(out, &s); err != nil {
		t.Fatalf("job-init stand-in said %q: %v", out, err)
	}
	if s.Err != "" {
		t.Fatalf("Setup: %s", s.Err)
	}
	if s.PID != 1 || s.ProcSelf != "1" {
		t.Errorf("the job's init is pid %d and its /proc/self is %q; want 1 and \"1\" (its own PID namespace and /proc)", s.PID, s.ProcSelf)
	}
	if s.UID != os.Getuid() {
		t.Errorf("the job runs as uid %d, want %d (its user's own)", s.UID, os.Getuid())
	}
	if s.ShmFile || s.TmpFile {
		t.Errorf("the job sees the node's /dev/shm (%v) or temporary files (%v); want private, empty ones", s.ShmFile, s.TmpFile)
	}
	if user && s.CapEff != "0000000000000000" {
		t.Errorf("a user's job keeps capabilities %s in its namespace; want none", s.CapEff)
	}
	for _, p := range []string{before, shm} {
		if b, err := os.ReadFile(p); err != nil || string(b) != "node" {
			t.Errorf("the node's %s changed: %q, %v", p, b, err)
		}
	}
}
