package safefs

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// attack is a directory with things an attacker planted, next to a
// precious directory and file they point to.
type attack struct {
	dir, precious, secret string
}

func plant(t *testing.T) attack {
	t.Helper()
	a := attack{dir: t.TempDir(), precious: t.TempDir()}
	a.secret = filepath.Join(a.precious, "secret")
	must(t, os.WriteFile(a.secret, []byte("keep me"), 0o600))
	must(t, os.Symlink(a.precious, filepath.Join(a.dir, "linkdir")))
	must(t, os.Symlink(a.secret, filepath.Join(a.dir, "linkfile")))
	must(t, os.Mkdir(filepath.Join(a.dir, "real"), 0o700))
	must(t, os.Symlink(a.precious, filepath.Join(a.dir, "real", "inner")))
	must(t, os.WriteFile(filepath.Join(a.dir, "real", "state.json"), []byte(`{"state":"running"}`), 0o600))
	return a
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func (a attack) intact(t *testing.T) {
	t.Helper()
	if b, err := os.ReadFile(a.secret); err != nil || string(b) != "keep me" {
		t.Errorf("the file behind the links was touched: %q, %v", b, err)
	}
}

func open(t *testing.T, path string) *Dir {
	t.Helper()
	d, err := OpenDir(path)
	must(t, err)
	t.Cleanup(func() { d.Close() })
	return d
}

func TestRefusesLinks(t *testing.T) {
	a := plant(t)
	d := open(t, a.dir)
	if _, err := d.Open("linkdir"); !errors.Is(err, unix.ELOOP) && !errors.Is(err, unix.ENOTDIR) {
		t.Errorf("Open of a link to a directory: %v, want ELOOP", err)
	}
	if _, _, err := d.Mkdir("linkdir", 0o700); err == nil {
		t.Errorf("Mkdir over a link to a directory opened it")
	}
	if _, err := d.OpenFile("linkfile", os.O_WRONLY|os.O_APPEND, 0); !errors.Is(err, unix.ELOOP) {
		t.Errorf("OpenFile of a link to a file: %v, want ELOOP", err)
	}
	if _, err := d.OpenFile("new", os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600); err != nil {
		t.Errorf("OpenFile of a new file: %v", err)
	}
	for _, bad := range []string{"", ".", "..", "real/state.json", "/etc"} {
		if _, err := d.Open(bad); !errors.Is(err, ErrBadName) {
			t.Errorf("Open(%q): %v, want ErrBadName", bad, err)
		}
	}
	if _, err := d.Open("missing"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Open of a missing directory: %v, want ErrNotExist", err)
	}
	a.intact(t)
}

func TestMkdir(t *testing.T) {
	d := open(t, t.TempDir())
	sub, created, err := d.Mkdir("store", 0o700)
	must(t, err)
	sub.Close()
	if !created {
		t.Errorf("a new directory is not reported as created")
	}
	sub, created, err = d.Mkdir("store", 0o700)
	must(t, err)
	sub.Close()
	if created {
		t.Errorf("an existing directory is reported as created")
	}
}

func TestRemoveContentsDoesNotFollow(t *testing.T) {
	a := plant(t)
	d := open(t, a.dir)
	must(t, os.WriteFile(filepath.Join(a.dir, "journal"), []byte("x"), 0o600))
	n, err := d.RemoveContents("journal")
	must(t, err)
	if n != 3 {
		t.Errorf("removed %d entries, want 3 (two links and a directory)", n)
	}
	ents, _ := os.ReadDir(a.dir)
	if len(ents) != 1 || ents[0].Name() != "journal" {
		t.Errorf("left %v, want only journal", ents)
	}
	a.intact(t)
	if _, err := os.Stat(a.precious); err != nil {
		t.Errorf("the directory behind a link went: %v", err)
	}
}

func TestRemoveAllThroughRenamedParent(t *testing.T) {
	// The entry is removed in the directory that was opened, even when
	// its path now leads elsewhere.
	a := plant(t)
	base := t.TempDir()
	parent := filepath.Join(base, "p")
	must(t, os.Mkdir(parent, 0o700))
	must(t, os.WriteFile(filepath.Join(parent, "secret"), []byte("x"), 0o600))
	d := open(t, parent)
	must(t, os.Rename(parent, filepath.Join(base, "moved")))
	must(t, os.Symlink(a.precious, parent))
	must(t, d.RemoveAll("secret"))
	a.intact(t)
	if _, err := os.Stat(filepath.Join(base, "moved", "secret")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the opened directory's entry is still there: %v", err)
	}
}

func TestOpenBeneath(t *testing.T) {
	a := plant(t)
	d := open(t, a.dir)
	for _, fn := range []struct {
		name string
		open func(string) (*os.File, error)
	}{{"openat2", d.OpenBeneath}, {"walk", d.openWalk}} {
		t.Run(fn.name, func(t *testing.T) {
			f, err := fn.open("real/state.json")
			must(t, err)
			f.Close()
			for _, bad := range []string{"linkdir/secret", "linkfile", "real/inner/secret", "../x", "real/../../x"} {
				if f, err := fn.open(bad); err == nil {
					f.Close()
					t.Errorf("%s opened %q", fn.name, bad)
				}
			}
		})
	}
	if _, err := d.OpenBeneath("/etc/passwd"); err == nil {
		t.Errorf("an absolute path was opened")
	}
	b, err := d.ReadFileBeneath("real/state.json", 100)
	if err != nil || string(b) != `{"state":"running"}` {
		t.Errorf("ReadFileBeneath: %q, %v", b, err)
	}
	if _, err := d.ReadFileBeneath("real/state.json", 5); err == nil {
		t.Errorf("a file over the limit was read")
	}
}

func TestChownTree(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give files to another user")
	}
	a := plant(t)
	d := open(t, filepath.Join(a.dir, "real"))
	must(t, d.ChownTree(65534, 65534))
	for _, p := range []string{"real", "real/state.json", "real/inner"} {
		var st unix.Stat_t
		must(t, unix.Lstat(filepath.Join(a.dir, p), &st))
		if st.Uid != 65534 {
			t.Errorf("%s: uid %d, want 65534", p, st.Uid)
		}
	}
	fi, err := os.Stat(a.precious)
	must(t, err)
	if fi.Sys().(*syscall.Stat_t).Uid == 65534 {
		t.Errorf("ChownTree followed a link and gave away its target")
	}
}
