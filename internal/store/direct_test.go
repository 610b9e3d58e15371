package store

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestWriteChunkFile: a chunk file has exactly the bytes given, whatever
// their length and alignment, written directly where the file system takes
// O_DIRECT (here, and on /dev/shm when it exists) and through the page
// cache where it does not or the buffer is unaligned.
func TestWriteChunkFile(t *testing.T) {
	dirs := []string{t.TempDir()}
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		d, err := os.MkdirTemp("/dev/shm", "cryo-direct-test-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(d) })
		dirs = append(dirs, d)
	}
	for _, dir := range dirs {
		var ds directState
		for _, n := range []int{0, 1, directAlign - 1, directAlign, directAlign + 1, 300_001, MaxChunk} {
			want := randBytes(int64(n), n)
			for _, buf := range [][]byte{append(alignedBuf(n)[:0], want...), append(make([]byte, 1, n+1), want...)[1:]} {
				name, err := ds.writeTemp(dir, "chunk.tmp*", buf)
				if err != nil {
					t.Fatalf("%s: %d bytes (aligned %v): %v", dir, n, aligned(buf), err)
				}
				got, err := os.ReadFile(name)
				if err != nil || !bytes.Equal(got, want) {
					t.Errorf("%s: %d bytes (aligned %v) read back as %d bytes (%v)", dir, n, aligned(buf), len(got), err)
				}
				if filepath.Dir(name) != dir {
					t.Errorf("written to %s, not in %s", name, dir)
				}
				os.Remove(name)
			}
		}
	}
}
