package drivers

import (
	"log/slog"
	"os"

	"github.com/cryo-hpc/cryo/offload"
	"github.com/cryo-hpc/cryo/offload/cuda"
)

// Config configures the default drivers.
type Config struct {
	// Getenv reads the environment (nil: os.Getenv). CRYO_LIBCUDA and
	// CRYO_LIBNVML override where libcuda.so.1 and libnvidia-ml.so.1 are.
	Getenv func(string) string
	Logger *slog.Logger
}

// CUDA returns the CUDA driver configured from the environment.
func CUDA(c Config) *cuda.Driver {
	getenv := c.Getenv
	if getenv == nil {
		getenv = os.Getenv
	}
	return cuda.New(cuda.Config{LibCUDA: getenv("CRYO_LIBCUDA"), LibNVML: getenv("CRYO_LIBNVML"), Logger: c.Logger})
}

// Default returns a registry of every driver cryo has: today, CUDA.
// Drivers load their libraries lazily, so building it costs nothing.
func Default(c Config) *offload.Registry {
	return offload.NewRegistry(CUDA(c))
}
