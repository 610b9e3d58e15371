package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"golang.org/x/sys/unix"
	"io"
	"os"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestSourceSendsFiles: every file streams out byte for byte as it went in,
// zero chunks included, in order though its chunks are decoded in parallel;
// logs and unknown names are not served.
func TestSourceSendsFiles(t *testing.T) {
	s := newStore(t)
	files := map[string][]byte{
		"empty.img":  {},
		"core-1.img": randBytes(1, 10_000),
		// Random, zero and random again, with odd cuts: chunks of every
		// kind, more than the workers' look-ahead.
		"pages-1.img": bytes.Join([][]byte{memLike(2, 9*MaxChunk+4096), make([]byte, 3*MaxChunk), memLike(3, 20*MaxChunk+777)}, nil),
	}
	specs := writeSpecs(t, t.TempDir(), files)
	for i := range specs {
		if specs[i].Name == "pages-1.img" {
			specs[i].Kind, specs[i].Cuts = "pages", []int64{4096, 5000, 7 * MaxChunk}
		}
	}
	specs = append(specs, FileSpec{Path: specs[0].Path, Name: "dump.log", Kind: "log"})
	_, m := commit(t, s, specs, nil)
	src := s.NewSource(m, nil)
	for name, want := range files {
		if !src.Has(name) {
			t.Fatalf("Has(%q) = false", name)
		}
		var got bytes.Buffer
		if err := src.Send(context.Background(), name, &got); err != nil {
			t.Fatalf("Send(%s): %v", name, err)
		}
		if !bytes.Equal(got.Bytes(), want) {
			t.Errorf("Send(%s): %d bytes differ from the %d stored", name, got.Len(), len(want))
		}
	}
	for _, name := range []string{"dump.log", "nothing.img"} {
		if src.Has(name) {
			t.Errorf("Has(%q) = true", name)
		}
		if err := src.Send(context.Background(), name, io.Discard); err == nil {
			t.Errorf("Send(%q) worked", name)
		}
	}
}

// TestSourceDamage: a damaged chunk ends the stream before the file is
// whole, with a CorruptError naming it; with a replica it is healed and
// the stream is whole.
func TestSourceDamage(t *testing.T) {
	s, rep, m, files := replicaPair(t)
	var f File
	for _, f = range m.Files {
		if f.Name == "pages-1.img" {
			break
		}
	}
	bad := f.Chunks[1]
	flipBlob(t, s, bad.Hash)

	var got bytes.Buffer
	err := s.NewSource(m, nil).Send(context.Background(), "pages-1.img", &got)
	var ce *CorruptError
	if !errors.As(err, &ce) || !errors.Is(err, ErrCorrupt) || ce.Problems[0].Chunk != 1 || !strings.Contains(err.Error(), bad.Hash) {
		t.Fatalf("Send of a damaged file: %v, want a CorruptError naming chunk 1 (%s)", err, bad.Hash)
	}
	if int64(got.Len()) >= f.Size {
		t.Errorf("Send sent all %d bytes of a damaged file", got.Len())
	}

	src := s.NewSource(m, rep)
	got.Reset()
	if err := src.Send(context.Background(), "pages-1.img", &got); err != nil {
		t.Fatalf("Send with a replica: %v", err)
	}
	if !bytes.Equal(got.Bytes(), files["pages-1.img"]) {
		t.Error("Send with a replica: content differs")
	}
	if err := src.Finish(); err != nil {
		t.Fatal(err)
	}
	if h := src.Healed(); len(h) != 1 || h[0].Hash != bad.Hash {
		t.Errorf("Healed() = %v, want the one damaged chunk", h)
	}
	if ps := s.Verify(context.Background(), m); len(ps) != 0 {
		t.Errorf("the healed chunk was not written back: %v", ps)
	}
}

// TestSourceStopsOnWriteError: a reader that goes away (CRIU giving up)
// ends Send with its error, and no worker is left behind.
func TestSourceStopsOnWriteError(t *testing.T) {
	s := newStore(t)
	files := map[string][]byte{"pages-1.img": randBytes(4, 40*MaxChunk)}
	_, m := commit(t, s, writeSpecs(t, t.TempDir(), files), nil)
	w := &failAfter{n: 3 * MaxChunk}
	err := s.NewSource(m, nil).Send(context.Background(), "pages-1.img", w)
	if err == nil || !strings.Contains(err.Error(), "reader gone") {
		t.Fatalf("Send to a failing writer: %v", err)
	}
}

type failAfter struct{ n int }

func (f *failAfter) Write(p []byte) (int, error) {
	if f.n -= len(p); f.n < 0 {
		return 0, errors.New("reader gone")
	}
	return len(p), nil
}

// TestSourceSplicesPages: a page image sent into a pipe goes by vmsplice,
// and a reader much slower than the decoders still reads every byte as it
// was checkpointed: no buffer is reused while its pages are in the pipe.
// Other images are copied as before. In a default pipe (64 KiB) every
// vmsplice is partial; a 1 MiB one (as CRIU's) holds several chunks of
// 128 KiB.
func TestSourceSplicesPages(t *testing.T) {
	for _, size := range []int{0, 1 << 20} {
		t.Run(fmt.Sprintf("pipe %d", size), func(t *testing.T) { testSourceSplicesPages(t, size) })
	}
}

func testSourceSplicesPages(t *testing.T, pipeSize int) {
	s := newStore(t)
	pages := bytes.Join([][]byte{memLike(7, 30*MaxChunk), make([]byte, 2*MaxChunk), memLike(8, 10*MaxChunk+4096)}, nil)
	specs := writeSpecs(t, t.TempDir(), map[string][]byte{"pages-1.img": pages, "core-1.img": memLike(9, 3*MaxChunk)})
	for i := range specs {
		if specs[i].Name == "pages-1.img" {
			specs[i].Kind = "pages"
			for at := int64(128 << 10); at < int64(len(pages)); at += 128 << 10 {
				specs[i].Cuts = append(specs[i].Cuts, at)
			}
		}
	}
	_, m := commit(t, s, specs, nil)
	src := s.NewSource(m, nil)
	for _, name := range []string{"pages-1.img", "core-1.img"} {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		if pipeSize > 0 {
			if _, err := unix.FcntlInt(w.Fd(), unix.F_SETPIPE_SZ, pipeSize); err != nil {
				t.Fatalf("cannot make a pipe of %d bytes: %v", pipeSize, err)
			}
		}
		if newSplicer(w, nil) == nil {
			t.Fatal("newSplicer does not take a pipe")
		}
		got := make(chan []byte)
		go func() {
			var out []byte
			buf := make([]byte, 256<<10)
			for {
				n, err := r.Read(buf)
				out = append(out, buf[:n]...)
				if err != nil {
					got <- out
					return
				}
				time.Sleep(time.Millisecond) // slower than the decoders
			}
		}()
		err = src.Send(context.Background(), name, w)
		w.Close()
		data := <-got
		r.Close()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		want := readFile(t, specs[slices.IndexFunc(specs, func(sp FileSpec) bool { return sp.Name == name })].Path)
		if !bytes.Equal(data, want) {
			at := 0
			for at < min(len(data), len(want)) && data[at] == want[at] {
				at++
			}
			t.Errorf("%s: read %d bytes, want %d; first difference at %d (chunk %d)", name, len(data), len(want), at, at/MaxChunk)
		}
	}
}
