package cli_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cryo-hpc/cryo/internal/store"
)

// replicatedStore makes a store with one generation of a 3 MiB pages file
// and a small image, replicated into a second store.
func replicatedStore(t *testing.T) (dir, rep string, m *store.Manifest) {
	t.Helper()
	dir, rep = filepath.Join(t.TempDir(), "store"), filepath.Join(t.TempDir(), "replica")
	s, err := store.Create(dir, "cryo test")
	if err != nil {
		t.Fatal(err)
	}
	r, err := store.Create(rep, "cryo test")
	if err != nil {
		t.Fatal(err)
	}
	src := t.TempDir()
	data := make([]byte, 3<<20)
	for i := range data {
		data[i] = byte(i * 7 / 3)
	}
	if err := os.WriteFile(filepath.Join(src, "pages-1.img"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "core-1.img"), []byte("not really a core image"), 0o600); err != nil {
		t.Fatal(err)
	}
	s.PackLimit, r.PackLimit = 1, 1 // a pack per record: removing one loses one chunk
	w, err := s.NewWriterOpts(store.WriterOptions{Replica: r})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.AddFiles(context.Background(), []store.FileSpec{
		{Path: filepath.Join(src, "pages-1.img"), Name: "pages-1.img", Kind: "pages"},
		{Path: filepath.Join(src, "core-1.img"), Name: "core-1.img", Kind: "image"},
	}); err != nil {
		t.Fatal(err)
	}
	m = &store.Manifest{}
	if _, err := w.Commit(m); err != nil {
		t.Fatal(err)
	}
	return dir, rep, m
}

// chunkPath is the pack holding chunk c (alone: the stores are made with
// a pack per record).
func chunkPath(dir string, c store.Chunk) string {
	s, err := store.Open(dir)
	if err != nil {
		return ""
	}
	ps, _ := s.Packs()
	for _, p := range ps {
		for _, r := range p.Records {
			if r.Hash == c.Hash && r.Kind != "digests" {
				return p.Path
			}
		}
	}
	return ""
}

func TestRepairCommand(t *testing.T) {
	dir, rep, m := replicatedStore(t)
	c := m.Files[0].Chunks[1]
	if err := os.Remove(chunkPath(dir, c)); err != nil {
		t.Fatal(err)
	}
	if code, _, _ := run(t, "verify", "--store", dir); code != 1 {
		t.Fatalf("verify of a damaged store: exit %d", code)
	}
	code, stdout, stderr := run(t, "repair", "--store", dir, "--replica", rep)
	if code != 0 || !strings.Contains(stdout, "generation 1: repaired: 1 chunks restored from the replica") ||
		!strings.Contains(stdout, "pages-1.img: chunk 1") || !strings.Contains(stdout, "missing") {
		t.Fatalf("repair: exit %d\n%s%s", code, stdout, stderr)
	}
	if code, stdout, _ := run(t, "verify", "--store", dir); code != 0 {
		t.Errorf("verify after repair: exit %d\n%s", code, stdout)
	}

	// Missing in both: exit 1, and --json says what stays broken.
	for _, d := range []string{dir, rep} {
		if err := os.Remove(chunkPath(d, c)); err != nil {
			t.Fatal(err)
		}
	}
	code, stdout, stderr = run(t, "repair", "--store", dir, "--replica", rep, "--json")
	var res []store.RepairResult
	if err := json.Unmarshal([]byte(stdout), &res); err != nil || code != 1 || len(res) != 1 || res[0].Intact ||
		len(res[0].Broken) != 1 || res[0].Broken[0].Chunk != 1 {
		t.Errorf("repair with a chunk lost in both: exit %d (%v)\n%s%s", code, err, stdout, stderr)
	}
	if !strings.Contains(stderr, "still damaged") {
		t.Errorf("repair's error does not say what stays broken: %q", stderr)
	}
}

func TestRepairUsage(t *testing.T) {
	dir, rep, _ := replicatedStore(t)
	for _, args := range [][]string{
		{"repair", "--store", dir},
		{"repair", "--store", dir, "--replica", dir},
		{"repair", "--store", dir, "--replica", rep, "extra"},
		{"inspect", "--store", dir, "--generation", "-1"},
		{"checkpoint", "--store", dir, "--replica-required", "123"},
	} {
		if code, _, stderr := run(t, args...); code != 2 {
			t.Errorf("cryo %s: exit %d, want 2 (%s)", strings.Join(args, " "), code, stderr)
		}
	}
	missing := filepath.Join(t.TempDir(), "nowhere")
	if code, _, stderr := run(t, "repair", "--store", dir, "--replica", missing); code != 1 || !strings.Contains(stderr, "not a cryo store") {
		t.Errorf("repair from a missing replica: exit %d, %s", code, stderr)
	}
}

// TestInspectWithoutCRIUImages: inspect works on what it can read; the
// storage figures come from the manifest alone.
func TestInspectWithoutCRIUImages(t *testing.T) {
	dir, _, m := replicatedStore(t)
	code, stdout, stderr := run(t, "inspect", "--store", dir, "--json")
	if code != 0 {
		t.Fatalf("inspect: exit %d %s", code, stderr)
	}
	var r struct {
		Generation int `json:"generation"`
		Storage    struct {
			RawBytes    int64 `json:"raw_bytes"`
			StoredBytes int64 `json:"stored_bytes"`
			Chunks      int   `json:"chunks"`
			NewBytes    int64 `json:"new_bytes"`
		} `json:"storage"`
		Warnings []string `json:"warnings"`
	}
	if err := json.Unmarshal([]byte(stdout), &r); err != nil {
		t.Fatal(err)
	}
	if r.Generation != 1 || r.Storage.RawBytes != m.Stats.RawBytes || r.Storage.StoredBytes != m.Stats.StoredBytes ||
		r.Storage.Chunks != m.Stats.Chunks || r.Storage.NewBytes != m.Stats.NewBytes {
		t.Errorf("inspect storage %+v, manifest stats %+v", r.Storage, m.Stats)
	}
	if len(r.Warnings) == 0 || !strings.Contains(r.Warnings[0], "pstree.img") {
		t.Errorf("inspect of a store without CRIU images should warn that it has no process tree: %q", r.Warnings)
	}
	if code, stdout, _ := run(t, "inspect", "--store", dir); code != 0 || !strings.Contains(stdout, "storage:") {
		t.Errorf("inspect (text): exit %d\n%s", code, stdout)
	}
}
