package tmpfs

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/cryo-hpc/cryo/internal/privilege"
	"golang.org/x/sys/unix"
)

func TestParseMapsLine(t *testing.T) {
	tests := []struct {
		line string
		ok   bool
		path string
		dev  uint64
		ino  uint64
	}{
		{"7f0000000000-7f0000040000 rw-s 00000000 00:1a 1234                       /dev/shm/vader_segment.host.0", true, "/dev/shm/vader_segment.host.0", unix.Mkdev(0, 0x1a), 1234},
		{"7f0000000000-7f0000001000 r--p 00000000 fd:01 99 /tmp/a file with spaces", true, "/tmp/a file with spaces", unix.Mkdev(0xfd, 1), 99},
		{"7f0000000000-7f0000040000 rw-s 00000000 00:1a 1234   /dev/shm/gone (deleted)", false, "", 0, 0},
		{"7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]", false, "", 0, 0},
		{"7f0000000000-7f0000001000 rw-p 00000000 00:00 0 ", false, "", 0, 0},
		{"7f0000000000-7f0000040000 rw-s 00000000 00:01 7   /SYSV00000000 (deleted)", false, "", 0, 0},
		{"garbage", false, "", 0, 0},
		{"a b c zz:1 5 /x", false, "", 0, 0},
	}
	for _, tc := range tests {
		u, ok := parseMapsLine(tc.line)
		if ok != tc.ok || ok && (u.path != tc.path || u.dev != tc.dev || u.ino != tc.ino) {
			t.Errorf("%q: %+v %v, want %q dev %d ino %d %v", tc.line, u, ok, tc.path, tc.dev, tc.ino, tc.ok)
		}
	}
}

const digest0 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

// A record is data from a store: Decode refuses what no checkpoint writes.
func TestDecodeRefuses(t *testing.T) {
	good := `{"files":[{"path":"/dev/shm/a","mode":384,"uid":1,"gid":1,"size":0,"sha256":"` + digest0 + `"}],"dirs":[{"path":"/dev/shm/d","mode":448}]}`
	if _, err := Decode([]byte(good)); err != nil {
		t.Fatalf("a good record: %v", err)
	}
	for name, rec := range map[string]string{
		"not json":       `{`,
		"relative path":  `{"files":[{"path":"dev/shm/a","sha256":"` + digest0 + `"}]}`,
		"dot dot":        `{"files":[{"path":"/dev/shm/../../etc/passwd","sha256":"` + digest0 + `"}]}`,
		"the root":       `{"files":[{"path":"/","sha256":"` + digest0 + `"}]}`,
		"control chars":  `{"files":[{"path":"/dev/shm/a\n","sha256":"` + digest0 + `"}]}`,
		"twice":          `{"files":[{"path":"/a","sha256":"` + digest0 + `"},{"path":"/a","sha256":"` + digest0 + `"}]}`,
		"file and dir":   `{"files":[{"path":"/a","sha256":"` + digest0 + `"}],"dirs":[{"path":"/a"}]}`,
		"negative size":  `{"files":[{"path":"/a","size":-1,"sha256":"` + digest0 + `"}]}`,
		"huge size":      `{"files":[{"path":"/a","size":9000000000,"sha256":"` + digest0 + `"}]}`,
		"too much":       `{"files":[{"path":"/a","size":3000000000,"sha256":"` + digest0 + `"},{"path":"/b","size":3000000000,"sha256":"` + digest0 + `"}]}`,
		"file type bits": `{"files":[{"path":"/a","mode":33188,"sha256":"` + digest0 + `"}]}`,
		"bad digest":     `{"files":[{"path":"/a","sha256":"xyz"}]}`,
	} {
		if _, err := Decode([]byte(rec)); !errors.Is(err, ErrBadRecord) {
			t.Errorf("%s: %v, want ErrBadRecord", name, err)
		}
	}
	if _, err := Decode(bytes.Repeat([]byte(" "), MaxRecord+1)); !errors.Is(err, ErrBadRecord) {
		t.Errorf("an oversized record: %v", err)
	}
}

