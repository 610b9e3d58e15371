package migrate

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/cryo-hpc/cryo/checkpoint"
	"github.com/cryo-hpc/cryo/internal/outputs"
	"github.com/cryo-hpc/cryo/internal/pageserver"
	"github.com/cryo-hpc/cryo/internal/safefs"
	"github.com/cryo-hpc/cryo/internal/store"
	"github.com/cryo-hpc/cryo/internal/wire"
	"github.com/cryo-hpc/cryo/internal/workdir"
	"golang.org/x/sys/unix"
)

// ReceiveOptions are the choices of the destination side.
type ReceiveOptions struct {
	// Store is where the migrated job is committed as a generation, then
	// restored from (created if missing).
	Store string
	// WorkDir is where the job's memory waits between the rounds and the
	// commit: RAM (/dev/shm) by default.
	WorkDir string
	// Wait bounds each wait for the source (default 5 minutes): a source
	// that goes silent ends the migration here.
	Wait   time.Duration
	Logger *slog.Logger
}

// Limits on what a source may make the destination hold.
const (
	maxImages   = 1 << 16 // files of one job's images
	maxPagemaps = 1 << 14 // processes and shared memory segments
	maxPagemap  = 64 << 20
)

// Incoming is a migrated job received whole, not yet running: its images
// wait in a RAM work directory. The caller restores it from there
// (Restored says so to the source, whose downtime ends), commits it to the
// store meanwhile (Commit), and once it has lived through a grace period
// lets the source end its copy (Running) — or gives up (Fail). Close
// removes the work directory.
type Incoming struct {
	Job json.RawMessage // the source's description of the job
	// Images is the directory of the job's complete CRIU images, and
	// Manifest describes them (its Files name each with its size).
	Images   string
	Manifest *store.Manifest
	Store    string
	Rounds   int
	// Generation is the job's generation in Store once committed, and
	// CommitTook how long the commit took.
	Generation int
	CommitTook time.Duration
	// Standby: the source kept this node up to date with the job's
	// generations (Generation is the newest) and did not migrate it.
	// SourceLost says why the source is taken for gone, in which case the
	// job is to be resumed here from Generation; nil means the job is over
	// at its source and nothing is to be done here.
	Standby    bool
	SourceLost error
	// Ended is why the source ended the standby stream: "migrating" when
	// the job is about to come here by migration (on a new connection).
	Ended string

	c    *wire.Conn
	o    ReceiveOptions
	r    *receiver
	work string
	done bool
}

