package slurm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cryo-hpc/cryo/internal/store"
	"github.com/cryo-hpc/cryo/offload"
)

func envOf(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestJobFromEnv(t *testing.T) {
	code := func(n int) *int { return &n }
	for _, tc := range []struct {
		name    string
		env     map[string]string
		want    Job
		wantErr error
	}{
		{"not slurm", map[string]string{}, Job{}, ErrNotSlurm},
		{"bad id", map[string]string{"SLURM_JOB_ID": "12/../x"}, Job{}, ErrNotSlurm},
		{"batch job, first run", map[string]string{
			"SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": "/home/ada/sim", "SLURM_JOB_UID": "1000", "SLURM_JOB_GID": "100",
			"SLURM_JOB_USER": "ada", "SLURMD_NODENAME": "n17", "SLURM_CLUSTER_NAME": "big",
		}, Job{ID: "4242", Cluster: "big", User: "ada", UID: 1000, GID: 100, SubmitDir: "/home/ada/sim", Node: "n17"}, nil},
		{"batch job, requeued", map[string]string{"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "2"},
			Job{ID: "4242", UID: -1, GID: -1, RestartCount: 2}, nil},
		{"epilog", map[string]string{
			"SLURM_JOB_ID": "7", "SLURM_JOB_RESTART_COUNT": "1", "SLURM_JOB_WORK_DIR": "/w", "SLURM_JOB_UID": "0",
			"SLURM_JOB_EXIT_CODE2": "3:0", "SLURM_JOB_EXIT_CODE": "768", "SLURM_SCRIPT_CONTEXT": "epilog_slurmd",
			"SLURM_JOB_GPUS": "0,1", "CUDA_VISIBLE_DEVICES": "0,1",
		}, Job{ID: "7", UID: 0, GID: -1, RestartCount: 1, WorkDir: "/w", Exited: code(3), Context: "epilog_slurmd",
			GPUs: "0,1", CUDAVisibleDevices: "0,1"}, nil},
		{"epilog, killed by a signal", map[string]string{"SLURM_JOB_ID": "7", "SLURM_JOB_EXIT_CODE2": "0:9"},
			Job{ID: "7", UID: -1, GID: -1, Exited: code(137)}, nil},
		{"epilog, raw status only", map[string]string{"SLURM_JOB_ID": "7", "SLURM_JOB_EXIT_CODE": "15"},
			Job{ID: "7", UID: -1, GID: -1, Exited: code(143)}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := JobFromEnv(envOf(tc.env))
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("error %v, want %v", err, tc.wantErr)
			}
			if err != nil {
				return
			}
			g, _ := json.Marshal(got)
			w, _ := json.Marshal(tc.want)
			if string(g) != string(w) {
				t.Errorf("got  %s\nwant %s", g, w)
			}
		})
	}
}

func TestJobStore(t *testing.T) {
	j := Job{ID: "99", SubmitDir: "/home/ada/sim/", WorkDir: "/elsewhere"}
	for _, tc := range []struct {
		root, want, err string
	}{
		{"", "/home/ada/sim/cryo-99", ""},
		{"/scratch/cryo", "/scratch/cryo/cryo-99", ""},
		{"scratch", "", "not an absolute path"},
	} {
		got, err := j.Store(tc.root)
		if got != tc.want || (err == nil) != (tc.err == "") || (err != nil && !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("Store(%q) = %q, %v; want %q, %q", tc.root, got, err, tc.want, tc.err)
		}
	}
	hook := Job{ID: "99", WorkDir: "/w"}
	if got, _ := hook.Store(""); got != "/w/cryo-99" {
		t.Errorf("in a hook the default root is the work dir: got %q", got)
	}
	if _, err := (Job{ID: "99"}).Store(""); err == nil {
		t.Errorf("no root at all must fail")
	}
}

// gpuDriver is an offload driver of a node with GPUs (or, with err, of a
// node whose driver cannot say).
type gpuDriver struct {
	kind string
	gpus []offload.GPU
	err  error
}

func (d gpuDriver) Kind() string                                               { return d.kind }
func (d gpuDriver) Discover(context.Context, []int) ([]offload.Context, error) { return nil, nil }
func (d gpuDriver) Attach(offload.Record) (offload.Context, error)             { return nil, errors.New("no") }
func (d gpuDriver) Inventory(context.Context) (offload.Inventory, error) {
	return offload.Inventory{GPUs: d.gpus}, d.err
}

