package migrate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"sync"
	"time"

	"github.com/cryo-hpc/cryo/checkpoint"
	"github.com/cryo-hpc/cryo/internal/memread"
	"github.com/cryo-hpc/cryo/internal/outputs"
	"github.com/cryo-hpc/cryo/internal/pageserver"
	"github.com/cryo-hpc/cryo/internal/proc"
	"github.com/cryo-hpc/cryo/internal/wire"
)

// ErrRolledBack marks a migration that failed and left the job running at
// the source as before (resumed, if it had been stopped).
var ErrRolledBack = errors.New("the job continues here")

// Proc is a process of the job: the node's PID, where its memory is read,
// and its PID in the job's namespace, which names its pagemap image.
type Proc struct{ PID, JobPID int }

// SendOptions are the choices of the source side.
type SendOptions struct {
	// Job is the caller's description of the job, passed to the
	// destination's caller (monitor's job definition).
	Job json.RawMessage
	// Procs lists the job's processes now; each round asks again.
	Procs func() ([]Proc, error)
	// Store is the job's store, and Base a generation of it offered as
	// common ground (NewestBase; nil for none): a destination that holds
	// it too is sent only what changed since.
	Store string
	Base  *Base
	// Hold stops and dumps the job, its pages going to sink
	// (checkpoint.Hold with the caller's options).
	Hold func(ctx context.Context, sink pageserver.Sink) (*checkpoint.Held, error)
	// Stopped, when set, is called once the job is stopped and dumped
	// (what it wrote is all it writes here, unless the migration fails).
	Stopped func()
	// MaxRounds bounds the pre-copy rounds (default 8; 0 rounds is a
	// stop-and-copy migration: set NoPrecopy).
	MaxRounds int
	NoPrecopy bool
	// Threshold ends the rounds once one sends fewer bytes (default 16
	// MiB); they also end when a round sends more than 90% of what the
	// round before it sent (the job dirties memory as fast as it goes).
	Threshold int64
	// Wait bounds each wait for the destination after the job stopped
	// (restore; alive through its grace period). Default 5 minutes.
	Wait   time.Duration
	Logger *slog.Logger
}

// Round is what one pre-copy round did.
type Round struct {
	N       int           `json:"round"`
	Pages   int64         `json:"pages_read"`
	Changed int64         `json:"pages_sent"`
	Zero    int64         `json:"zero_pages"`
	Took    time.Duration `json:"took_ns"`
}

// Result describes a migration.
type Result struct {
	To     string  `json:"to"`
	Rounds []Round `json:"rounds"`
	// Base is the generation both ends held, whose BasePages were not
	// sent (0: none).
	Base       int   `json:"base_generation,omitempty"`
	BasePages  int64 `json:"base_pages,omitempty"`
	JobBytes   int64 `json:"job_bytes"`   // memory the first round read
	Sent       int64 `json:"sent_bytes"`  // on the wire, both phases
	FinalSent  int64 `json:"final_bytes"` // on the wire while the job was stopped
	FinalPages int64 `json:"final_pages"` // pages sent while the job was stopped
	FinalKnown int64 `json:"final_known"` // pages the destination already had
	// Downtime is from the job's stop here until the destination said it
	// runs there; Frozen is the part of it CRIU's dump took.
	Downtime   time.Duration `json:"downtime_ns"`
	Frozen     time.Duration `json:"frozen_ns"`
	Restore    time.Duration `json:"restore_ns"` // at the destination, from its images in RAM
	Commit     time.Duration `json:"commit_ns"`  // at the destination, while the job ran there
	Generation int           `json:"generation"` // at the destination
}

