package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/cryo-hpc/cryo/internal/privilege"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

var (
	// ErrNoStore means the directory is not a cryo store.
	ErrNoStore = errors.New("not a cryo store")
	// ErrLocked means another cryo holds the store's lock.
	ErrLocked = errors.New("store is locked by another cryo")
	// ErrCorrupt means a generation failed verification.
	ErrCorrupt = errors.New("checkpoint is corrupt")
	// ErrNoGeneration means the requested generation does not exist.
	ErrNoGeneration = errors.New("no such generation")
)

const (
	dirMode  = 0o700
	fileMode = 0o600
	metaName = "cryo-store.json"
)

// storeFormat is the layout of a store's directories (store.json); the
// manifests inside have their own FormatVersion.
const storeFormat = 1

type storeMeta struct {
	Format    int       `json:"format"`
	CreatedBy string    `json:"created_by"`
	Created   time.Time `json:"created"`
}

// Store is an opened store directory.
type Store struct {
	Dir string
	// Progress, when set, counts the bytes that writers, Verify and
	// Materialize process, for a caller that shows progress.
	Progress *Progress

	direct directState // whether chunk files may be written with O_DIRECT
}

// Create opens the store at dir, creating it (and its parents) if needed.
// An existing non-empty directory that is not a store is refused.
func Create(dir, createdBy string) (*Store, error) {
	dir = filepath.Clean(dir)
	if privilege.ActingAsRoot() {
		// Root creates a store only where no one else can change it.
		// (What MkdirAll creates below the nearest existing directory is
		// root's, made as the store's own.)
		at := dir
		for {
			if _, err := os.Lstat(at); !errors.Is(err, fs.ErrNotExist) || at == filepath.Dir(at) {
				break
			}
			at = filepath.Dir(at)
		}
		if err := trustedAsRoot(at); err != nil {
			return nil, err
		}
	}
	if s, err := Open(dir); err == nil {
		return s, nil
	} else if !errors.Is(err, ErrNoStore) {
		return nil, err
	}
	if ents, err := os.ReadDir(dir); err == nil && len(ents) > 0 {
		return nil, fmt.Errorf("%w: %s exists, is not empty and has no %s", ErrNoStore, dir, metaName)
	}
	if err := os.MkdirAll(dir, dirMode); err != nil {
		return nil, fmt.Errorf("create store: %w", err)
	}
	if err := os.Chmod(dir, dirMode); err != nil {
		return nil, err
	}
	for _, d := range []string{"chunks", "checkpoints", "staging", "logs"} {
		if err := os.MkdirAll(filepath.Join(dir, d), dirMode); err != nil {
			return nil, fmt.Errorf("create store: %w", err)
		}
	}
	b, _ := json.MarshalIndent(storeMeta{Format: storeFormat, CreatedBy: createdBy, Created: time.Now().UTC()}, "", " ")
	if err := writeFileAtomic(filepath.Join(dir, metaName), b); err != nil {
		return nil, fmt.Errorf("create store: %w", err)
	}
	return &Store{Dir: dir}, nil
}

// trustedAsRoot refuses, as root, a store (or the directory to create one
// in) that someone other than root could change: its files, links or
// directories could then turn root's reads, writes and deletions, and the
// images it restores, against root (docs/security.md).
func trustedAsRoot(dir string) error {
	if err := privilege.Trusted(dir); err != nil {
		return fmt.Errorf("as root, cryo uses only stores that root alone can change, and %w; use the store as its owner, without root (cryo runs CRIU unprivileged for users)", err)
	}
	return nil
}

// Open opens an existing store.
func Open(dir string) (*Store, error) {
	dir = filepath.Clean(dir)
	if privilege.ActingAsRoot() {
		if err := trustedAsRoot(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
	}
	st, err := os.Stat(dir)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w: %s does not exist", ErrNoStore, dir)
		}
		return nil, fmt.Errorf("open store: %w", err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("%w: %s is not a directory", ErrNoStore, dir)
	}
	b, err := os.ReadFile(filepath.Join(dir, metaName))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w: %s has no %s", ErrNoStore, dir, metaName)
		}
		return nil, fmt.Errorf("open store: %w", err)
	}
	var m storeMeta
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%w: %s: %s is damaged: %v", ErrNoStore, dir, metaName, err)
	}
	if m.Format != storeFormat {
		return nil, fmt.Errorf("store %s has format %d; this cryo handles format %d", dir, m.Format, storeFormat)
	}
	for _, d := range []string{"chunks", "checkpoints", "staging", "logs"} {
		if err := os.MkdirAll(filepath.Join(dir, d), dirMode); err != nil {
			return nil, err
		}
	}
	return &Store{Dir: dir}, nil
}