// Receive takes one migration from c up to a committed generation of
// o.Store. On error the source is told (it resumes the job) and nothing
// is left in the store.
func Receive(ctx context.Context, c *wire.Conn, o ReceiveOptions) (in *Incoming, err error) {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if o.Wait <= 0 {
		o.Wait = 5 * time.Minute
	}
	defer func() {
		if err != nil {
			_ = c.SendError(err.Error())
		}
	}()
	var h hello
	if err := recvWithin(c, o.Wait, kindHello, &h); err != nil {
		return nil, fmt.Errorf("hello: %w", err)
	}
	if h.Version != Version {
		return nil, fmt.Errorf("the source speaks migration protocol %d, this cryo %d", h.Version, Version)
	}
	st, err := store.Create(o.Store, "cryo "+checkpoint.Version)
	if err != nil {
		return nil, err
	}
	work, err := workdir.Make(o.WorkDir, filepath.Join(st.Dir, "staging"), max(h.Bytes, 0)+64<<20)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(work)
		}
	}()
	r := &receiver{mem: filepath.Join(work, "mem"), images: filepath.Join(work, "images"), files: map[string]*os.File{}}
	defer func() {
		if err != nil {
			r.close()
		}
	}()
	if err := errors.Join(os.Mkdir(r.mem, 0o700), os.Mkdir(r.images, 0o700)); err != nil {
		return nil, err
	}
	wel := welcome{Version: Version}
	if bst, bm, ok := openBase(st.Dir, h.Base); ok && !h.Standby {
		n, err := r.preload(ctx, bst, bm)
		if err != nil {
			return nil, fmt.Errorf("load generation %d, the job's common ground with its source: %w", h.Base.Generation, err)
		}
		log.Info("the job's pages in this store are its starting point", "generation", h.Base.Generation, "pages", n)
		wel.Base = true
	}
	if err := c.SendJSON(kindWelcome, wel); err != nil {
		return nil, err
	}
	if h.Standby {
		os.RemoveAll(work)
		in = &Incoming{Job: h.Job, Store: st.Dir, Standby: true, c: c, o: o, r: &receiver{}}
		in.Generation, in.Ended, in.SourceLost = receiveStandby(ctx, c, st, h, log)
		if in.SourceLost != nil && in.Generation == 0 {
			return nil, fmt.Errorf("the source of a standby stream went away before it sent a generation: %w", in.SourceLost)
		}
		return in, nil
	}
	in = &Incoming{Job: h.Job, Store: st.Dir, Images: r.images, c: c, o: o, work: work}
	var fin final
	for done := false; !done; {
		_ = c.SetDeadline(time.Now().Add(o.Wait))
		kind, b, err := c.Recv()
		if err != nil {
			return nil, fmt.Errorf("from the source: %w", err)
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		switch kind {
		case kindPages:
			err = r.pages(b)
		case kindFile:
			err = r.file(b)
		case kindRoundEnd:
			var e roundEnd
			if err = json.Unmarshal(b, &e); err == nil {
				in.Rounds = e.Round
				crashPoint("migrate-round")
				log.Debug("round received", "round", e.Round, "pages", e.Pages)
				err = c.SendJSON(kindRoundAck, roundAck{Round: e.Round})
			}
		case kindFinal:
			err = json.Unmarshal(b, &fin)
			done = true
		default:
			err = fmt.Errorf("unexpected message %d from the source", kind)
		}
		if err != nil {
			return nil, err
		}
	}
	_ = c.SetDeadline(time.Time{})
	crashPoint("migrate-final")
	if fin.Manifest == nil {
		return nil, errors.New("the source sent no manifest")
	}
	if err := r.plan(fin.Files); err != nil {
		return nil, fmt.Errorf("the job's images: %w", err)
	}
	m := *fin.Manifest
	if m.Files, err = r.describe(); err != nil {
		return nil, err
	}
	in.Manifest, in.r = &m, r
	return in, nil
}

// Commit writes the job's images into the store as a new generation (so
// that it is kept, verified and restored after a failure like any
// checkpoint). The job may already run from them.
func (in *Incoming) Commit(ctx context.Context) error {
	t0 := time.Now()
	if err := in.r.writePages(ctx); err != nil {
		return fmt.Errorf("commit the migrated job: %w", err)
	}
	m := *in.Manifest
	res, err := checkpoint.Import(ctx, checkpoint.ImportOptions{Store: in.Store, Images: in.Images, Manifest: &m})
	if err != nil {
		return fmt.Errorf("commit the migrated job: %w", err)
	}
	in.Generation, in.CommitTook = res.Generation, time.Since(t0)
	return nil
}

// Close removes the job's images from RAM.
func (in *Incoming) Close() error {
	in.r.close()
	return os.RemoveAll(in.work)
}

// Restored tells the source that the job runs here (restore took took):
// its downtime ends.
func (in *Incoming) Restored(took time.Duration) error {
	crashPoint("migrate-restored")
	return in.c.SendJSON(kindRestored, restored{RestoreNS: took.Nanoseconds()})
}

// Running tells the source that the job is alive after its grace period
// and committed here, and waits until the source's copy is gone. After an
// error the caller must end its copy (Fail): the source may run the job
// again.
func (in *Incoming) Running() error {
	if err := in.c.SendJSON(kindRunning, running{Generation: in.Generation, CommitNS: in.CommitTook.Nanoseconds()}); err != nil {
		return err
	}
	var e struct{}
	if err := recvWithin(in.c, in.o.Wait, kindEnded, &e); err != nil {
		return fmt.Errorf("the source did not say its copy of the job ended: %w", err)
	}
	in.done = true
	return nil
}

