package cuda

import (
	"fmt"
	"os"
	"os/exec"
	"testing"

	"github.com/cryo-hpc/cryo/offload/cuda/cudatest"
)

// fakeBuild is where TestMain compiled the fake driver once for all tests
// ("" when gcc is missing: then buildFake skips, or fails under
// CRYO_NO_SKIP=1).
var fakeBuild string

func TestMain(m *testing.M) {
	if _, err := exec.LookPath("gcc"); err == nil {
		dir, err := os.MkdirTemp("", "cryo-fakecuda-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		if err := cudatest.Compile(dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.RemoveAll(dir)
			os.Exit(1)
		}
		fakeBuild = dir
	}
	code := m.Run()
	if fakeBuild != "" {
		os.RemoveAll(fakeBuild)
	}
	os.Exit(code)
}

// buildFake gives the test a fake driver world of its own.
func buildFake(t *testing.T) *cudatest.Fake {
	t.Helper()
	if fakeBuild == "" {
		return cudatest.Build(t) // skips or fails, saying why
	}
	return cudatest.New(t, fakeBuild)
}
