package outputs

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/cryo-hpc/cryo/internal/criu"
)

func TestScanRecordTruncate(t *testing.T) {
	dir := t.TempDir()
	logp, datap, inp := filepath.Join(dir, "job.log"), filepath.Join(dir, "data"), filepath.Join(dir, "input")
	for _, p := range []string{logp, datap, inp} {
		if err := os.WriteFile(p, []byte("0123456789"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	logf, err := os.OpenFile(logp, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	dataf, err := os.OpenFile(datap, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer dataf.Close()
	inf, err := os.Open(inp)
	if err != nil {
		t.Fatal(err)
	}
	defer inf.Close()

	scan := Scan([]int{os.Getpid()})
	if _, ok := scan[inp]; ok {
		t.Errorf("a file open only for reading was scanned")
	}
	if o, ok := scan[logp]; !ok || o.Size != 10 {
		t.Fatalf("the log open for appending: %+v (found %v)", o, ok)
	}
	// The job appends 5 bytes before the freeze: CRIU records no size for
	// a write-only appending file, but the descriptor's position.
	logf.WriteString("abcde")
	regs := []criu.RegFile{
		{Name: logp, Flags: syscall.O_WRONLY | syscall.O_APPEND, Pos: 15},
		{Name: datap, Flags: syscall.O_RDWR, Size: 10, HasSize: true},
		{Name: inp, Flags: syscall.O_RDONLY, Size: 10, HasSize: true},
	}
	rec := Record(scan, regs)
	if len(rec) != 2 || rec[0].Path != datap || rec[0].Size != 10 || rec[1].Path != logp || rec[1].Size != 15 {
		t.Fatalf("Record = %+v, want data at 10 bytes and the log at 15", rec)
	}
	b, _ := Encode(rec)
	if rec, err = Decode(b); err != nil {
		t.Fatal(err)
	}

	// After the checkpoint the job writes more, then fails.
	logf.WriteString("after the checkpoint\n")
	dataf.WriteAt([]byte("more"), 10)
	cuts, err := Truncate(rec)
	if err != nil || len(cuts) != 2 {
		t.Fatalf("Truncate: %v %v", cuts, err)
	}
	if b, _ := os.ReadFile(logp); string(b) != "0123456789abcde" {
		t.Errorf("log after the cut: %q", b)
	}
	if st, _ := os.Stat(datap); st.Size() != 10 {
		t.Errorf("data after the cut: %d bytes", st.Size())
	}
	// Nothing more to cut: nothing is done.
	if cuts, err := Truncate(rec); err != nil || len(cuts) != 0 {
		t.Errorf("second Truncate: %v %v", cuts, err)
	}
}

// A path that now names another file, or a symbolic link to one, is never
// cut: the file it names is not the job's.
func TestTruncateRefusesReplacedFiles(t *testing.T) {
	dir := t.TempDir()
	victim := filepath.Join(dir, "victim")
	if err := os.WriteFile(victim, []byte("precious data"), 0o600); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "host.out")
	if err := os.WriteFile(out, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	syscall.Stat(out, &st)
	rec := []File{{Path: out, Size: 1, Dev: uint64(st.Dev), Ino: st.Ino}}

	os.Remove(out)
	if err := os.Symlink(victim, out); err != nil {
		t.Fatal(err)
	}
	if _, err := Truncate(rec); !errors.Is(err, ErrReplaced) {
		t.Errorf("a symbolic link in its place: %v, want ErrReplaced", err)
	}
	os.Remove(out)
	if err := os.Link(victim, out); err != nil {
		t.Fatal(err)
	}
	if _, err := Truncate(rec); !errors.Is(err, ErrReplaced) {
		t.Errorf("another file in its place: %v, want ErrReplaced", err)
	}
	if b, _ := os.ReadFile(victim); string(b) != "precious data" {
		t.Errorf("the other file was changed: %q", b)
	}
}

// A file the job holds open that the node does not see at its path (on a
// mount of the job's own namespace, such as its private TMPDIR; here: one
// renamed over) is not the node's to cut: the scan leaves it out.
func TestScanLeavesOutFilesNotAtTheirPath(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "session.sm")
	if err := os.WriteFile(p, []byte("job's"), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if o, ok := Scan([]int{os.Getpid()})[p]; !ok || o.Size != 5 {
		t.Fatalf("the file at its own path: %+v (found %v)", o, ok)
	}
	other := filepath.Join(dir, "other")
	if err := os.WriteFile(other, []byte("the node's"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(other, p); err != nil {
		t.Fatal(err)
	}
	if o, ok := Scan([]int{os.Getpid()})[p]; ok {
		t.Errorf("a file that is not the one at its path was scanned: %+v", o)
	}
}
