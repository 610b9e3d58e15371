package slurm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"github.com/cryo-hpc/cryo/internal/privilege"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// ErrNotSlurm means the environment is not that of a Slurm job or hook.
var ErrNotSlurm = errors.New("not in a Slurm job (SLURM_JOB_ID is not set)")

// StorePrefix starts the name of a Slurm job's store directory:
// <root>/cryo-<SLURM_JOB_ID>, next to Slurm's own slurm-<id>.out.
const StorePrefix = "cryo-"

// Job is what cryo needs to know about a Slurm job. It is read from the
// environment of the batch script (JobFromEnv in the job) or of a
// Prolog/Epilog, which name some variables differently; fields the
// environment does not give are zero (UID and GID -1).
type Job struct {
	ID      string `json:"job_id"` // SLURM_JOB_ID: stays the same across requeues
	Cluster string `json:"cluster,omitempty"`
	User    string `json:"user,omitempty"`
	UID     int    `json:"uid"`
	GID     int    `json:"gid"`
	// RestartCount is how often the job was requeued before this run
	// (SLURM_RESTART_COUNT in the job, SLURM_JOB_RESTART_COUNT in hooks).
	RestartCount int `json:"restart_count"`
	// SubmitDir is where sbatch ran (the job's environment only); WorkDir
	// is the job's working directory (hooks only; the same unless the job
	// was submitted with --chdir).
	SubmitDir string `json:"submit_dir,omitempty"`
	WorkDir   string `json:"work_dir,omitempty"`
	Node      string `json:"node,omitempty"`
	// GPUs are the GPU indices Slurm gave the job (SLURM_JOB_GPUS, hooks
	// only) and CUDAVisibleDevices what the job's processes see.
	GPUs               string `json:"gpus,omitempty"`
	CUDAVisibleDevices string `json:"cuda_visible_devices,omitempty"`
	// Exited is set in an Epilog: the batch script's exit code, or
	// 128+signal when a signal ended it.
	Exited *int `json:"exit_code,omitempty"`
	// Context is SLURM_SCRIPT_CONTEXT in hooks (prolog_slurmd, epilog_slurmd).
	Context string `json:"context,omitempty"`
}

// JobFromEnv reads the Slurm job from an environment (os.Getenv, or a
// lookup in a hook's environment). It fails with ErrNotSlurm when
// SLURM_JOB_ID is not set, and when it is not a job ID.
func JobFromEnv(getenv func(string) string) (Job, error) {
	j := Job{ID: getenv("SLURM_JOB_ID"), UID: -1, GID: -1}
	if j.ID == "" {
		return j, ErrNotSlurm
	}
	if !validJobID(j.ID) {
		return j, fmt.Errorf("%w: SLURM_JOB_ID %q is not a job ID", ErrNotSlurm, j.ID)
	}
	j.Cluster = getenv("SLURM_CLUSTER_NAME")
	j.User = getenv("SLURM_JOB_USER")
	j.UID = atoiOr(getenv("SLURM_JOB_UID"), -1)
	j.GID = atoiOr(getenv("SLURM_JOB_GID"), -1)
	j.RestartCount = atoiOr(firstOf(getenv, "SLURM_RESTART_COUNT", "SLURM_JOB_RESTART_COUNT"), 0)
	j.SubmitDir = getenv("SLURM_SUBMIT_DIR")
	j.WorkDir = getenv("SLURM_JOB_WORK_DIR")
	j.Node = firstOf(getenv, "SLURMD_NODENAME", "SLURM_NODENAME")
	j.GPUs = getenv("SLURM_JOB_GPUS")
	j.CUDAVisibleDevices = getenv("CUDA_VISIBLE_DEVICES")
	j.Context = getenv("SLURM_SCRIPT_CONTEXT")
	j.Exited = exitOf(getenv("SLURM_JOB_EXIT_CODE2"), getenv("SLURM_JOB_EXIT_CODE"))
	return j, nil
}

// DefaultStoreRoot is where a job's store goes when no root is configured:
// the submit directory in the job, the job's working directory in a hook
// (Slurm does not tell hooks the submit directory; the two differ only for
// jobs submitted with --chdir, which therefore need a configured root).
func (j Job) DefaultStoreRoot() string {
	if j.SubmitDir != "" {
		return j.SubmitDir
	}
	return j.WorkDir
}

// Store returns the job's store directory, root/cryo-<job ID>; root ""
// means DefaultStoreRoot. The directory survives requeues because the job
// ID does.
func (j Job) Store(root string) (string, error) {
	if !validJobID(j.ID) {
		return "", fmt.Errorf("%w: job ID %q", ErrNotSlurm, j.ID)
	}
	if root == "" {
		root = j.DefaultStoreRoot()
	}
	if root == "" {
		return "", fmt.Errorf("no store root: set CRYO_STORE_ROOT (neither SLURM_SUBMIT_DIR nor SLURM_JOB_WORK_DIR is set)")
	}
	if !filepath.IsAbs(root) {
		return "", fmt.Errorf("store root %q is not an absolute path", root)
	}
	return filepath.Join(filepath.Clean(root), StorePrefix+j.ID), nil
}

// Requeue asks Slurm to requeue the job (`scontrol requeue <id>`): Slurm
// ends the job's processes, runs the Epilog, and starts the batch script
// again, from the top, with the same job ID. scontrol is the scontrol
// binary ("" finds it on PATH). It waits at most 30 s.
func (j Job) Requeue(ctx context.Context, scontrol string) error {
	if !validJobID(j.ID) {
		return fmt.Errorf("%w: job ID %q", ErrNotSlurm, j.ID)
	}
	if scontrol == "" {
		scontrol = "scontrol"
	}
	path, err := exec.LookPath(scontrol)
	if err != nil {
		return fmt.Errorf("requeue job %s: %w", j.ID, err)
	}
	if privilege.Root() {
		// Root runs only what no one else can change (CRYO_SCONTROL kept
		// by sudo, a user's directory on PATH).
		if err := privilege.Trusted(path); err != nil {
			return fmt.Errorf("requeue job %s: as root, cryo runs only an scontrol that root alone can change: %w", j.ID, err)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, path, "requeue", j.ID)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(out.String())
		if msg == "" {
			msg = err.Error()
		}
		return fmt.Errorf("requeue job %s: %s requeue %s: %s", j.ID, path, j.ID, msg)
	}
	return nil
}

// validJobID accepts what Slurm uses as SLURM_JOB_ID: a decimal number.
// Anything else is refused, since it becomes part of a path.
func validJobID(id string) bool {
	if id == "" || len(id) > 20 {
		return false
	}
	for _, c := range id {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

func atoiOr(s string, def int) int {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil {
		return def
	}
	return n
}

func firstOf(getenv func(string) string, names ...string) string {
	for _, n := range names {
		if v := getenv(n); v != "" {
			return v
		}
	}
	return ""
}

// exitOf reads an Epilog's exit status: SLURM_JOB_EXIT_CODE2 is
// "code:signal"; SLURM_JOB_EXIT_CODE is the raw wait status.
func exitOf(code2, raw string) *int {
	if c, s, ok := strings.Cut(code2, ":"); ok {
		code, err1 := strconv.Atoi(c)
		sig, err2 := strconv.Atoi(s)
		if err1 == nil && err2 == nil {
			if sig != 0 {
				code = 128 + sig
			}
			return &code
		}
	}
	if w, err := strconv.Atoi(raw); err == nil {
		code := (w >> 8) & 0xff
		if sig := w & 0x7f; sig != 0 {
			code = 128 + sig
		}
		return &code
	}
	return nil
}
