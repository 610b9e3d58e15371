package offload

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"
)

// State is where an offload context stands in the checkpoint state machine:
//
//	Running --Lock--> Locked --Checkpoint--> Checkpointed --Restore--> Locked --Unlock--> Running
//
// The numbers are the CUDA driver's CUprocessState values.
type State int

const (
	Running      State = 0 // new offload work runs
	Locked       State = 1 // new offload work blocks; work in flight has drained
	Checkpointed State = 2 // device state is in host memory; devices are released
	Failed       State = 3 // an uncorrectable error during checkpoint or restore
)

func (s State) String() string {
	switch s {
	case Running:
		return "running"
	case Locked:
		return "locked"
	case Checkpointed:
		return "checkpointed"
	case Failed:
		return "failed"
	}
	return fmt.Sprintf("state(%d)", int(s))
}

// ParseState is the inverse of State.String.
func ParseState(s string) (State, error) {
	for _, st := range []State{Running, Locked, Checkpointed, Failed} {
		if st.String() == s {
			return st, nil
		}
	}
	return 0, fmt.Errorf("unknown offload state %q", s)
}

// MarshalText writes a State as its name, in journals and manifests.
func (s State) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText reads a State written by MarshalText.
func (s *State) UnmarshalText(b []byte) error {
	v, err := ParseState(string(b))
	if err == nil {
		*s = v
	}
	return err
}

// Device is one device an offload context holds.
type Device struct {
	UUID  string `json:"uuid"`
	Model string `json:"model,omitempty"`
	Index int    `json:"index"`
	// Memory is the device memory the context held, in bytes (0: unknown).
	Memory uint64 `json:"memory_bytes,omitempty"`
}

// Record describes one offload context: enough for its driver to find it
// again (Driver.Attach) and for a restore to check and pick target devices.
type Record struct {
	Kind string `json:"kind"` // the driver's Kind, e.g. "cuda"
	PID  int    `json:"pid"`  // the process that holds the context, as cryo sees it
	// JobPID is that process's PID in the job's own PID namespace (as the
	// images name it), when the job has one (0 otherwise): a restore in
	// fresh namespaces gives the process another PID, found through this.
	JobPID int `json:"job_pid,omitempty"`
	// StartTime is PID's start time (clock ticks after boot); with PID it
	// names the process across PID reuse. A process restored by CRIU keeps
	// its PID but gets a new start time.
	StartTime uint64 `json:"start_time,omitempty"`
	// Devices are the devices the context held; empty when the driver could
	// not tell (e.g. CUDA without NVML).
	Devices []Device `json:"devices,omitempty"`
	// Initial is the state the context had before cryo touched it; undo and
	// recovery bring it back there.
	Initial State             `json:"initial"`
	Attrs   map[string]string `json:"attrs,omitempty"`
}

func (r Record) String() string { return fmt.Sprintf("%s context of pid %d", r.Kind, r.PID) }

// DeviceMap maps a recorded device UUID to the UUID of the device to restore
// it onto. A device that is not in the map stays where it was.
type DeviceMap map[string]string

// Target returns where old goes under m.
func (m DeviceMap) Target(old string) string {
	if n, ok := m[old]; ok {
		return n
	}
	return old
}

// Moves reports whether m sends any device somewhere else.
func (m DeviceMap) Moves() bool {
	for o, n := range m {
		if !strings.EqualFold(o, n) {
			return true
		}
	}
	return false
}

func (m DeviceMap) String() string {
	var parts []string
	for o, n := range m {
		parts = append(parts, o+"="+n)
	}
	sort.Strings(parts)
	return strings.Join(parts, ",")
}

// Context is one offload context of a job. Its methods block on the device
// or on the process that holds it; each returns when the step is done or
// has failed, leaving the context in the state the method's doc names.
//
// Who calls what: Quiesce calls Lock then Checkpoint; Group.Resume and undo
// call Restore then Unlock. A Context does no undo of its own.
type Context interface {
	// Record describes the context as it is now.
	Record() Record
	// State asks the driver where the context stands.
	State(ctx context.Context) (State, error)
	// Lock stops new offload work and waits, at most timeout (0: no limit),
	// for work in flight to drain: Running -> Locked. On timeout it fails
	// with an error matching ErrLockTimeout and the context stays Running.
	Lock(ctx context.Context, timeout time.Duration) error
	// Checkpoint moves device state into host memory of the holding process
	// and releases the devices: Locked -> Checkpointed. On failure the
	// context stays Locked (or, on an uncorrectable error, Failed).
	Checkpoint(ctx context.Context) error
	// Restore moves device state back onto devices, each recorded device
	// onto m.Target(its UUID): Checkpointed -> Locked. On failure the
	// context stays Checkpointed.
	Restore(ctx context.Context, m DeviceMap) error
	// Unlock lets offload work run again: Locked -> Running.
	Unlock(ctx context.Context) error
}