// Send migrates the job over c, which the caller dialled. On success the
// job's copy here is killed and reaped and the destination runs it. On
// error the job runs here as before, and the error, which matches
// ErrRolledBack, says which phase failed; a job that was stopped is
// resumed with the output files it holds cut back to their sizes at the
// stop, so that nothing the destination wrote meanwhile stays.
func Send(ctx context.Context, c *wire.Conn, o SendOptions) (res *Result, err error) {
	defer func() {
		if err != nil && !errors.Is(err, ErrRolledBack) {
			err = fmt.Errorf("%w; %w", err, ErrRolledBack)
		}
	}()
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if o.MaxRounds <= 0 {
		o.MaxRounds = 8
	}
	if o.Threshold <= 0 {
		o.Threshold = 16 << 20
	}
	if o.Wait <= 0 {
		o.Wait = 5 * time.Minute
	}
	res = &Result{To: c.Remote()}
	procs, err := o.Procs()
	if err != nil {
		return nil, fmt.Errorf("list the job's processes: %w", err)
	}
	var rss int64
	for _, p := range procs {
		n, _ := proc.RSS(p.PID)
		rss += n
	}
	if err := c.SendJSON(kindHello, hello{Version: Version, Job: o.Job, Bytes: rss, Base: o.Base}); err != nil {
		return nil, fmt.Errorf("hello: %w", err)
	}
	var w welcome
	if err := recvWithin(c, o.Wait, kindWelcome, &w); err != nil {
		return nil, fmt.Errorf("the destination refused the job: %w", err)
	}
	tr := memread.NewTracker()
	if w.Base {
		n, err := seed(ctx, o.Store, o.Base, tr)
		if err != nil {
			return res, fmt.Errorf("read generation %d, the common ground: %w", o.Base.Generation, err)
		}
		res.Base, res.BasePages = o.Base.Generation, n
		log.Info("the destination holds a generation of the job", "generation", o.Base.Generation, "pages", n)
	}
	s := &sender{c: c, tr: tr}
	if !o.NoPrecopy {
		if err := s.rounds(ctx, o, res, log); err != nil {
			return res, fmt.Errorf("pre-copy: %w", err)
		}
	}

	// The stop: from here on the job must come back here on any failure.
	sink := newFinalSink(s)
	h, err := o.Hold(ctx, sink)
	if err != nil {
		sink.close()
		return res, fmt.Errorf("dump the job: %w", err)
	}
	res.Frozen = h.Frozen
	if o.Stopped != nil {
		o.Stopped()
	}
	fail := func(phase string, err error) (*Result, error) {
		cut := cutOutputs(h.Images)
		rerr := h.Resume(context.WithoutCancel(ctx))
		cerr := h.Close()
		if e := errors.Join(rerr, cerr); e != nil {
			return res, fmt.Errorf("%s: %w; and resuming the job here failed: %w", phase, err, e)
		}
		if cut != nil {
			log.Warn("output files not cut back to the stop", "err", cut)
		}
		return res, fmt.Errorf("%s: %w; %w", phase, err, ErrRolledBack)
	}
	if err := sink.close(); err != nil {
		return fail("send the stopped job's pages", err)
	}
	res.FinalPages, res.FinalKnown = sink.sent, sink.known
	if res.JobBytes == 0 {
		res.JobBytes = (sink.sent + sink.known) * PageSize // no rounds: the dump saw all of it
	}
	files, err := s.sendFiles(h.Images)
	if err != nil {
		return fail("send the job's images", err)
	}
	if err := c.SendJSON(kindFinal, final{Manifest: h.Manifest, Files: files}); err != nil {
		return fail("send the job's images", err)
	}
	res.FinalSent = c.Sent() - s.beforeFinal
	var r restored
	if err := recvWithin(c, o.Wait, kindRestored, &r); err != nil {
		return fail("restore at the destination", err)
	}
	res.Downtime, res.Restore = h.StoppedFor(), time.Duration(r.RestoreNS)
	log.Info("the job runs at the destination", "downtime", res.Downtime)
	var ok running
	if err := recvWithin(c, o.Wait, kindRunning, &ok); err != nil {
		return fail("the job at the destination", err)
	}
	res.Generation, res.Commit = ok.Generation, time.Duration(ok.CommitNS)
	kerr := h.Kill(context.WithoutCancel(ctx), true)
	cerr := h.Close()
	if err := errors.Join(kerr, cerr); err != nil {
		log.Warn("the job's copy here did not end cleanly", "err", err)
	}
	res.Sent = c.Sent()
	if err := c.SendJSON(kindEnded, struct{}{}); err != nil {
		// The destination runs the job; it learns we are gone from the
		// connection's end as well.
		log.Warn("could not tell the destination the job ended here", "err", err)
	}
	return res, nil
}

