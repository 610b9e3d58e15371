package store

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The attacks of a user who can write a store that root works on: each
// replaces a piece of the store with a symbolic link to somewhere else
// (a directory root alone may write, stood in for by victim), and each
// must fail to create, change or remove anything there. Every attack runs
// with openat2 and with its fallback (O_NOFOLLOW per component).

// tree is what a directory holds: each path with its mode and content.
func tree(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := os.Lstat(p)
		if err != nil {
			return err
		}
		v := info.Mode().String()
		if info.Mode().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			v += ":" + string(b)
		}
		out[p] = v
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// victim is a directory outside the store with files in it.
func victim(t *testing.T) (string, map[string]string) {
	t.Helper()
	v := filepath.Join(t.TempDir(), "victim")
	mkdir(t, filepath.Join(v, "sub"))
	writeFile(t, filepath.Join(v, "passwd"), []byte("root:x:0:0"))
	writeFile(t, filepath.Join(v, "sub", "keep"), []byte("keep me"))
	writeFile(t, filepath.Join(v, strings.Repeat("ab", 32)), []byte("named like a chunk"))
	writeFile(t, filepath.Join(v, strings.Repeat("cd", 16)+".pack"), []byte("named like a pack"))
	return v, tree(t, v)
}

func unchanged(t *testing.T, v string, before map[string]string, what string) {
	t.Helper()
	after := tree(t, v)
	for p, b := range before {
		if a, ok := after[p]; !ok {
			t.Errorf("%s: %s was removed", what, p)
		} else if a != b {
			t.Errorf("%s: %s was changed", what, p)
		}
	}
	for p := range after {
		if _, ok := before[p]; !ok {
			t.Errorf("%s: %s was created", what, p)
		}
	}
}

