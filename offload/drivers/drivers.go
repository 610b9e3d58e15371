package drivers

import (
	"context"
	"errors"
	"fmt"
	"github.com/cryo-hpc/cryo/internal/privilege"
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/cryo-hpc/cryo/offload"
	"github.com/cryo-hpc/cryo/offload/cuda"
	"github.com/cryo-hpc/cryo/offload/nvml"
)

// Config configures the default drivers.
type Config struct {
	// Getenv reads the environment (nil: os.Getenv). CRYO_LIBCUDA and
	// CRYO_LIBNVML override where libcuda.so.1 and libnvidia-ml.so.1 are.
	Getenv func(string) string
	Logger *slog.Logger
}

func (c Config) logger() *slog.Logger {
	if c.Logger != nil {
		return c.Logger
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// CUDA returns the CUDA driver configured from the environment, not yet
// opened: it loads its libraries at first use (see cuda.Driver.Open).
func CUDA(c Config) *cuda.Driver {
	getenv := c.Getenv
	if getenv == nil {
		getenv = os.Getenv
	}
	return cuda.New(cuda.Config{LibCUDA: c.library(getenv, "CRYO_LIBCUDA"), LibNVML: c.library(getenv, "CRYO_LIBNVML"), Logger: c.Logger})
}

// library is the library the environment variable names, or "" for the
// system's. As root, a library is loaded only from a path root alone can
// change (the variable may be one sudo kept, pointing into a user's
// directory): one that is not is ignored, and the system's loaded.
func (c Config) library(getenv func(string) string, name string) string {
	p := getenv(name)
	if p == "" || !privilege.Root() {
		return p
	}
	if err := privilege.Trusted(p); err != nil {
		c.logger().Warn("as root, cryo loads libraries only from paths root alone can change: using the system's", "variable", name, "err", err)
		return ""
	}
	return p
}

// Open opens every offload driver cryo has, for the whole process: the
// CUDA driver library is loaded and NVML initialised now, once. A kind
// whose libraries this node lacks (every CPU node) gets a null driver
// instead, which finds no contexts at no cost and says why it cannot
// restore or recover contexts a checkpoint recorded, so that no caller
// asks "is there NVML?" itself. The caller owns the registry: it passes
// it to every checkpoint, restore and recovery, and closes it when done
// (which shuts NVML down).
func Open(c Config) *offload.Registry {
	log := c.logger()
	t0 := time.Now()
	d := CUDA(c)
	if err := d.Open(); err != nil {
		st := d.Status() // what failed, for cryo gpus; loads nothing more
		d.Close()
		log.Debug("no NVIDIA driver on this node: no CUDA contexts to checkpoint", "err", err)
		return offload.NewRegistry(newNull(cuda.Kind, err, st))
	}
	log.Debug("offload drivers opened", "kinds", cuda.Kind, "took", time.Since(t0).Round(time.Microsecond))
	return offload.NewRegistry(d)
}

// Default returns a registry of every driver cryo has without opening it:
// each driver loads its libraries at its first use and is never closed.
// It is what checkpoint.Take and restore.Restore fall back on when given
// no registry; a process that owns its lifecycle uses Open.
func Default(c Config) *offload.Registry {
	return offload.NewRegistry(CUDA(c))
}

// Status describes the node's NVIDIA driver, GPUs and the processes on
// them as the registry's CUDA driver sees them, for people (cryo gpus).
func Status(reg *offload.Registry) cuda.Status {
	if d, err := reg.Driver(cuda.Kind); err == nil {
		if s, ok := d.(interface{ Status() cuda.Status }); ok {
			return s.Status()
		}
	}
	return cuda.Status{GPUs: []cuda.StatusGPU{}, CUDAProblem: "no CUDA driver registered", NVMLProblem: "no CUDA driver registered"}
}

// NVML returns the NVML that the registry's CUDA driver initialised, for
// watching GPU health in the same process without a second nvmlInit. It
// fails with nvml.ErrNoNVML where the node has no usable NVML. The
// registry's Close shuts it down.
func NVML(reg *offload.Registry) (*nvml.Lib, error) {
	d, err := reg.Driver(cuda.Kind)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", nvml.ErrNoNVML, err)
	}
	cd, ok := d.(*cuda.Driver)
	if !ok {
		return nil, fmt.Errorf("%w: no NVIDIA driver on this node", nvml.ErrNoNVML)
	}
	return cd.NVML()
}

// null is the driver of a kind whose libraries this node lacks: it finds
// no contexts, and everything it would do to a recorded one fails with
// why (which matches offload.ErrNoDriver).
type null struct {
	kind   string
	why    error
	status cuda.Status
}

func newNull(kind string, why error, st cuda.Status) *null {
	if !errors.Is(why, offload.ErrNoDriver) {
		why = fmt.Errorf("%w: %w", offload.ErrNoDriver, why)
	}
	return &null{kind: kind, why: why, status: st}
}

func (n *null) Kind() string { return n.kind }

// Discover finds nothing: without the libraries no process can hold a
// context of this kind.
func (n *null) Discover(context.Context, []int) ([]offload.Context, error) { return nil, nil }

// Attach returns a context whose every step fails with the reason.
func (n *null) Attach(rec offload.Record) (offload.Context, error) {
	if rec.Kind != n.kind {
		return nil, fmt.Errorf("%s driver cannot attach a %q context", n.kind, rec.Kind)
	}
	return &nullContext{rec: rec, why: n.why}, nil
}

// Inventory says that this node cannot take contexts of this kind.
func (n *null) Inventory(context.Context) (offload.Inventory, error) {
	return offload.Inventory{}, fmt.Errorf("this node cannot restore %s contexts: %w", n.kind, n.why)
}

// Status reports what failed to load.
func (n *null) Status() cuda.Status { return n.status }

type nullContext struct {
	rec offload.Record
	why error
}

func (c *nullContext) Record() offload.Record                           { return c.rec }
func (c *nullContext) State(context.Context) (offload.State, error)     { return 0, c.why }
func (c *nullContext) Lock(context.Context, time.Duration) error        { return c.why }
func (c *nullContext) Checkpoint(context.Context) error                 { return c.why }
func (c *nullContext) Restore(context.Context, offload.DeviceMap) error { return c.why }
func (c *nullContext) Unlock(context.Context) error                     { return c.why }