func recvWithin(c *wire.Conn, d time.Duration, kind uint16, v any) error {
	_ = c.SetDeadline(time.Now().Add(d))
	defer c.SetDeadline(time.Time{})
	return c.RecvJSON(kind, v)
}

// sender sends page runs; safe for several goroutines.
type sender struct {
	c           *wire.Conn
	tr          *memread.Tracker
	mu          sync.Mutex
	buf         []byte
	beforeFinal int64
}

func (s *sender) send(h pageHeader, data []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.buf = appendPages(s.buf[:0], h, data)
	return s.c.Send(kindPages, s.buf)
}

// sendRun sends a run of pages at addr, zero pages apart (no data).
func (s *sender) sendRun(name string, addr uint64, data []byte, zero func(i int) bool) error {
	n := len(data) / PageSize
	for i := 0; i < n; {
		z := zero(i)
		j := i + 1
		for j < n && j-i < maxRunPages && zero(j) == z {
			j++
		}
		h := pageHeader{zero: z, name: name, pages: j - i, addr: addr + uint64(i*PageSize)}
		if err := s.send(h, data[i*PageSize:j*PageSize]); err != nil {
			return err
		}
		i = j
	}
	return nil
}

func procImage(jobPID int) string { return "pagemap-" + strconv.Itoa(jobPID) + ".img" }

// rounds copies the job's memory while it runs, until what changes
// between two rounds is small or stops shrinking.
func (s *sender) rounds(ctx context.Context, o SendOptions, res *Result, log *slog.Logger) error {
	var prev int64 = -1
	for n := 1; n <= o.MaxRounds; n++ {
		t0 := time.Now()
		procs, err := o.Procs()
		if err != nil {
			return err
		}
		r := Round{N: n}
		for _, p := range procs {
			name := procImage(p.JobPID)
			st, err := s.tr.Scan(ctx, p.JobPID, p.PID, func(run memread.Run) error {
				return s.sendRun(name, run.Addr, run.Data, func(i int) bool { return run.Digests[i] == memread.ZeroDigest })
			})
			if errors.Is(err, memread.ErrGone) {
				s.tr.Forget(p.JobPID) // a process that ended meanwhile: the dump will tell
				continue
			}
			if err != nil {
				return fmt.Errorf("round %d: pid %d: %w", n, p.PID, err)
			}
			r.Pages += st.Pages
			r.Changed += st.Changed
			r.Zero += st.Zero
		}
		if err := s.c.SendJSON(kindRoundEnd, roundEnd{Round: n, Pages: r.Changed}); err != nil {
			return err
		}
		var ack roundAck
		if err := recvWithin(s.c, o.Wait, kindRoundAck, &ack); err != nil {
			return fmt.Errorf("round %d: %w", n, err)
		}
		r.Took = time.Since(t0)
		res.Rounds = append(res.Rounds, r)
		if n == 1 {
			res.JobBytes = r.Pages * PageSize
		}
		sent := (r.Changed - r.Zero) * PageSize
		log.Info("pre-copy round", "round", n, "pages", r.Pages, "changed", r.Changed, "took", r.Took)
		if n > 1 && (sent < o.Threshold || prev >= 0 && sent*10 > prev*9) {
			break
		}
		prev = sent
	}
	s.beforeFinal = s.c.Sent()
	return nil
}

// sendFiles sends every file of the images directory.
func (s *sender) sendFiles(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var names []string
	buf := make([]byte, 1<<20)
	for _, e := range ents {
		if !e.Type().IsRegular() {
			return nil, fmt.Errorf("%s: not a regular file", filepath.Join(dir, e.Name()))
		}
		if err := validFileName(e.Name()); err != nil {
			return nil, err
		}
		if err := s.sendFile(filepath.Join(dir, e.Name()), e.Name(), buf); err != nil {
			return nil, err
		}
		names = append(names, e.Name())
	}
	return names, nil
}

