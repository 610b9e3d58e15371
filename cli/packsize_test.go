package cli_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cryo-hpc/cryo/cli"
	"github.com/cryo-hpc/cryo/internal/store"
)

// TestPackSizeFlag: --pack-size takes a byte count or a size with K, M, G
// or KiB, MiB, GiB from 1 MiB to 64 GiB; anything else is refused, before
// anything is done, with exit 2 and one line naming the flag.
func TestPackSizeFlag(t *testing.T) {
	dir, _ := storeWithGeneration(t)
	for _, ok := range []string{"1MiB", "1048576", "1024K", "64MiB", "256M", "1GiB", "64G", "64GiB"} {
		if code, _, stderr := run(t, "gc", "--store", dir, "--pack-size", ok); code != 0 {
			t.Errorf("gc --pack-size %s: exit %d, %q", ok, code, stderr)
		}
	}
	for _, bad := range []string{"0", "1048575", "512KiB", "1023K", "65GiB", "68719476737", "lots", "64MB", "1.5GiB", "-1M", "GiB"} {
		for _, args := range [][]string{
			{"gc", "--store", dir, "--pack-size", bad},
			{"checkpoint", "--criu=/bin/true", "--store", dir, "--pack-size", bad, "1"},
		} {
			code, stdout, stderr := run(t, args...)
			lines := strings.Split(strings.TrimSuffix(stderr, "\n"), "\n")
			if code != cli.ExitUsage || len(lines) != 1 || !strings.HasPrefix(stderr, "cryo: --pack-size: ") || stdout != "" {
				t.Errorf("cryo %s: exit %d, stdout %q, stderr %q; want exit 2 and one line naming --pack-size", strings.Join(args, " "), code, stdout, stderr)
			}
		}
	}
}

// TestGCPackSize: the packs `cryo gc --repack --pack-size` writes keep to
// the size given: the chunks that the generation kept shares with the one
// removed go from their pack to new packs of at most 1 MiB each (but one
// whose single chunk is larger, stored raw).
func TestGCPackSize(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "store")
	s, err := store.Create(dir, "cryo test")
	if err != nil {
		t.Fatal(err)
	}
	src := t.TempDir()
	// 4 MiB that do not compress; the second generation changes the
	// second half of them.
	data := make([]byte, 4<<20)
	x := uint64(12345)
	random := func(b []byte) {
		for i := range b {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			b[i] = byte(x >> 24)
		}
	}
	random(data)
	for gen := range 2 {
		if gen == 1 {
			random(data[2<<20:])
		}
		img := filepath.Join(src, "pages-1.img")
		if err := os.WriteFile(img, data, 0o600); err != nil {
			t.Fatal(err)
		}
		w, err := s.NewWriter()
		if err != nil {
			t.Fatal(err)
		}
		if err := w.AddFiles(context.Background(), []store.FileSpec{{Path: img, Name: "pages-1.img", Kind: "pages"}}); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Commit(&store.Manifest{Job: store.Job{RootPID: 777, Processes: []store.Process{{PID: 777}}}}); err != nil {
			t.Fatal(err)
		}
	}
	before := map[string]bool{}
	packs, err := s.Packs()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range packs {
		before[p.Name] = true
	}
	if code, _, stderr := run(t, "gc", "--store", dir, "--keep", "1", "--repack", "--pack-size", "1MiB"); code != 0 {
		t.Fatalf("gc: exit %d, %q", code, stderr)
	}
	s, err = store.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	packs, err = s.Packs()
	if err != nil {
		t.Fatal(err)
	}
	written := 0
	for _, p := range packs {
		if before[p.Name] {
			continue
		}
		written++
		if p.Size > 1<<20 && len(p.Records) > 1 {
			t.Errorf("%s: %d bytes in %d records, over --pack-size", p.Name, p.Size, len(p.Records))
		}
	}
	if written < 2 {
		t.Errorf("the 2 MiB of chunks repacked went into %d packs, want one per chunk", written)
	}
	if code, _, stderr := run(t, "verify", "--store", dir); code != 0 {
		t.Errorf("verify after repacking: exit %d, %q", code, stderr)
	}
}