var nodeA100s = []offload.GPU{
	{Index: 1, UUID: "GPU-11111111-2222-3333-4444-555555555555", Model: "NVIDIA A100-SXM4-40GB", MemoryTotal: 40 << 30},
	{Index: 0, UUID: "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", Model: "NVIDIA A100-SXM4-40GB", MemoryTotal: 40 << 30},
}

func TestNodeGPUs(t *testing.T) {
	reg := offload.NewRegistry(gpuDriver{kind: "cuda", gpus: nodeA100s}, gpuDriver{kind: "other", err: offload.ErrNoDriver})
	gpus := nodeGPUs(context.Background(), reg, slog.New(slog.DiscardHandler))
	if len(gpus) != 2 || gpus[0].Index != 0 || gpus[1].UUID != nodeA100s[0].UUID {
		t.Errorf("node GPUs %+v, want both A100s in index order", gpus)
	}
}

// hookJob is a job of the current user whose working directory is a
// fresh temporary directory.
func hookJob(t *testing.T) Job {
	return Job{ID: strconv.Itoa(100000 + rand.IntN(800000)), UID: os.Getuid(), GID: os.Getgid(),
		WorkDir: t.TempDir(), Node: "n1", User: "me"}
}

func writeRunState(t *testing.T, store, state string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Join(store, "run"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(store, "run", "state.json"), []byte(`{"state":"`+state+`"}`), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestPrologMakesStore(t *testing.T) {
	ctx := context.Background()
	job := hookJob(t)
	reg := offload.NewRegistry(gpuDriver{kind: "cuda", gpus: nodeA100s})
	rep, err := Prolog(ctx, job, HookOptions{LeaveOrphans: true, Offload: reg})
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(job.WorkDir, "cryo-"+job.ID)
	if rep.Store != dir || !rep.Created || len(rep.GPUs) != 2 {
		t.Errorf("report %+v", rep)
	}
	st, err := os.Stat(dir)
	if err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("store: %v, %v", st, err)
	}
	if st, err := store.Open(dir); err != nil {
		t.Errorf("the new store does not open: %v", err)
	} else if gens, err := st.Generations(); err != nil || len(gens) != 0 {
		t.Errorf("generations of a new store: %v, %v", gens, err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "slurm", historyName))
	if err != nil || !strings.Contains(string(b), `"hook":"prolog"`) || !strings.Contains(string(b), `"node":"n1"`) ||
		!strings.Contains(string(b), "GPU-11111111") {
		t.Errorf("history: %q, %v", b, err)
	}
	// Again (a requeued job): the store is kept as it is.
	if rep, err := Prolog(ctx, job, HookOptions{LeaveOrphans: true}); err != nil || rep.Created {
		t.Errorf("second prolog: %+v, %v", rep, err)
	}
}

func TestPrologRefusesSymlink(t *testing.T) {
	job := hookJob(t)
	target := t.TempDir()
	if err := os.Symlink(target, filepath.Join(job.WorkDir, "cryo-"+job.ID)); err != nil {
		t.Fatal(err)
	}
	if _, err := Prolog(context.Background(), job, HookOptions{LeaveOrphans: true}); err == nil {
		t.Errorf("the prolog followed a symbolic link in the store's place")
	}
	if ents, _ := os.ReadDir(target); len(ents) != 0 {
		t.Errorf("the prolog wrote through the link: %v", ents)
	}
}

func TestPrologRefusesOthersRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to make a directory of another user")
	}
	job := hookJob(t)
	job.UID, job.GID = 65534, 65534
	// The work dir belongs to root, not to the job's user.
	if _, err := Prolog(context.Background(), job, HookOptions{LeaveOrphans: true}); err == nil || !strings.Contains(err.Error(), "not to the job's user") {
		t.Errorf("prolog in a directory of another user: %v", err)
	}
	if err := os.Chown(job.WorkDir, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	if _, err := Prolog(context.Background(), job, HookOptions{LeaveOrphans: true}); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(job.WorkDir, "cryo-"+job.ID)
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(dir, "cryo-store.json"), &st); err != nil || st.Uid != 65534 {
		t.Errorf("store contents not given to the job's user: uid %d, %v", st.Uid, err)
	}
}

