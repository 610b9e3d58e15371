package cuda

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cryo-hpc/cryo/offload"
	"github.com/cryo-hpc/cryo/offload/nvml"
)

// Kind is the offload kind of CUDA contexts.
const Kind = "cuda"

// api is the CUDA driver as the Driver uses it (*Lib; a fake in tests).
type api interface {
	Version() int
	Layout() Layout
	APIError() error
	RemapError() error
	State(pid int) (offload.State, error)
	Lock(pid int, timeout time.Duration) error
	Checkpoint(pid int) error
	Restore(pid int, pairs []Pair) error
	Unlock(pid int) error
	Devices() ([]DeviceInfo, error)
}

// GPUSource is what the Driver needs from NVML (*nvml.Lib).
type GPUSource interface {
	Info() (nvml.Info, error)
	Holders(pids []int) (map[int][]nvml.Use, error)
}

// Config says where the driver's libraries are.
type Config struct {
	// LibCUDA is the CUDA driver library (default libcuda.so.1; CRYO_LIBCUDA).
	LibCUDA string
	// LibNVML is the NVML library (default libnvidia-ml.so.1; CRYO_LIBNVML).
	LibNVML string
	// NVML, when set, is used instead of loading LibNVML.
	NVML   GPUSource
	Logger *slog.Logger
}

// Driver is the offload.Driver of CUDA contexts. It loads NVML and the CUDA
// driver lazily, once, and only when it needs them: on a node without them
// (every CPU node) Discover costs two failed dlopen calls and finds nothing.
type Driver struct {
	cfg      Config
	log      *slog.Logger
	openAPI  func(path string) (api, error)
	openNVML func(path string) (*nvml.Lib, error)

	apiOnce sync.Once
	a       api
	aErr    error
	nvOnce  sync.Once
	nv      GPUSource
	nvErr   error

	closeOnce sync.Once
	closed    atomic.Bool
	closeErr  error
}

// ErrClosed means the driver was used after Close.
var ErrClosed = errors.New("the CUDA driver was closed")

// New returns a CUDA driver.
func New(cfg Config) *Driver {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return &Driver{cfg: cfg, log: log, openAPI: func(p string) (api, error) { return Open(p) }, openNVML: nvml.Open}
}

// Kind is "cuda".
func (d *Driver) Kind() string { return Kind }

func (d *Driver) api() (api, error) {
	d.apiOnce.Do(func() {
		d.a, d.aErr = d.openAPI(d.cfg.LibCUDA)
		if d.aErr == nil {
			d.log.Debug("CUDA driver loaded", "lib", d.cfg.LibCUDA, "version", VersionString(d.a.Version()), "layout", d.a.Layout())
		}
	})
	return d.a, d.aErr
}

func (d *Driver) gpus() (GPUSource, error) {
	if d.closed.Load() {
		return nil, ErrClosed
	}
	d.nvOnce.Do(func() {
		if d.cfg.NVML != nil {
			d.nv = d.cfg.NVML
			return
		}
		l, err := d.openNVML(d.cfg.LibNVML)
		if err != nil {
			d.nvErr = err
			return
		}
		d.nv = l
	})
	return d.nv, d.nvErr
}

// Open loads the CUDA driver library and NVML now, instead of at their
// first use, so that a process loads and initialises them once. It fails
// only when neither loads, a node without an NVIDIA driver, with an error
// that matches ErrNoLibrary and nvml.ErrNoNVML; either alone is usable
// (see Discover). Its owner calls Close when done.
func (d *Driver) Open() error {
	_, aerr := d.api()
	_, nerr := d.gpus()
	if aerr != nil && nerr != nil {
		return errors.Join(aerr, nerr)
	}
	return nil
}

// Close shuts down the NVML that this driver initialised (nvmlShutdown),
// once; an NVML given in Config is its giver's to close. libcuda stays
// loaded: the CUDA driver cannot be unloaded safely. The driver must not
// be used afterwards (NVML calls then fail with ErrClosed).
func (d *Driver) Close() error {
	d.closeOnce.Do(func() {
		d.closed.Store(true)
		d.nvOnce.Do(func() { d.nvErr = ErrClosed }) // never loaded: never load it now
		if l, ok := d.nv.(*nvml.Lib); ok && d.cfg.NVML == nil {
			d.closeErr = l.Close()
		}
	})
	return d.closeErr
}

