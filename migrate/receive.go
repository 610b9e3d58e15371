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
	"strconv"
	"time"

	"github.com/cryo-hpc/cryo/checkpoint"
	"github.com/cryo-hpc/cryo/internal/pageserver"
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

// Incoming is a migrated job committed to the destination's store, not
// yet running. The caller restores it, then says so (Restored), watches it
// through a grace period (Running) or gives up (Fail).
type Incoming struct {
	Job        json.RawMessage // the source's description of the job
	Generation int
	Store      string
	Rounds     int
	Commit     time.Duration

	c    *wire.Conn
	o    ReceiveOptions
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
	defer os.RemoveAll(work)
	r := &receiver{mem: filepath.Join(work, "mem"), images: filepath.Join(work, "images"), files: map[string]*os.File{}}
	defer r.close()
	if err := errors.Join(os.Mkdir(r.mem, 0o700), os.Mkdir(r.images, 0o700)); err != nil {
		return nil, err
	}
	if err := c.SendJSON(kindWelcome, welcome{Version: Version}); err != nil {
		return nil, err
	}
	in = &Incoming{Job: h.Job, Store: st.Dir, c: c, o: o}
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
	t0 := time.Now()
	if err := r.assemble(fin.Files); err != nil {
		return nil, fmt.Errorf("assemble the job's images: %w", err)
	}
	ckpt, err := checkpoint.Import(ctx, checkpoint.ImportOptions{Store: st.Dir, Images: r.images, Manifest: fin.Manifest})
	if err != nil {
		return nil, fmt.Errorf("commit the migrated job: %w", err)
	}
	in.Generation, in.Commit = ckpt.Generation, time.Since(t0)
	log.Info("migrated job committed", "generation", in.Generation, "took", in.Commit)
	return in, nil
}

// Restored tells the source that the job runs here (restore took took):
// its downtime ends.
func (in *Incoming) Restored(took time.Duration) error {
	crashPoint("migrate-restored")
	return in.c.SendJSON(kindRestored, restored{Generation: in.Generation, RestoreNS: took.Nanoseconds(), CommitNS: in.Commit.Nanoseconds()})
}

// Running tells the source that the job is alive after its grace period
// and waits until the source's copy is gone. After an error the caller
// must end its copy (Fail): the source may run the job again.
func (in *Incoming) Running() error {
	if err := in.c.SendJSON(kindRunning, struct{}{}); err != nil {
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
	files       map[string]*os.File // by pagemap name
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

// assemble writes the pages image of every pagemap received, from the
// memory files, in the pagemap's order, as CRIU reads it.
func (r *receiver) assemble(files []string) error {
	if len(files) > maxImages {
		return fmt.Errorf("%d image files", len(files))
	}
	buf := make([]byte, maxRunPages*PageSize)
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
		if err := r.assembleOne(name, buf); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	return nil
}

func (r *receiver) assembleOne(name string, buf []byte) error {
	pm, err := os.Open(filepath.Join(r.images, name))
	if err != nil {
		return err
	}
	b, err := io.ReadAll(io.LimitReader(pm, maxPagemap+1))
	pm.Close()
	if err != nil {
		return err
	}
	if len(b) > maxPagemap {
		return fmt.Errorf("more than %d bytes", maxPagemap)
	}
	id, entries, err := pageserver.ParsePagemap(b)
	if err != nil {
		return err
	}
	out, err := os.OpenFile(filepath.Join(r.images, "pages-"+strconv.FormatUint(uint64(id), 10)+".img"),
		os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	defer out.Close()
	src := r.files[name] // nil: no page of it was sent (all zero or none)
	var at int64
	for _, e := range entries {
		if e.Flags&pageserver.PEPresent == 0 {
			continue
		}
		left := int64(e.NrPages) * PageSize
		addr := int64(e.Vaddr)
		for left > 0 {
			n := min(left, int64(len(buf)))
			p := buf[:n]
			k := 0
			if src != nil {
				if k, err = src.ReadAt(p, addr); err != nil && !errors.Is(err, io.EOF) {
					return err
				}
			}
			clear(p[k:]) // past the file's end: pages never written are zero
			if _, err := out.WriteAt(p, at); err != nil {
				return err
			}
			at += n
			addr += n
			left -= n
		}
	}
	if src != nil {
		// The memory is in the pages image now.
		src.Close()
		delete(r.files, name)
		_ = os.Remove(filepath.Join(r.mem, name))
	}
	return out.Sync()
}

// CrashEnv names a step at which the receiving cryo kills itself with
// SIGKILL, for the tests of a destination that fails: "migrate-round" (a
// round received), "migrate-final" (every image received, nothing
// committed), "migrate-restored" (the job restored, its downtime not yet
// reported).
const CrashEnv = "CRYO_TEST_CRASH_AT"

func crashPoint(step string) {
	if os.Getenv(CrashEnv) != step {
		return
	}
	_ = unix.Kill(os.Getpid(), unix.SIGKILL)
	select {}
}