func TestEpilog(t *testing.T) {
	ctx := context.Background()
	exit := func(n int) *int { return &n }
	for _, tc := range []struct {
		name    string
		state   string // run/state.json; "" none
		exit    *int
		keep    bool
		removed bool
		why     string
	}{
		{"cryo never ran", "", exit(1), false, true, "never ran"},
		{"stopped for a requeue", "stopped", exit(0), false, false, "kept for the requeue"},
		{"killed while running", "running", exit(137), false, false, "unfinished (state running)"},
		{"completed", "completed", exit(0), false, true, "completed successfully"},
		{"completed, kept as configured", "completed", exit(0), true, false, "kept as configured"},
		{"completed, script failed after", "completed", exit(2), false, false, "exited with 2"},
		{"failed", "failed", exit(1), false, false, "failed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			job := hookJob(t)
			if _, err := Prolog(ctx, job, HookOptions{LeaveOrphans: true}); err != nil {
				t.Fatal(err)
			}
			dir := filepath.Join(job.WorkDir, "cryo-"+job.ID)
			if tc.state != "" {
				writeRunState(t, dir, tc.state)
			}
			if err := os.MkdirAll(filepath.Join(dir, "staging", "cryo-work-123", "images"), 0o700); err != nil {
				t.Fatal(err)
			}
			job.Exited = tc.exit
			rep, err := Epilog(ctx, job, HookOptions{LeaveOrphans: true, KeepOnSuccess: tc.keep})
			if err != nil {
				t.Fatal(err)
			}
			_, serr := os.Stat(dir)
			if rep.Removed != tc.removed || (serr == nil) == tc.removed || !strings.Contains(rep.Why, tc.why) {
				t.Errorf("removed %v (store there: %v), why %q; want removed %v, why ~ %q", rep.Removed, serr == nil, rep.Why, tc.removed, tc.why)
			}
			if !tc.removed {
				if rep.Staging != 1 {
					t.Errorf("staging leftovers removed: %d, want 1", rep.Staging)
				}
				if b, _ := os.ReadFile(filepath.Join(dir, "slurm", historyName)); !strings.Contains(string(b), `"hook":"epilog"`) {
					t.Errorf("no epilog line in the history: %q", b)
				}
			}
		})
	}
}