// GPU is a device of this node that contexts can be restored onto.
type GPU struct {
	Index int    `json:"index"`
	UUID  string `json:"uuid"`
	Model string `json:"model"`
	// MemoryTotal and MemoryFree are in bytes; FreeKnown is false when the
	// driver cannot tell free memory (then MemoryFree is MemoryTotal).
	MemoryTotal uint64 `json:"memory_total"`
	MemoryFree  uint64 `json:"memory_free"`
	FreeKnown   bool   `json:"free_known"`
}

// Inventory is what a driver can restore onto on this node.
type Inventory struct {
	GPUs []GPU
	// CanRemap says whether contexts can be restored onto other devices
	// than the recorded ones; RemapWhy says why not.
	CanRemap bool
	RemapWhy string
}

// Driver finds and re-attaches offload contexts of one kind.
type Driver interface {
	// Kind names the contexts this driver handles ("cuda").
	Kind() string
	// Discover returns the contexts that the given processes hold. A node
	// without this kind of device returns none and no error; a node where
	// contexts exist but cannot be checkpointed returns an error that says
	// why (e.g. a driver too old for the checkpoint API).
	Discover(ctx context.Context, pids []int) ([]Context, error)
	// Attach returns the context a record describes, for restore and
	// recovery. It does not check that the context exists.
	Attach(rec Record) (Context, error)
	// Inventory lists the devices of this node, for restore placement.
	Inventory(ctx context.Context) (Inventory, error)
}

var (
	// ErrLockTimeout means a context did not drain within the lock timeout.
	ErrLockTimeout = errors.New("offload lock timed out")
	// ErrNoDriver means contexts exist (or were recorded) that no usable
	// driver on this node can handle.
	ErrNoDriver = errors.New("no usable offload driver")
	// ErrNoMapping means the recorded devices cannot be placed on this
	// node's devices.
	ErrNoMapping = errors.New("no valid device mapping")
	// ErrRemapUnsupported means the driver cannot restore onto other
	// devices than the recorded ones.
	ErrRemapUnsupported = errors.New("device remapping not supported")
	// ErrContextFailed means a context is in the Failed state: its device
	// state is lost.
	ErrContextFailed = errors.New("offload context failed")
)

// PhaseError is a failed step on one context (or, with PID 0, on the job):
// the phase ("discover", "lock", "checkpoint", "dump", "restore", "unlock",
// "recover"), the context and the cause.
type PhaseError struct {
	Phase string
	Kind  string
	PID   int
	Err   error
}

func (e *PhaseError) Error() string {
	if e.PID == 0 {
		return fmt.Sprintf("offload %s: %v", e.Phase, e.Err)
	}
	return fmt.Sprintf("offload %s of the %s context of pid %d: %v", e.Phase, e.Kind, e.PID, e.Err)
}

func (e *PhaseError) Unwrap() error { return e.Err }

// Registry is the set of drivers cryo uses. A process opens it once
// (offload/drivers.Open), hands it to every checkpoint and restore, and
// closes it when done.
type Registry struct {
	drivers []Driver
}

// Close releases every driver that holds something (a driver that is an
// io.Closer: NVML initialised, say) and joins their errors. The registry
// must not be used afterwards; closing it again does nothing more.
func (r *Registry) Close() error {
	if r == nil {
		return nil
	}
	var errs []error
	for _, d := range r.drivers {
		if c, ok := d.(io.Closer); ok {
			if err := c.Close(); err != nil {
				errs = append(errs, fmt.Errorf("close the %s driver: %w", d.Kind(), err))
			}
		}
	}
	return errors.Join(errs...)
}

// NewRegistry returns a registry of the given drivers, in discovery order.
func NewRegistry(drivers ...Driver) *Registry {
	return &Registry{drivers: drivers}
}

// Drivers lists the registered drivers.
func (r *Registry) Drivers() []Driver {
	if r == nil {
		return nil
	}
	return r.drivers
}

// Driver returns the driver of a kind.
func (r *Registry) Driver(kind string) (Driver, error) {
	for _, d := range r.Drivers() {
		if d.Kind() == kind {
			return d, nil
		}
	}
	return nil, fmt.Errorf("%w: no %q driver registered", ErrNoDriver, kind)
}

// Discover returns every offload context the processes hold, across all
// drivers.
func (r *Registry) Discover(ctx context.Context, pids []int) ([]Context, error) {
	var all []Context
	var errs []error
	for _, d := range r.Drivers() {
		cs, err := d.Discover(ctx, pids)
		if err != nil {
			errs = append(errs, &PhaseError{Phase: "discover", Kind: d.Kind(), Err: err})
			continue
		}
		all = append(all, cs...)
	}
	return all, errors.Join(errs...)
}

// Attach returns the contexts a list of records describes.
func (r *Registry) Attach(recs []Record) ([]Context, error) {
	var out []Context
	for _, rec := range recs {
		d, err := r.Driver(rec.Kind)
		if err != nil {
			return nil, err
		}
		c, err := d.Attach(rec)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", rec, err)
		}
		out = append(out, c)
	}
	return out, nil
}