// Fail tells the source, which resumes the job, and removes the generation
// this migration committed. The caller has ended the job here.
func (in *Incoming) Fail(why error) error {
	if in.done {
		return nil
	}
	in.done = true
	_ = in.c.SendError(why.Error())
	if in.Generation == 0 {
		return nil
	}
	st, err := store.Open(in.Store)
	if err != nil {
		return err
	}
	unlock, err := st.Lock(context.Background(), true)
	if err != nil {
		return err
	}
	defer unlock()
	return st.Remove(in.Generation)
}

// receiver holds what the source sent: each process's memory in a sparse
// RAM file at its addresses, and image files.
type receiver struct {
	mem, images string
	files       map[string]*os.File   // by pagemap name
	plans       map[string]*pagesPlan // by pages image name
	nimages     int
}

func (r *receiver) close() {
	for _, f := range r.files {
		f.Close()
	}
}

func (r *receiver) memFile(name string) (*os.File, error) {
	if f := r.files[name]; f != nil {
		return f, nil
	}
	if len(r.files) >= maxPagemaps {
		return nil, fmt.Errorf("more than %d processes", maxPagemaps)
	}
	f, err := os.OpenFile(filepath.Join(r.mem, name), os.O_RDWR|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, err
	}
	r.files[name] = f
	return f, nil
}

func (r *receiver) pages(b []byte) error {
	h, data, err := parsePages(b)
	if err != nil {
		return err
	}
	f, err := r.memFile(h.name)
	if err != nil {
		return err
	}
	if h.zero {
		// A hole reads as zeros and holds no memory.
		err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(h.addr), int64(h.pages*PageSize))
		if err != nil {
			return fmt.Errorf("%s: zero pages at %#x: %w", h.name, h.addr, err)
		}
		return nil
	}
	if _, err := f.WriteAt(data, int64(h.addr)); err != nil {
		return fmt.Errorf("%s: pages at %#x: %w", h.name, h.addr, err)
	}
	return nil
}

func (r *receiver) file(b []byte) error {
	name, off, data, err := parseFile(b)
	if err != nil {
		return err
	}
	flags := os.O_WRONLY | unix.O_NOFOLLOW
	if off == 0 {
		if r.nimages++; r.nimages > maxImages {
			return fmt.Errorf("more than %d image files", maxImages)
		}
		flags |= os.O_CREATE | os.O_EXCL
	}
	f, err := os.OpenFile(filepath.Join(r.images, name), flags, 0o600)
	if err != nil {
		return err
	}
	_, werr := f.WriteAt(data, off)
	return errors.Join(werr, f.Close())
}

// pagesPlan is how a pages image is made from a memory file: the pages
// its pagemap lists, in its order, as CRIU reads them.
type pagesPlan struct {
	pagemap string
	entries []pageserver.Entry
	size    int64
}

// plan checks that every image the source listed arrived, and plans the
// pages image of every pagemap among them.
func (r *receiver) plan(files []string) error {
	if len(files) > maxImages {
		return fmt.Errorf("%d image files", len(files))
	}
	r.plans = map[string]*pagesPlan{}
	dir, err := safefs.OpenDir(r.images)
	if err != nil {
		return err
	}
	defer dir.Close()
	for _, name := range files {
		if err := validFileName(name); err != nil {
			return err
		}
		if _, err := os.Lstat(filepath.Join(r.images, name)); err != nil {
			return fmt.Errorf("image %s was not sent: %w", name, err)
		}
		if !pagemapName.MatchString(name) {
			continue
		}
		b, err := dir.ReadFileBeneath(name, maxPagemap)
		if err != nil {
			return err
		}
		id, entries, err := pageserver.ParsePagemap(b)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		p := &pagesPlan{pagemap: name}
		for _, e := range entries {
			if e.Flags&pageserver.PEPresent != 0 {
				p.entries = append(p.entries, e)
				p.size += int64(e.NrPages) * PageSize
			}
		}
		pages := "pages-" + strconv.FormatUint(uint64(id), 10) + ".img"
		if _, dup := r.plans[pages]; dup {
			return fmt.Errorf("two pagemaps name %s", pages)
		}
		r.plans[pages] = p
	}
	return nil
}