func plant(t *testing.T, link, target string) {
	t.Helper()
	if err := os.RemoveAll(link); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

func bothResolvers(t *testing.T, fn func(t *testing.T)) {
	for _, fallback := range []bool{false, true} {
		t.Run(map[bool]string{false: "openat2", true: "nofollow"}[fallback], func(t *testing.T) {
			noOpenat2.Store(fallback)
			defer noOpenat2.Store(false)
			fn(t)
		})
	}
}

// storeWithGen is a store with one committed generation.
func storeWithGen(t *testing.T) (*Store, *Manifest) {
	t.Helper()
	s := newStore(t)
	_, m := commit(t, s, writeSpecs(t, t.TempDir(), map[string][]byte{"core-1.img": randBytes(1, 5000)}), nil)
	return s, m
}

func TestAttackStagingLink(t *testing.T) {
	bothResolvers(t, func(t *testing.T) {
		s, _ := storeWithGen(t)
		v, before := victim(t)
		plant(t, filepath.Join(s.Dir, "staging"), v)
		if _, err := s.CleanStaging(); err == nil {
			t.Error("CleanStaging went through a staging that is a link")
		}
		if w, err := s.NewWriter(); err == nil {
			w.Abort()
			t.Error("a writer started in a staging that is a link")
		}
		if err := s.Remove(1); err == nil {
			t.Error("Remove moved a generation into a staging that is a link")
		}
		unchanged(t, v, before, "staging -> victim")
	})
}

func TestAttackLinksInStaging(t *testing.T) {
	bothResolvers(t, func(t *testing.T) {
		s, _ := storeWithGen(t)
		v, before := victim(t)
		plant(t, filepath.Join(s.Dir, "staging", "gen-1234"), v)
		plant(t, filepath.Join(s.Dir, "staging", "removing-7"), filepath.Join(v, "passwd"))
		plant(t, filepath.Join(s.Dir, "packs", "0123.tmp"), filepath.Join(v, "passwd"))
		n, err := s.CleanStaging()
		if err != nil || n != 3 {
			t.Errorf("CleanStaging: %d entries, %v; want the 3 links removed", n, err)
		}
		unchanged(t, v, before, "links in staging")
	})
}

func TestAttackLockLink(t *testing.T) {
	bothResolvers(t, func(t *testing.T) {
		s, _ := storeWithGen(t)
		v, before := victim(t)
		for _, target := range []string{filepath.Join(v, "nologin"), filepath.Join(v, "passwd")} {
			plant(t, filepath.Join(s.Dir, "lock"), target)
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			if unlock, err := s.Lock(ctx, true); err == nil {
				unlock()
				t.Errorf("Lock went through lock -> %s", target)
			}
			cancel()
		}
		unchanged(t, v, before, "lock -> victim")
	})
}

func TestAttackLogsLink(t *testing.T) {
	bothResolvers(t, func(t *testing.T) {
		s, _ := storeWithGen(t)
		v, before := victim(t)
		src := filepath.Join(t.TempDir(), "criu.log")
		writeFile(t, src, []byte("Error (criu): something"))
		plant(t, filepath.Join(s.Dir, "logs"), v)
		if _, err := s.SaveLog("dump", src, 1<<20); err == nil {
			t.Error("SaveLog wrote into logs -> victim")
		}
		unchanged(t, v, before, "logs -> victim")

		// Old logs that are links: trimming removes the links alone.
		if err := os.Remove(filepath.Join(s.Dir, "logs")); err != nil {
			t.Fatal(err)
		}
		mkdir(t, filepath.Join(s.Dir, "logs"))
		for i := range maxLogs + 3 {
			plant(t, filepath.Join(s.Dir, "logs", "20000101T0000"+string(rune('a'+i))+"-dump.log"), filepath.Join(v, "passwd"))
		}
		if _, err := s.SaveLog("dump", src, 1<<20); err != nil {
			t.Fatal(err)
		}
		unchanged(t, v, before, "links in logs")
	})
}

func TestAttackGCLinks(t *testing.T) {
	bothResolvers(t, func(t *testing.T) {
		s, m := storeWithGen(t)
		v, before := victim(t)
		// Chunk directories of a format-1 store, and a pack, as links.
		mkdir(t, filepath.Join(s.Dir, "chunks"))
		plant(t, filepath.Join(s.Dir, "chunks", "ab"), v)
		plant(t, filepath.Join(s.Dir, "packs", strings.Repeat("ef", 16)+".pack"), filepath.Join(v, strings.Repeat("cd", 16)+".pack"))
		if _, err := s.GCWith(GCOptions{Repack: true}); err == nil {
			t.Log("gc went on past the links (removing only them)")
		}
		unchanged(t, v, before, "gc with links")
		if ps := s.Verify(context.Background(), m); len(ps) > 0 {
			t.Errorf("the generation no longer verifies: %v", ps)
		}

		// The whole packs directory as a link: nothing read there counts,
		// nothing there is removed.
		s2, _ := storeWithGen(t)
		real := filepath.Join(t.TempDir(), "packs")
		if err := os.Rename(filepath.Join(s2.Dir, "packs"), real); err != nil {
			t.Fatal(err)
		}
		plant(t, filepath.Join(s2.Dir, "packs"), v)
		if _, err := s2.GC(); err == nil {
			t.Error("gc went through packs -> victim")
		}
		unchanged(t, v, before, "packs -> victim")
	})
}

func TestAttackGenerationLink(t *testing.T) {
	bothResolvers(t, func(t *testing.T) {
		s, _ := storeWithGen(t)
		v, _ := victim(t)
		// A generation directory replaced by a link to a directory with a
		// manifest-looking file: not a generation, and retention removes
		// the link, not what it points to.
		writeFile(t, filepath.Join(v, "manifest.json"), readFile(t, filepath.Join(s.GenDir(1), "manifest.json")))
		before := tree(t, v)
		plant(t, filepath.Join(s.Dir, "checkpoints", "2"), v)
		gens, err := s.Generations()
		if err != nil || len(gens) != 1 {
			t.Errorf("Generations = %v, %v; a link is no generation", gens, err)
		}
		if _, err := s.ReadManifest(2); err == nil {
			t.Error("ReadManifest read a manifest through a link")
		}
		if err := s.Remove(2); err != nil {
			t.Errorf("Remove of the link: %v", err)
		}
		unchanged(t, v, before, "checkpoints/2 -> victim")
	})
}

func TestAttackReplicaLinks(t *testing.T) {
	bothResolvers(t, func(t *testing.T) {
		s, rep := newStore(t), newStore(t)
		v, before := victim(t)
		plant(t, filepath.Join(rep.Dir, "staging"), v)
		_, w, err := commitWith(t, s, rep, false, writeSpecs(t, t.TempDir(), map[string][]byte{"a.img": randBytes(9, 3000)}))
		if err != nil {
			t.Fatalf("the store's commit failed with a broken replica: %v", err)
		}
		if w.ReplicaErr() == nil {
			t.Error("the replica took a generation through staging -> victim")
		}
		unchanged(t, v, before, "replica staging -> victim")
	})
}

// TestAttackManifestNames: a manifest (sealed, so its checksums hold)
// naming files outside the directory it is materialized into, or trees
// that climb out, is refused when read, and nothing is written outside.
func TestAttackManifestNames(t *testing.T) {
	for _, name := range []string{"../escape.img", "/etc/escape.img", "a/../../escape.img", "tree-1/../../x", "a//b", "./a", "x\x00y", "\n"} {
		s, m := storeWithGen(t)
		m.Files[0].Name = name
		b, err := m.seal()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := parseManifest(b); err == nil {
			t.Errorf("a manifest naming %q was accepted", name)
		}
		_ = s
	}
	s, m := storeWithGen(t)
	m.Job.Trees = []string{"../up"}
	if b, err := m.seal(); err == nil {
		if _, err := parseManifest(b); err == nil {
			t.Error("a manifest with tree ../up was accepted")
		}
	}
	_ = s
}