func TestEpilogDoesNotFollowStaging(t *testing.T) {
	ctx := context.Background()
	job := hookJob(t)
	if _, err := Prolog(ctx, job, HookOptions{LeaveOrphans: true}); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(job.WorkDir, "cryo-"+job.ID)
	writeRunState(t, dir, "stopped")
	precious := t.TempDir()
	if err := os.WriteFile(filepath.Join(precious, "keep-me"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(filepath.Join(dir, "staging"))
	if err := os.Symlink(precious, filepath.Join(dir, "staging")); err != nil {
		t.Fatal(err)
	}
	_, err := Epilog(ctx, job, HookOptions{LeaveOrphans: true})
	if err == nil || !strings.Contains(err.Error(), "staging") {
		t.Errorf("epilog with staging/ a symbolic link: %v, want an error about staging", err)
	}
	if _, err := os.Stat(filepath.Join(precious, "keep-me")); err != nil {
		t.Errorf("the epilog deleted through a symbolic link: %v", err)
	}
}

// TestEpilogRemovesPackDebris: the epilog cleans a store as the store
// does (Store.CleanStaging, as the job's user), so the unfinished pack file
// of a cryo killed mid-checkpoint goes too, not only staging/; finished
// packs and the intent journals stay. As root, the job is nobody's.
func TestEpilogRemovesPackDebris(t *testing.T) {
	ctx := context.Background()
	job := hookJob(t)
	if os.Geteuid() == 0 {
		job.UID, job.GID = 65534, 65534
		if err := os.Chown(job.WorkDir, job.UID, job.GID); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := Prolog(ctx, job, HookOptions{LeaveOrphans: true}); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(job.WorkDir, "cryo-"+job.ID)
	writeRunState(t, dir, "stopped")
	// What a killed cryo leaves, made the user's as cryo would have.
	usersFile := func(rel string) string {
		t.Helper()
		p := filepath.Join(dir, rel)
		err := os.MkdirAll(filepath.Dir(p), 0o700)
		if err == nil {
			err = os.WriteFile(p, []byte("x"), 0o600)
		}
		for q := p; err == nil && q != dir; q = filepath.Dir(q) {
			err = os.Lchown(q, job.UID, job.GID)
		}
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	debris := []string{
		usersFile("staging/cryo-work-123/images/pages-1.img"),
		usersFile("packs/0123456789abcdef0123456789abcdef.tmp"),
	}
	kept := []string{
		usersFile("packs/fedcba9876543210fedcba9876543210.pack"),
		usersFile("staging/journal/intent-1.json"),
	}
	rep, err := Epilog(ctx, job, HookOptions{LeaveOrphans: true})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Removed || rep.Staging != len(debris) {
		t.Errorf("epilog removed the store: %v, %d leftovers; want it kept and %d leftovers removed", rep.Removed, rep.Staging, len(debris))
	}
	for _, p := range debris {
		if _, err := os.Lstat(p); err == nil {
			t.Errorf("left behind: %s", p)
		}
	}
	for _, p := range kept {
		if _, err := os.Lstat(p); err != nil {
			t.Errorf("removed what is not debris: %v", err)
		}
	}
}

func TestKillJobOrphans(t *testing.T) {
	if _, err := exec.LookPath("sleep"); err != nil {
		t.Skip("no sleep command")
	}
	job := Job{ID: strconv.Itoa(100000 + rand.IntN(800000)), Cluster: fmt.Sprintf("test%d", rand.IntN(1e6))}
	start := func(name string, env ...string) *exec.Cmd {
		cmd := exec.Command(name, "60")
		cmd.Env = append(os.Environ(), env...)
		if err := cmd.Start(); err != nil {
			t.Error(err) // called from several goroutines
			return nil
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd
	}
	otherCluster := start("sleep", "SLURM_JOB_ID="+job.ID, "SLURM_CLUSTER_NAME=elsewhere")
	otherJob := start("sleep", "SLURM_JOB_ID=1"+job.ID, "SLURM_CLUSTER_NAME="+job.Cluster)
	// Half the orphans exec themselves over and over, so the scan often
	// finds one inside execve, when its environment reads as empty for a
	// moment; the other half are started at once, right before the scan.
	loop := filepath.Join(t.TempDir(), "orphan-loop")
	if err := os.WriteFile(loop, []byte("#!/bin/sh\nexec \"$0\"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	orphans := make([]*exec.Cmd, 16)
	var wg sync.WaitGroup
	for i := range orphans {
		name := "sleep"
		if i%2 == 0 {
			name = loop
		}
		wg.Go(func() { orphans[i] = start(name, "SLURM_JOB_ID="+job.ID, "SLURM_CLUSTER_NAME="+job.Cluster) })
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	time.Sleep(20 * time.Millisecond) // the loops get going
	found, err := killJobOrphans(context.Background(), job, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	var want []Orphan
	for _, o := range orphans {
		want = append(want, Orphan{PID: o.Process.Pid, Comm: filepath.Base(o.Path)})
	}
	slices.SortFunc(want, func(a, b Orphan) int { return a.PID - b.PID })
	if !slices.Equal(found, want) {
		t.Errorf("found %+v, want %+v", found, want)
	}
	timeout := time.After(10 * time.Second)
	for _, o := range orphans {
		done := make(chan struct{})
		go func() { o.Wait(); close(done) }()
		select {
		case <-done:
		case <-timeout:
			t.Fatalf("orphan %d (%s) still runs 10 s on", o.Process.Pid, filepath.Base(o.Path))
		}
	}
	for _, c := range []*exec.Cmd{otherCluster, otherJob} {
		if err := c.Process.Signal(syscall.Signal(0)); err != nil {
			t.Errorf("pid %d of another job was ended", c.Process.Pid)
		}
	}
}

// As root, Requeue runs no scontrol that someone else could change
// (CRYO_SCONTROL kept by sudo, a user's directory on PATH): one in a
// user's directory is refused and never runs; root's own runs.
func TestRequeueAsRootRunsOnlyRootsScontrol(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CRYO_NO_SKIP") == "1" {
			t.Fatal("needs root, and CRYO_NO_SKIP=1 forbids skipping")
		}
		t.Skip("needs root")
	}
	mark := filepath.Join(t.TempDir(), "ran")
	script := "#!/bin/sh\necho ran >> " + mark + "\n"
	users := t.TempDir()
	if err := os.Chown(users, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		dir string
		ok  bool
	}{{users, false}, {t.TempDir(), true}} {
		p := filepath.Join(c.dir, "scontrol")
		if err := os.WriteFile(p, []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
		os.Remove(mark)
		err := Job{ID: "42"}.Requeue(context.Background(), p)
		_, ran := os.Stat(mark)
		if c.ok != (err == nil) || c.ok != (ran == nil) {
			t.Errorf("scontrol in %s (root's: %v): Requeue %v, ran %v", c.dir, c.ok, err, ran == nil)
		}
		if !c.ok && (err == nil || !strings.Contains(err.Error(), "root alone can change")) {
			t.Errorf("scontrol in a user's directory: %v, want a refusal saying why", err)
		}
	}
}