// describe lists the job's images for a manifest: those received, and the
// pages images planned.
func (r *receiver) describe() ([]store.File, error) {
	ents, err := os.ReadDir(r.images)
	if err != nil {
		return nil, err
	}
	var files []store.File
	for _, e := range ents {
		fi, err := e.Info()
		if err != nil || !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("image %s: not a regular file", e.Name())
		}
		if _, planned := r.plans[e.Name()]; planned {
			continue
		}
		kind := "image"
		if e.Name() == outputs.ImageName || e.Name() == "dump.log" {
			kind = "log"
		}
		files = append(files, store.File{Name: e.Name(), Size: fi.Size(), Mode: 0o600, Kind: kind})
	}
	for name, p := range r.plans {
		files = append(files, store.File{Name: name, Size: p.size, Mode: 0o600, Kind: "pages"})
	}
	return files, nil
}

// Has implements criu.ImageSource: the job's images as CRIU restores them.
func (in *Incoming) Has(name string) bool {
	if _, ok := in.r.plans[name]; ok {
		return true
	}
	if validFileName(name) != nil {
		return false
	}
	fi, err := os.Lstat(filepath.Join(in.r.images, name))
	return err == nil && fi.Mode().IsRegular()
}

// Send implements criu.ImageSource: a pages image is read from the memory
// files as CRIU reads it, nothing copied beforehand.
func (in *Incoming) Send(ctx context.Context, name string, w io.Writer) error {
	if p, ok := in.r.plans[name]; ok {
		return in.r.sendPages(ctx, p, w)
	}
	if err := validFileName(name); err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(in.r.images, name), os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(w, f)
	return err
}

// sendPages writes the pages p lists to w, from the memory file (pages
// never written are zero).
func (r *receiver) sendPages(ctx context.Context, p *pagesPlan, w io.Writer) error {
	src := r.files[p.pagemap]
	buf := make([]byte, maxRunPages*PageSize)
	for _, e := range p.entries {
		left, addr := int64(e.NrPages)*PageSize, int64(e.Vaddr)
		for left > 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
			n := min(left, int64(len(buf)))
			b := buf[:n]
			k := 0
			if src != nil {
				var err error
				if k, err = src.ReadAt(b, addr); err != nil && !errors.Is(err, io.EOF) {
					return err
				}
			}
			clear(b[k:])
			if _, err := w.Write(b); err != nil {
				return err
			}
			addr += n
			left -= n
		}
	}
	return nil
}

// writePages writes every planned pages image into the images directory,
// each memory file removed once its pages are out of it.
func (r *receiver) writePages(ctx context.Context) error {
	for name, p := range r.plans {
		f, err := os.OpenFile(filepath.Join(r.images, name), os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
		if err != nil {
			return err
		}
		bw := bufio.NewWriterSize(f, 1<<20)
		err = r.sendPages(ctx, p, bw)
		if err == nil {
			err = bw.Flush()
		}
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		if src := r.files[p.pagemap]; src != nil {
			src.Close()
			delete(r.files, p.pagemap)
			_ = os.Remove(filepath.Join(r.mem, p.pagemap))
		}
	}
	r.plans = nil
	return nil
}

// The steps at which the receiving cryo kills itself (store.CrashEnv),
// for the tests of a destination that fails: "migrate-round" (a round
// received), "migrate-final" (every image received, nothing committed),
// "migrate-restored" (the job restored, its downtime not yet reported).
const CrashEnv = store.CrashEnv

func crashPoint(step string) { store.CrashPoint(step) }
