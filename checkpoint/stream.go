package checkpoint

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/cryo-hpc/cryo/internal/pageserver"
	"github.com/cryo-hpc/cryo/internal/store"
	"golang.org/x/sys/unix"
)

// pageStream receives a dump's memory pages through CRIU's page-server
// protocol on a socketpair, and feeds them to the store writer as they
// arrive: uncompressed pages never touch a file system, and hashing and
// compression overlap with the dump.
type pageStream struct {
	w      *store.Writer
	sink   pageserver.Sink // instead of w: a live migration's pages (Hold)
	prefix string          // "tree-N/" when the job has several trees
	rcv    *pageserver.Receiver
	ours   *os.File
	theirs *os.File // handed to CRIU
	done   chan error

	mu    sync.Mutex
	files map[*pageserver.Image]*store.FileWriter
}

// startPageStream starts receiving a dump's pages from CRIU of version
// criuVersion over a socketpair.
func startPageStream(w *store.Writer, criuVersion int) (*pageStream, error) {
	return newPageStream(w, nil, criuVersion)
}

// startSinkStream starts receiving a dump's pages into sink.
func startSinkStream(sink pageserver.Sink, criuVersion int) (*pageStream, error) {
	return newPageStream(nil, sink, criuVersion)
}

func newPageStream(w *store.Writer, sink pageserver.Sink, criuVersion int) (*pageStream, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("page stream: %w", err)
	}
	for _, fd := range fds {
		// Room for a few page runs in flight.
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, 4<<20)
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
	}
	p := &pageStream{
		w:      w,
		sink:   sink,
		ours:   os.NewFile(uintptr(fds[0]), "page-stream"),
		theirs: os.NewFile(uintptr(fds[1]), "page-stream-criu"),
		done:   make(chan error, 1),
		files:  map[*pageserver.Image]*store.FileWriter{},
	}
	p.rcv = &pageserver.Receiver{Window: ChunkWindow, Max: ChunkWindow, Sink: p, Wire: pageserver.WireFor(criuVersion)}
	go func() { p.done <- p.rcv.Serve(p.ours) }()
	return p, nil
}

// Buffer implements pageserver.Sink.
func (p *pageStream) Buffer() []byte {
	if p.sink != nil {
		return p.sink.Buffer()
	}
	return p.w.Buffer()
}

// Put implements pageserver.Sink.
func (p *pageStream) Put(img *pageserver.Image, addr uint64, data []byte) error {
	if p.sink != nil {
		return p.sink.Put(img, addr, data)
	}
	return p.file(img).PutAt(data, addr)
}

func (p *pageStream) file(img *pageserver.Image) *store.FileWriter {
	p.mu.Lock()
	defer p.mu.Unlock()
	fw, ok := p.files[img]
	if !ok {
		fw = p.w.Begin(p.prefix+img.Pages, "pages", 0o600)
		p.files[img] = fw
	}
	return fw
}

// finish waits for the receiver once CRIU is done. On success it writes
// the pagemap images CRIU would have written into images, so that they are
// stored with the other images, and registers empty pages files.
func (p *pageStream) finish(images string, dumpErr error) error {
	p.theirs.Close() // our copy; CRIU's is gone with CRIU
	if dumpErr != nil {
		p.ours.Close() // unblock the receiver if CRIU never finished
		<-p.done
		return nil
	}
	err := <-p.done
	p.ours.Close()
	if err != nil {
		return fmt.Errorf("page stream: %w", err)
	}
	var errs []error
	for _, img := range p.rcv.Images() {
		b, err := pageserver.PagemapImage(img)
		if err == nil {
			err = os.WriteFile(filepath.Join(images, img.Pagemap), b, 0o600)
		}
		errs = append(errs, err)
		if p.w != nil {
			p.file(img) // an image with no pages still needs its (empty) pages file
		}
	}
	return errors.Join(errs...)
}

// memAvailable is MemAvailable from /proc/meminfo, in bytes.
func memAvailable() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 1 << 30
	}
	var kb int64
	for _, line := range strings.Split(string(b), "\n") {
		if n, _ := fmt.Sscanf(line, "MemAvailable: %d kB", &kb); n == 1 {
			return kb << 10
		}
	}
	return 1 << 30
}
