package cryo_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cryo-hpc/cryo"
	"github.com/cryo-hpc/cryo/internal/store"
)

// twoGenerations makes a store with two generations of a 3 MiB pages file
// (sharing their chunks), without CRIU.
func twoGenerations(t *testing.T) (string, *store.Store, *store.Manifest) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "store")
	s, err := store.Create(dir, "cryo test")
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "pages-1.img")
	data := make([]byte, 3<<20)
	for i := range data {
		data[i] = byte(i * 7 / 3)
	}
	if err := os.WriteFile(img, data, 0o600); err != nil {
		t.Fatal(err)
	}
	var m *store.Manifest
	for range 2 {
		w, err := s.NewWriter()
		if err != nil {
			t.Fatal(err)
		}
		if err := w.AddFiles(context.Background(), []store.FileSpec{{Path: img, Name: "pages-1.img", Kind: "pages"}}); err != nil {
			t.Fatal(err)
		}
		m = &store.Manifest{Job: store.Job{RootPID: 777, Processes: []store.Process{{PID: 777}}}}
		if _, err := w.Commit(m); err != nil {
			t.Fatal(err)
		}
	}
	return dir, s, m
}

// Verify reports damage in its results (an error only when it cannot
// verify at all): a flipped chunk is named in both generations that share
// it, and a damaged manifest is the generation's Error.
func TestVerifyReportsDamage(t *testing.T) {
	dir, s, m := twoGenerations(t)
	ctx := context.Background()
	// Flip a bit near the end of the chunk's record in its pack.
	hash := m.Files[0].Chunks[1].Hash
	packs, err := s.Packs()
	if err != nil {
		t.Fatal(err)
	}
	p, at := "", int64(-1)
	for _, pk := range packs {
		for _, r := range pk.Records {
			if r.Hash == hash && r.Kind != "digests" {
				p, at = pk.Path, r.Offset+r.Len-3
			}
		}
	}
	if at < 0 {
		t.Fatalf("no pack holds chunk %s", hash)
	}
	b, _ := os.ReadFile(p)
	b[at] ^= 0x40
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	vs, err := cryo.Verify(ctx, cryo.VerifyOptions{Store: dir, Progress: &cryo.Progress{}})
	if err != nil || len(vs) != 2 {
		t.Fatalf("Verify: %+v, %v", vs, err)
	}
	for _, v := range vs {
		if v.Intact || len(v.Problems) != 1 || v.Problems[0].Chunk != 1 || !strings.HasPrefix(v.Problems[0].Path, p) {
			t.Errorf("generation %d: %+v; want chunk 1 (%s) named", v.Generation, v, p)
		}
	}
	mp := filepath.Join(s.GenDir(2), "manifest.json")
	mb, _ := os.ReadFile(mp)
	if err := os.WriteFile(mp, mb[:len(mb)/2], 0o600); err != nil {
		t.Fatal(err)
	}
	vs, err = cryo.Verify(ctx, cryo.VerifyOptions{Store: dir, Generation: 2})
	if err != nil || len(vs) != 1 || vs[0].Intact || vs[0].Error == "" {
		t.Errorf("Verify of a damaged manifest: %+v, %v; want it in Error", vs, err)
	}
	gens, err := cryo.List(ctx, dir)
	if err != nil || len(gens) != 2 || !gens[0].Intact || gens[1].Intact {
		t.Errorf("List: %+v, %v; want generation 1 intact by size, 2 broken", gens, err)
	}
	if _, err := cryo.Verify(ctx, cryo.VerifyOptions{Store: filepath.Join(dir, "nowhere")}); !errors.Is(err, cryo.ErrNoStore) {
		t.Errorf("Verify of a missing store: %v, want ErrNoStore", err)
	}
}