func (s *sender) sendFile(path, name string, buf []byte) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	var off int64
	for first := true; ; first = false {
		n, err := io.ReadFull(f, buf)
		if n > 0 || first {
			s.mu.Lock()
			s.buf = appendFile(s.buf[:0], name, off, buf[:n])
			serr := s.c.Send(kindFile, s.buf)
			s.mu.Unlock()
			if serr != nil {
				return serr
			}
			off += int64(n)
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// finalSink takes the stopped job's pages from CRIU's page stream (as a
// pageserver.Sink) and sends those whose content the destination was not
// sent for that address, digesting them on every core while CRIU dumps.
type finalSink struct {
	s    *sender
	pool sync.Pool
	work chan finalRun
	wg   sync.WaitGroup

	mu          sync.Mutex
	err         error
	sent, known int64
	closed      bool
}

type finalRun struct {
	name  string
	id    int // the process's job PID, or -1 for shared memory (never skipped)
	addr  uint64
	data  []byte
	owned []byte
}

var procPagemap = regexp.MustCompile(`^pagemap-([0-9]+)\.img$`)

func newFinalSink(s *sender) *finalSink {
	f := &finalSink{s: s, work: make(chan finalRun, 16)}
	f.pool.New = func() any { b := make([]byte, 0, maxRunPages*PageSize); return &b }
	for range max(runtime.GOMAXPROCS(0), 1) {
		f.wg.Add(1)
		go f.worker()
	}
	return f
}

// Buffer implements pageserver.Sink.
func (f *finalSink) Buffer() []byte { return (*f.pool.Get().(*[]byte))[:0] }

// Put implements pageserver.Sink.
func (f *finalSink) Put(img *pageserver.Image, addr uint64, data []byte) error {
	if err := f.error(); err != nil {
		return err
	}
	id := -1
	if m := procPagemap.FindStringSubmatch(img.Pagemap); m != nil {
		id, _ = strconv.Atoi(m[1])
	}
	// Runs are at most a chunk window (1 MiB): one message's worth.
	f.work <- finalRun{name: img.Pagemap, id: id, addr: addr, data: data, owned: data}
	return nil
}

func (f *finalSink) worker() {
	defer f.wg.Done()
	digests := make([]memread.Digest, maxRunPages)
	for r := range f.work {
		if f.error() == nil {
			if err := f.run(r, digests); err != nil {
				f.fail(err)
			}
		}
		b := r.owned[:0]
		f.pool.Put(&b)
	}
}

// run sends the pages of r that the destination lacks.
func (f *finalSink) run(r finalRun, digests []memread.Digest) error {
	n := len(r.data) / PageSize
	if n*PageSize != len(r.data) {
		return fmt.Errorf("%s: a run of %d bytes at %#x", r.name, len(r.data), r.addr)
	}
	digests = digests[:0]
	for i := range n {
		digests = append(digests, memread.PageDigest(r.data[i*PageSize:(i+1)*PageSize]))
	}
	var sent, known int64
	for i := 0; i < n; {
		if r.id >= 0 && f.s.tr.Seen(r.id, r.addr+uint64(i*PageSize), digests[i]) {
			known++
			i++
			continue
		}
		j := i + 1
		for j < n && !(r.id >= 0 && f.s.tr.Seen(r.id, r.addr+uint64(j*PageSize), digests[j])) {
			j++
		}
		base := r.addr + uint64(i*PageSize)
		d := digests[i:j]
		if err := f.s.sendRun(r.name, base, r.data[i*PageSize:j*PageSize], func(k int) bool { return d[k] == memread.ZeroDigest }); err != nil {
			return err
		}
		sent += int64(j - i)
		i = j
	}
	f.mu.Lock()
	f.sent += sent
	f.known += known
	f.mu.Unlock()
	return nil
}

func (f *finalSink) fail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err == nil {
		f.err = err
	}
}

func (f *finalSink) error() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.err
}

// close waits for every page to be sent and returns the first error.
func (f *finalSink) close() error {
	f.mu.Lock()
	closed := f.closed
	f.closed = true
	f.mu.Unlock()
	if !closed {
		close(f.work)
		f.wg.Wait()
	}
	return f.error()
}

// cutOutputs cuts the job's output files back to their sizes at the stop
// (the destination may have written to them meanwhile, on a shared file
// system).
func cutOutputs(images string) error {
	b, err := os.ReadFile(filepath.Join(images, outputs.ImageName))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	rec, err := outputs.Decode(b)
	if err != nil {
		return err
	}
	_, err = outputs.Truncate(rec)
	return err
}