// shmDir is a fresh directory on the node's /dev/shm (a tmpfs), removed at
// the end of the test.
func shmDir(t *testing.T) string {
	t.Helper()
	var fs unix.Statfs_t
	if err := unix.Statfs("/dev/shm", &fs); err != nil || fs.Type != unix.TMPFS_MAGIC {
		t.Skip("/dev/shm is not a tmpfs here")
	}
	d, err := os.MkdirTemp("/dev/shm", "cryo-tmpfs-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// ours keeps the files Scan found below dir (the test process may use
// others).
func ours(found []Found, dir string) []Found {
	var out []Found
	for _, f := range found {
		if strings.HasPrefix(f.Path, dir+"/") {
			out = append(out, f)
		}
	}
	return out
}

// reader serves the saved parts as a generation would.
func reader(s *Saved) func(string, int64) ([]byte, error) {
	parts := map[string]string{}
	for i, f := range s.Record.Files {
		for k := 0; k < Parts(f.Size); k++ {
			parts[DataName(i, k)] = s.PartPath(i, k)
		}
	}
	return func(name string, n int64) ([]byte, error) {
		p, ok := parts[name]
		if !ok {
			return nil, errors.New("no part " + name)
		}
		b, err := os.ReadFile(p)
		if int64(len(b)) > n {
			b = b[:n]
		}
		return b, err
	}
}

// The whole round: a process maps one tmpfs file (its descriptor closed),
// holds another open for reading and writing and a third for appending,
// and holds a deleted one and a file elsewhere. Scan finds the three,
// Save copies them, and after the files are deleted or changed Recreate
// brings them back as they were, directories included; the appended one
// is left as it is when present. A second Recreate finds nothing to do.
func TestScanSaveRecreate(t *testing.T) {
	dir := shmDir(t)
	deep := filepath.Join(dir, "sub", "deeper")
	if err := os.MkdirAll(deep, 0o750); err != nil {
		t.Fatal(err)
	}
	os.Chmod(filepath.Join(dir, "sub"), 0o710)
	seg, held, logf, gone := filepath.Join(deep, "seg"), filepath.Join(dir, "held"), filepath.Join(dir, "log"), filepath.Join(dir, "gone")
	segData := bytes.Repeat([]byte("segment!"), 3*PartSize/8+123) // more than one part
	if err := os.WriteFile(seg, segData, 0o640); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(seg, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	mem, err := syscall.Mmap(int(f.Fd()), 0, len(segData), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	defer func() { syscall.Munmap(mem) }()
	hf := openWith(t, held, os.O_RDWR|os.O_CREATE, []byte("held data"))
	lf := openWith(t, logf, os.O_WRONLY|os.O_CREATE|os.O_APPEND, []byte("line 1\n"))
	gf := openWith(t, gone, os.O_RDWR|os.O_CREATE, []byte("deleted"))
	os.Remove(gone)
	elsewhere := openWith(t, filepath.Join(t.TempDir(), "disk"), os.O_RDWR|os.O_CREATE, []byte("disk"))
	defer func() {
		for _, c := range []*os.File{hf, lf, gf, elsewhere} {
			c.Close()
		}
	}()

	found, err := Scan([]int{os.Getpid()})
	if err != nil {
		t.Fatal(err)
	}
	found = ours(found, dir)
	var paths []string
	for _, f := range found {
		paths = append(paths, f.Path)
		if f.AppendOnly != (f.Path == logf) {
			t.Errorf("%s: append only %v", f.Path, f.AppendOnly)
		}
	}
	if strings.Join(paths, " ") != strings.Join([]string{seg, held, logf}, " ") && strings.Join(paths, " ") != strings.Join([]string{held, logf, seg}, " ") {
		t.Fatalf("Scan found %v, want %s, %s and %s", paths, seg, held, logf)
	}
	s, err := Save(found, t.TempDir())
	if err != nil || len(s.Skipped) > 0 {
		t.Fatalf("Save: %v (skipped %v)", err, s.Skipped)
	}
	rec, err := s.Seal()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := Encode(rec)
	if rec, err = Decode(b); err != nil {
		t.Fatalf("the record does not decode: %v", err)
	}
	var dirs []string
	for _, d := range rec.Dirs {
		dirs = append(dirs, d.Path)
	}
	if want := []string{dir, filepath.Join(dir, "sub"), deep}; strings.Join(dirs, " ") != strings.Join(want, " ") {
		t.Errorf("directories %v, want %v (below /dev/shm, outermost first)", dirs, want)
	}

	// What a launcher does when a rank dies, and the job going on after
	// the checkpoint.
	copy(mem, "changed after the checkpoint")
	syscall.Munmap(mem)
	mem = nil
	hf.WriteAt([]byte("HELD"), 0)
	lf.Write([]byte("line 2\n"))
	if err := os.RemoveAll(filepath.Join(dir, "sub")); err != nil {
		t.Fatal(err)
	}
	os.Chmod(held, 0o600)

	o := Options{UID: os.Getuid(), Read: reader(s)}
	done, left, err := Recreate(rec, o)
	if err != nil || len(left) > 0 {
		t.Fatalf("Recreate: %v (left %v)", err, left)
	}
	got := map[string]string{}
	for _, d := range done {
		got[d.Path] = d.Action
	}
	if len(done) != 2 || got[seg] != "created" || got[held] != "replaced" {
		t.Errorf("Recreate did %v, want %s created and %s replaced", done, seg, held)
	}
	for p, want := range map[string][]byte{seg: segData, held: []byte("held data"), logf: []byte("line 1\nline 2\n")} {
		if b, err := os.ReadFile(p); err != nil || !bytes.Equal(b, want) {
			t.Errorf("%s holds %.40q (%v), want %.40q", p, b, err, want)
		}
	}
	for p, want := range map[string]os.FileMode{seg: 0o640, filepath.Join(dir, "sub"): 0o710 | os.ModeDir, deep: 0o750 | os.ModeDir} {
		if fi, err := os.Stat(p); err != nil || fi.Mode() != want {
			t.Errorf("%s: mode %v (%v), want %v", p, fi.Mode(), err, want)
		}
	}
	if done, _, err := Recreate(rec, o); err != nil || len(done) > 0 {
		t.Errorf("a second Recreate did %v (%v), want nothing", done, err)
	}

	// A missing append-only file is made again.
	os.Remove(logf)
	if done, _, err := Recreate(rec, o); err != nil || len(done) != 1 || done[0].Path != logf {
		t.Errorf("with the output file gone, Recreate did %v (%v)", done, err)
	}

	// A file the record says is someone else's is not made again: it is
	// named, and the restore goes on.
	for i := range rec.Files {
		if rec.Files[i].Path == held {
			rec.Files[i].UID = uint32(os.Getuid()) + 4242
		}
	}
	os.Remove(held)
	done, left, err = Recreate(rec, o)
	if err != nil || len(done) != 0 || len(left) != 1 || !strings.HasPrefix(left[0], held) {
		t.Errorf("with another user's file gone, Recreate did %v, left %v (%v); want it left alone and named", done, left, err)
	}
	if _, err := os.Lstat(held); err == nil {
		t.Errorf("another user's file %s was made again", held)
	}
}

func openWith(t *testing.T, p string, flag int, data []byte) *os.File {
	t.Helper()
	f, err := os.OpenFile(p, flag, 0o600)
	if err == nil {
		_, err = f.Write(data)
	}
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// saved makes a record of the files in dir that the test process holds
// open (each given as path and contents), with their parts.
func saved(t *testing.T, dir string, files map[string]string) (*Record, *Saved) {
	t.Helper()
	for p, data := range files {
		f := openWith(t, p, os.O_RDWR|os.O_CREATE, []byte(data))
		defer f.Close()
	}
	found, err := Scan([]int{os.Getpid()})
	if err != nil {
		t.Fatal(err)
	}
	s, err := Save(ours(found, dir), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	rec, err := s.Seal()
	if err != nil {
		t.Fatal(err)
	}
	return rec, s
}

// Recreate never follows a link: not in a file's place (the job's file
// replaced by a link to another of the user's files), nor on the way to it
// (a directory replaced by a link). The link's target stays as it was.
func TestRecreateFollowsNoLinks(t *testing.T) {
	dir := shmDir(t)
	os.Mkdir(filepath.Join(dir, "d"), 0o700)
	file, inDir := filepath.Join(dir, "file"), filepath.Join(dir, "d", "file")
	rec, s := saved(t, dir, map[string]string{file: "the job's", inDir: "the job's too"})
	victimDir := filepath.Join(dir, "victim")
	os.Mkdir(victimDir, 0o700)
	victim := filepath.Join(victimDir, "file")
	if err := os.WriteFile(victim, []byte("someone's own"), 0o600); err != nil {
		t.Fatal(err)
	}
	os.Remove(file)
	os.RemoveAll(filepath.Join(dir, "d"))
	if err := errors.Join(os.Symlink(victim, file), os.Symlink(victimDir, filepath.Join(dir, "d"))); err != nil {
		t.Fatal(err)
	}
	_, _, err := Recreate(rec, Options{UID: os.Getuid(), Read: reader(s)})
	if err == nil || !strings.Contains(err.Error(), file) || !strings.Contains(err.Error(), inDir) {
		t.Errorf("Recreate over links: %v, want an error naming %s and %s", err, file, inDir)
	}
	if b, _ := os.ReadFile(victim); string(b) != "someone's own" {
		t.Errorf("the link's target was written: %q", b)
	}
	if ents, _ := os.ReadDir(victimDir); len(ents) != 1 {
		t.Errorf("something was made in the directory a link pointed at: %v", ents)
	}
}

// Scan refuses a job with more tmpfs files, or more bytes in them, than a
// checkpoint saves, naming the file that went past the bound.
func TestScanBounds(t *testing.T) {
	dir := shmDir(t)
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	fa := openWith(t, a, os.O_RDWR|os.O_CREATE, make([]byte, 3000))
	defer fa.Close()
	fb := openWith(t, b, os.O_RDWR|os.O_CREATE, make([]byte, 3000))
	defer fb.Close()
	defer func(f, b int64) { maxFiles, maxBytes = f, b }(maxFiles, maxBytes)
	for _, c := range []struct {
		files, bytes int64
	}{{1, MaxBytes}, {MaxFiles, 5000}} {
		maxFiles, maxBytes = c.files, c.bytes
		_, err := Scan([]int{os.Getpid()})
		if !errors.Is(err, ErrTooMuch) || !strings.Contains(err.Error(), b) || strings.Contains(err.Error(), "\n") {
			t.Errorf("bounds %d files, %d bytes: %v, want one line naming %s", c.files, c.bytes, err, b)
		}
	}
}

// As root, Recreate works with the owner's file-system identity: what it
// makes is the owner's, a directory only root may write gets nothing, and
// a file of someone else's squatting the job's path is not written.
func TestRecreateAsOwner(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CRYO_NO_SKIP") == "1" {
			t.Fatal("needs root, and CRYO_NO_SKIP=1 forbids skipping")
		}
		t.Skip("needs root")
	}
	const nobody = 65534
	dir := shmDir(t)
	os.Chmod(dir, 0o755)
	theirs, roots := filepath.Join(dir, "theirs"), filepath.Join(dir, "roots")
	for _, d := range []string{theirs, roots} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.Chown(theirs, nobody, nobody)
	mine, blocked, squatted := filepath.Join(theirs, "seg"), filepath.Join(roots, "seg"), filepath.Join(theirs, "squat")
	rec, s := saved(t, dir, map[string]string{mine: "the job's", blocked: "the job's too", squatted: "and this"})
	for i := range rec.Files {
		rec.Files[i].UID, rec.Files[i].GID = nobody, nobody // as if the job were nobody's
	}
	os.Remove(mine)
	os.Remove(blocked)
	os.Chown(squatted, 0, 0) // root's file in the job's place
	o := Options{UID: nobody, Read: reader(s),
		AsOwner: func(fn func() error) error { return privilege.AsUser(nobody, nobody, fn) }}
	done, _, err := Recreate(rec, o)
	if len(done) != 1 || done[0].Path != mine {
		t.Errorf("Recreate did %v, want only %s", done, mine)
	}
	if err == nil || !strings.Contains(err.Error(), blocked) || !errors.Is(err, ErrNotOwners) || !strings.Contains(err.Error(), squatted) {
		t.Errorf("Recreate: %v, want errors naming %s (a directory root alone may write) and %s (root's file, ErrNotOwners)", err, blocked, squatted)
	}
	var st unix.Stat_t
	if err := unix.Stat(mine, &st); err != nil || st.Uid != nobody || st.Gid != nobody {
		t.Errorf("%s is %d:%d (%v), want the owner's", mine, st.Uid, st.Gid, err)
	}
	if _, err := os.Lstat(blocked); err == nil {
		t.Errorf("%s was made in a directory root alone may write", blocked)
	}
	if b, _ := os.ReadFile(squatted); string(b) != "and this" {
		t.Errorf("root's file in the job's place was written: %q", b)
	}
	if !privilege.ActingAsRoot() {
		t.Error("Recreate did not give root's file-system identity back")
	}
}