// Lock takes the store's lock: exclusive for writers (checkpoint, gc,
// retention), shared for readers (restore, verify). It waits until ctx is
// done and then fails with ErrLocked. The returned function releases it.
func (s *Store) Lock(ctx context.Context, exclusive bool) (func(), error) {
	f, err := os.OpenFile(filepath.Join(s.Dir, "lock"), os.O_RDWR|os.O_CREATE, fileMode)
	if err != nil {
		return nil, fmt.Errorf("lock store: %w", err)
	}
	how := unix.LOCK_SH
	if exclusive {
		how = unix.LOCK_EX
	}
	for {
		err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock store: %w", err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("%w: %s (%v)", ErrLocked, s.Dir, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
	return func() { f.Close() }, nil
}

// CleanStaging removes everything in staging/ but the journal directory:
// work that a killed writer left behind. The caller must hold the exclusive
// lock.
func (s *Store) CleanStaging() (int, error) {
	dir := filepath.Join(s.Dir, "staging")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var errs []error
	n := 0
	for _, e := range ents {
		if e.Name() == journalDir {
			continue // recovery's business, not debris
		}
		errs = append(errs, os.RemoveAll(filepath.Join(dir, e.Name())))
		n++
	}
	return n, errors.Join(errs...)
}

// journalDir is the directory in staging/ for intent journals.
const journalDir = "journal"

// JournalDir is where operations that change a job's state outside the
// store (offload contexts locked, a job left stopped) keep their intent
// journals: staging/journal/. CleanStaging leaves it alone; the offload
// package reads and removes what is in it.
func (s *Store) JournalDir() string {
	return filepath.Join(s.Dir, "staging", journalDir)
}

// Generations lists the committed generations, oldest first.
func (s *Store) Generations() ([]int, error) {
	ents, err := os.ReadDir(filepath.Join(s.Dir, "checkpoints"))
	if err != nil {
		return nil, err
	}
	var gens []int
	for _, e := range ents {
		if g, err := strconv.Atoi(e.Name()); err == nil && g > 0 && e.IsDir() {
			gens = append(gens, g)
		}
	}
	sort.Ints(gens)
	return gens, nil
}

// GenDir is the directory of a committed generation.
func (s *Store) GenDir(gen int) string {
	return filepath.Join(s.Dir, "checkpoints", strconv.Itoa(gen))
}

// ReadManifest reads and checks a committed generation's manifest.
func (s *Store) ReadManifest(gen int) (*Manifest, error) {
	p := filepath.Join(s.GenDir(gen), "manifest.json")
	b, err := os.ReadFile(p)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			if _, serr := os.Stat(s.GenDir(gen)); serr != nil {
				return nil, fmt.Errorf("%w: %d in %s", ErrNoGeneration, gen, s.Dir)
			}
			return nil, fmt.Errorf("%w: generation %d: %s is missing", ErrCorrupt, gen, p)
		}
		return nil, err
	}
	m, err := parseManifest(b)
	if err != nil {
		return nil, fmt.Errorf("%w: generation %d: %s: %v", ErrCorrupt, gen, p, err)
	}
	if m.Generation != gen {
		return nil, fmt.Errorf("%w: generation %d: %s names generation %d", ErrCorrupt, gen, p, m.Generation)
	}
	return m, nil
}

// ChunkPath is where a chunk with this hash lives.
func (s *Store) ChunkPath(hash string) string {
	return filepath.Join(s.Dir, "chunks", hash[:2], hash)
}

// Remove deletes a committed generation (its chunks stay until GC). The
// caller must hold the exclusive lock.
func (s *Store) Remove(gen int) error {
	dir := s.GenDir(gen)
	tmp := filepath.Join(s.Dir, "staging", fmt.Sprintf("removing-%d", gen))
	// Rename first so that a crash never leaves a half-deleted generation
	// that looks committed.
	if err := os.Rename(dir, tmp); err != nil {
		return fmt.Errorf("remove generation %d: %w", gen, err)
	}
	if err := syncDir(filepath.Join(s.Dir, "checkpoints")); err != nil {
		return err
	}
	return os.RemoveAll(tmp)
}

// LogPath returns a new path under logs/ for a failed operation's CRIU log,
// and trims logs/ to its newest 20 files.
func (s *Store) LogPath(op string) string {
	dir := filepath.Join(s.Dir, "logs")
	if ents, err := os.ReadDir(dir); err == nil && len(ents) >= 20 {
		for _, e := range ents[:len(ents)-19] { // names sort by time
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
	return filepath.Join(dir, fmt.Sprintf("%s-%s.log", time.Now().UTC().Format("20060102T150405.000"), op))
}

func writeFileAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, fileMode)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	return syncDir(filepath.Dir(path))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}

// DefaultLockWait is how long LockWithin waits when given no time.
const DefaultLockWait = 30 * time.Second

// LockWithin is Lock with a bound: it waits at most wait (DefaultLockWait
// when 0) for another cryo holding the store.
func (s *Store) LockWithin(ctx context.Context, exclusive bool, wait time.Duration) (func(), error) {
	if wait == 0 {
		wait = DefaultLockWait
	}
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	return s.Lock(ctx, exclusive)
}