// NVML returns the NVML this driver loaded (for GPU health events), so
// that a process initialises NVML once. It fails with nvml.ErrNoNVML where
// NVML is not usable, and when Config gave an NVML that is not an
// *nvml.Lib.
func (d *Driver) NVML() (*nvml.Lib, error) {
	nv, err := d.gpus()
	if err != nil {
		return nil, err
	}
	l, ok := nv.(*nvml.Lib)
	if !ok {
		return nil, fmt.Errorf("%w: the driver was given an NVML of its own (%T)", nvml.ErrNoNVML, nv)
	}
	return l, nil
}

// Discover finds the CUDA contexts of the given processes. With NVML, a
// process holds a context when NVML lists it on a GPU, and its record names
// those GPUs and the device memory it holds. Without NVML (then the node is
// taken to have no GPUs as far as NVML goes), and if the CUDA driver loads,
// every process is asked for its checkpoint state: one whose state can be
// read is a CUDA process, with its GPUs unknown.
func (d *Driver) Discover(ctx context.Context, pids []int) ([]offload.Context, error) {
	nv, err := d.gpus()
	if nv != nil {
		holders, err := nv.Holders(pids)
		if err == nil {
			return d.discoverNVML(holders)
		}
		d.log.Warn("NVML could not list GPU processes; asking the CUDA driver instead", "err", err)
	} else if !errors.Is(err, nvml.ErrNoNVML) {
		d.log.Warn("NVML", "err", err)
	}
	return d.discoverState(pids)
}

func (d *Driver) discoverNVML(holders map[int][]nvml.Use) ([]offload.Context, error) {
	if len(holders) == 0 {
		return nil, nil
	}
	var held []int
	for pid := range holders {
		held = append(held, pid)
	}
	sort.Ints(held)
	a, err := d.api()
	if err == nil {
		err = a.APIError()
	}
	if err != nil {
		var where []string
		for _, pid := range held {
			for _, u := range holders[pid] {
				where = append(where, fmt.Sprintf("pid %d on GPU %d", pid, u.GPU.Index))
			}
		}
		return nil, fmt.Errorf("the job holds CUDA contexts (%s) that cannot be checkpointed: %w", strings.Join(where, ", "), err)
	}
	var out []offload.Context
	for _, pid := range held {
		rec := offload.Record{Kind: Kind, PID: pid}
		for _, u := range holders[pid] {
			rec.Devices = append(rec.Devices, offload.Device{UUID: u.GPU.UUID, Model: u.GPU.Model, Index: u.GPU.Index, Memory: u.Memory})
		}
		out = append(out, &cudaContext{d: d, rec: rec})
	}
	return out, nil
}

func (d *Driver) discoverState(pids []int) ([]offload.Context, error) {
	a, err := d.api()
	if errors.Is(err, ErrNoLibrary) {
		return nil, nil // a node without an NVIDIA driver
	}
	if err != nil {
		return nil, err
	}
	if err := a.APIError(); err != nil {
		if IsCode(err, ErrNoDevice) {
			return nil, nil
		}
		d.log.Warn("the CUDA driver cannot checkpoint: if the job uses CUDA, its GPU state is not saved", "err", err)
		return nil, nil
	}
	var out []offload.Context
	for _, pid := range pids {
		st, err := a.State(pid)
		if err != nil {
			if !errors.Is(err, offload.ErrNoContext) {
				d.log.Debug("not a CUDA process", "pid", pid, "err", err)
			}
			continue
		}
		d.log.Debug("CUDA process", "pid", pid, "state", st)
		out = append(out, &cudaContext{d: d, rec: offload.Record{Kind: Kind, PID: pid}})
	}
	return out, nil
}

// Attach returns the context of a record.
func (d *Driver) Attach(rec offload.Record) (offload.Context, error) {
	if rec.Kind != Kind {
		return nil, fmt.Errorf("cuda driver cannot attach a %q context", rec.Kind)
	}
	if rec.PID <= 0 {
		return nil, fmt.Errorf("cuda context record has no pid")
	}
	return &cudaContext{d: d, rec: rec}, nil
}