func TestRepairAndGC(t *testing.T) {
	dir, _, _ := twoGenerations(t)
	ctx := context.Background()
	if _, err := cryo.Repair(ctx, cryo.RepairOptions{Store: dir, Replica: dir + "/."}); !errors.Is(err, cryo.ErrSameStore) {
		t.Errorf("Repair from the store itself: %v, want ErrSameStore", err)
	}
	res, err := cryo.GC(ctx, cryo.GCOptions{Store: dir, Keep: 1})
	if err != nil || !slices.Equal(res.RemovedGenerations, []int{1}) || res.Chunks != 0 || res.Kept == 0 {
		t.Errorf("GC keeping 1: %+v, %v; want generation 1 removed, its chunks kept for generation 2", res, err)
	}
	gens, err := cryo.List(ctx, dir)
	if err != nil || len(gens) != 1 || gens[0].Number != 2 {
		t.Errorf("after GC: %+v, %v", gens, err)
	}
}

func TestRecoverNothing(t *testing.T) {
	dir, _, _ := twoGenerations(t)
	rs, err := cryo.Recover(context.Background(), cryo.RecoverOptions{Store: dir})
	if err != nil || rs == nil || len(rs) != 0 {
		t.Errorf("Recover of a store with no journals: %v, %v; want an empty list", rs, err)
	}
	if _, err := cryo.Recover(context.Background(), cryo.RecoverOptions{Store: filepath.Join(dir, "nowhere")}); !errors.Is(err, cryo.ErrNoStore) {
		t.Errorf("Recover of a missing store: %v, want ErrNoStore", err)
	}
}

// A pack size outside MinPackSize to MaxPackSize is refused before a
// checkpoint or GC does anything; 0 and the bounds themselves are taken.
func TestPackSizeBounds(t *testing.T) {
	dir, _, _ := twoGenerations(t)
	ctx := context.Background()
	for _, n := range []int64{cryo.MinPackSize - 1, cryo.MaxPackSize + 1, -1} {
		if _, err := cryo.GC(ctx, cryo.GCOptions{Store: dir, PackSize: n}); err == nil || !strings.Contains(err.Error(), "pack size") {
			t.Errorf("GC with a pack size of %d: %v, want it refused", n, err)
		}
		_, err := cryo.Checkpoint(ctx, cryo.CheckpointOptions{Store: dir, PID: os.Getppid(), CRIU: "/bin/true", PackSize: n})
		if err == nil || !strings.Contains(err.Error(), "pack size") {
			t.Errorf("Checkpoint with a pack size of %d: %v, want it refused", n, err)
		}
	}
	for _, n := range []int64{0, cryo.MinPackSize, cryo.MaxPackSize} {
		if _, err := cryo.GC(ctx, cryo.GCOptions{Store: dir, Repack: true, PackSize: n}); err != nil {
			t.Errorf("GC with a pack size of %d: %v", n, err)
		}
	}
	if gens, err := cryo.List(ctx, dir); err != nil || len(gens) != 2 || !gens[1].Intact {
		t.Errorf("after GC: %+v, %v", gens, err)
	}
}

// A store an older cryo wrote (internal/store/testdata/format1-store, see
// internal/store/format1_test.go) is listed and verifies through the API
// the commands use, and GC with Repack converts it; it is still listed and
// intact after.
func TestFormat1Store(t *testing.T) {
	src := filepath.Join("internal", "store", "testdata", "format1-store")
	dir := filepath.Join(t.TempDir(), "store")
	err := filepath.WalkDir(src, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(dir, rel), 0o700)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dir, rel), b, 0o600)
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	check := func(when string) {
		t.Helper()
		gens, err := cryo.List(ctx, dir)
		if err != nil || len(gens) != 1 || gens[0].Number != 1 || !gens[0].Intact || gens[0].Processes != 1 {
			t.Errorf("%s: List: %+v, %v; want generation 1, intact, of one process", when, gens, err)
		}
		vs, err := cryo.Verify(ctx, cryo.VerifyOptions{Store: dir})
		if err != nil || len(vs) != 1 || !vs[0].Intact {
			t.Errorf("%s: Verify: %+v, %v", when, vs, err)
		}
	}
	check("as the old cryo wrote it")
	res, err := cryo.GC(ctx, cryo.GCOptions{Store: dir, Repack: true})
	if err != nil || res.ChunkFiles != 15 || res.PacksWritten == 0 {
		t.Errorf("GC with Repack: %+v, %v; want the 15 chunk files packed", res, err)
	}
	check("converted")
}