// Inventory lists this node's GPUs: from NVML with free memory, else from
// the CUDA driver (free memory unknown).
func (d *Driver) Inventory(ctx context.Context) (offload.Inventory, error) {
	var inv offload.Inventory
	a, aerr := d.api()
	if aerr == nil {
		aerr = a.APIError()
	}
	if aerr != nil {
		return inv, fmt.Errorf("this node cannot restore CUDA contexts: %w", aerr)
	}
	if rerr := a.RemapError(); rerr != nil {
		inv.RemapWhy = strings.TrimPrefix(rerr.Error(), offload.ErrRemapUnsupported.Error()+": ")
	} else {
		inv.CanRemap = true
	}
	if nv, _ := d.gpus(); nv != nil {
		info, err := nv.Info()
		if err == nil {
			for _, g := range info.GPUs {
				inv.GPUs = append(inv.GPUs, offload.GPU{Index: g.Index, UUID: g.UUID, Model: g.Model,
					MemoryTotal: g.MemoryTotal, MemoryFree: g.MemoryFree, FreeKnown: true})
			}
			return inv, nil
		}
		d.log.Warn("NVML could not list GPUs; asking the CUDA driver", "err", err)
	}
	devs, err := a.Devices()
	if err != nil {
		return inv, err
	}
	for _, g := range devs {
		inv.GPUs = append(inv.GPUs, offload.GPU{Index: g.Index, UUID: g.UUID, Model: g.Model, MemoryTotal: g.Memory, MemoryFree: g.Memory})
	}
	return inv, nil
}

// cudaContext is the CUDA state of one process.
type cudaContext struct {
	d   *Driver
	rec offload.Record
}

func (c *cudaContext) Record() offload.Record { return c.rec }

func (c *cudaContext) lib() (api, error) {
	a, err := c.d.api()
	if err != nil {
		return nil, err
	}
	return a, a.APIError()
}

func (c *cudaContext) State(context.Context) (offload.State, error) {
	a, err := c.lib()
	if err != nil {
		return 0, err
	}
	return a.State(c.rec.PID)
}

func (c *cudaContext) Lock(_ context.Context, timeout time.Duration) error {
	a, err := c.lib()
	if err != nil {
		return err
	}
	return a.Lock(c.rec.PID, timeout)
}

func (c *cudaContext) Checkpoint(context.Context) error {
	a, err := c.lib()
	if err != nil {
		return err
	}
	return a.Checkpoint(c.rec.PID)
}

// Restore restores onto m: when m moves none of the context's GPUs, with no
// pairs (the same GPUs; any driver); else with a pair for every GPU the
// context held, as the driver requires.
func (c *cudaContext) Restore(_ context.Context, m offload.DeviceMap) error {
	a, err := c.lib()
	if err != nil {
		return err
	}
	pairs, err := pairsFor(c.rec, m)
	if err != nil {
		return err
	}
	return a.Restore(c.rec.PID, pairs)
}

func (c *cudaContext) Unlock(context.Context) error {
	a, err := c.lib()
	if err != nil {
		return err
	}
	return a.Unlock(c.rec.PID)
}

// pairsFor turns a device map into the driver's GPU pairs for one context.
// A context whose GPUs were not recorded gets the whole map.
func pairsFor(rec offload.Record, m offload.DeviceMap) ([]Pair, error) {
	var olds []string
	if len(rec.Devices) > 0 {
		for _, dev := range rec.Devices {
			olds = append(olds, dev.UUID)
		}
	} else {
		for o := range m {
			olds = append(olds, o)
		}
		sort.Strings(olds)
	}
	moves := false
	var pairs []Pair
	for _, o := range olds {
		n := m.Target(o)
		if !strings.EqualFold(o, n) {
			moves = true
		}
		ou, err := ParseUUID(o)
		if err != nil {
			return nil, err
		}
		nu, err := ParseUUID(n)
		if err != nil {
			return nil, err
		}
		pairs = append(pairs, Pair{Old: ou, New: nu})
	}
	if !moves {
		return nil, nil
	}
	return pairs, nil
}
