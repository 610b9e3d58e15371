package store

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/cryo-hpc/cryo/internal/privilege"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
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

// storeFormat is the layout of a store's directories (cryo-store.json);
// the manifests inside have their own FormatVersion. Format 2 keeps chunks
// in pack files (pack.go) and has a key for page digests (digest.go);
// format 1 kept one file per chunk under chunks/. This cryo reads both and
// writes format 2: the first writer of a format-1 store upgrades it (its
// old chunk files stay readable until `cryo gc --repack` packs them).
const storeFormat = 2

// maxMeta bounds cryo-store.json.
const maxMeta = 64 << 10

type storeMeta struct {
	Format    int       `json:"format"`
	CreatedBy string    `json:"created_by"`
	Created   time.Time `json:"created"`
	// Key (format 2) keys the page digests that name chunks and find the
	// pages a generation changed: 32 random bytes in hex, secret to whoever
	// can read the store (see digest.go).
	Key string `json:"key,omitempty"`
}

// Store is an opened store directory. Everything in it is reached through
// the directory's descriptor, opened once, without following links
// (beneath.go).
type Store struct {
	Dir string
	// Progress, when set, counts the bytes that writers, Verify and
	// Materialize process, for a caller that shows progress.
	Progress *Progress
	// PackLimit bounds the size of the pack files this Store writes (its
	// writers, its replica copies, healing and GC's repacking), index and
	// footer included: a record that would take the open pack past it goes
	// into a new pack. A pack holding a single record may exceed it, by
	// that record's size, when the record is larger on its own. 0 means
	// DefaultPackLimit. Set it before a writer starts; the packs already in
	// the store are read whatever their size.
	PackLimit int64

	r      root
	dirF   *os.File // keeps r.fd open as long as the Store lives
	metaMu sync.Mutex
	meta   storeMeta
	key    [32]byte // zero in a format-1 store until a writer upgrades it

	direct directState // whether chunk files may be written with O_DIRECT
	idx    packIndex
}

// DefaultPackLimit is the size a pack file is closed at when
// Store.PackLimit is 0: large enough that a store holds few files (what a
// parallel file system's metadata server bears), small enough that GC's
// repacking of a pack less than half in use moves little.
const DefaultPackLimit = 256 << 20

// MinPackLimit and MaxPackLimit bound the pack size that cryo's callers
// (checkpoint.Options.PackSize, `cryo checkpoint --pack-size`) may ask
// for: below 1 MiB a pack would hold about one chunk, the one-file-per-
// chunk store packs are there to avoid; above 64 GiB one damaged or
// repacked file costs too much. The store itself takes any PackLimit
// (its tests use 1: a pack per record).
const (
	MinPackLimit = 1 << 20
	MaxPackLimit = 64 << 30
)

// CheckPackLimit says whether n is a pack size callers may set: 0 (the
// default) or between MinPackLimit and MaxPackLimit.
func CheckPackLimit(n int64) error {
	if n != 0 && (n < MinPackLimit || n > MaxPackLimit) {
		return fmt.Errorf("pack size %d bytes is outside 1 MiB to 64 GiB", n)
	}
	return nil
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
	if err := os.MkdirAll(dir, dirMode); err != nil {
		return nil, fmt.Errorf("create store: %w", err)
	}
	s, err := openDir(dir)
	if err != nil {
		return nil, err
	}
	ents, err := s.r.readDir("")
	if err != nil {
		return nil, fmt.Errorf("create store: %w", err)
	}
	if len(ents) > 0 {
		return nil, fmt.Errorf("%w: %s exists, is not empty and has no %s", ErrNoStore, dir, metaName)
	}
	if err := unix.Fchmod(s.r.fd, dirMode); err != nil {
		return nil, fmt.Errorf("create store: %w", err)
	}
	if err := s.makeDirs(); err != nil {
		return nil, fmt.Errorf("create store: %w", err)
	}
	m := storeMeta{Format: storeFormat, CreatedBy: createdBy, Created: time.Now().UTC()}
	if err := s.writeMeta(m); err != nil {
		return nil, fmt.Errorf("create store: %w", err)
	}
	return s, nil
}

// openDir opens dir (following the path as given) as a store's root.
func openDir(dir string) (*Store, error) {
	f, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w: %s does not exist", ErrNoStore, dir)
		}
		if errors.Is(err, unix.ENOTDIR) {
			return nil, fmt.Errorf("%w: %s is not a directory", ErrNoStore, dir)
		}
		return nil, fmt.Errorf("open store: %w", err)
	}
	return &Store{Dir: dir, r: root{fd: int(f.Fd()), path: dir}, dirF: f}, nil
}

func (s *Store) makeDirs() error {
	for _, d := range []string{"packs", "checkpoints", "staging", "logs"} {
		if err := s.r.mkdirAll(d); err != nil {
			return err
		}
	}
	return nil
}

func (s *Store) writeMeta(m storeMeta) error {
	if m.Format >= 2 && m.Key == "" {
		var k [32]byte
		if _, err := rand.Read(k[:]); err != nil {
			return err
		}
		m.Key = hex.EncodeToString(k[:])
	}
	b, _ := json.MarshalIndent(m, "", " ")
	if err := s.r.writeFileAtomic(metaName, b); err != nil {
		return err
	}
	return s.setMeta(m)
}

func (s *Store) setMeta(m storeMeta) error {
	s.metaMu.Lock()
	defer s.metaMu.Unlock()
	s.meta = m
	s.key = [32]byte{}
	if m.Key != "" {
		k, err := hex.DecodeString(m.Key)
		if err != nil || len(k) != 32 {
			return fmt.Errorf("%w: %s: %s has a damaged key", ErrNoStore, s.Dir, metaName)
		}
		copy(s.key[:], k)
	}
	return nil
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
	s, err := openDir(dir)
	if err != nil {
		return nil, err
	}
	b, err := s.r.readFile(metaName, maxMeta)
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
	if m.Format < 1 || m.Format > storeFormat {
		return nil, fmt.Errorf("store %s has format %d; this cryo handles formats 1 and %d", dir, m.Format, storeFormat)
	}
	if m.Format >= 2 && m.Key == "" {
		return nil, fmt.Errorf("%w: %s: %s of format %d has no key", ErrNoStore, dir, metaName, m.Format)
	}
	if err := s.setMeta(m); err != nil {
		return nil, err
	}
	if err := s.makeDirs(); err != nil {
		return nil, err
	}
	return s, nil
}

// Format is the store's layout format (cryo-store.json): 1 (a chunk file
// each) or 2 (pack files).
func (s *Store) Format() int {
	s.metaMu.Lock()
	defer s.metaMu.Unlock()
	return s.meta.Format
}

// upgrade makes a format-1 store format 2 (a writer is about to add packs
// to it). The caller holds the exclusive lock.
func (s *Store) upgrade() error {
	s.metaMu.Lock()
	m := s.meta
	s.metaMu.Unlock()
	if m.Format >= storeFormat {
		return nil
	}
	m.Format = storeFormat
	return s.writeMeta(m)
}

// keyed returns the key of page digests, upgrading the store first when
// it has none. The caller holds the exclusive lock.
func (s *Store) keyed() ([32]byte, error) {
	if err := s.upgrade(); err != nil {
		return [32]byte{}, fmt.Errorf("upgrade store %s to format %d: %w", s.Dir, storeFormat, err)
	}
	s.metaMu.Lock()
	defer s.metaMu.Unlock()
	return s.key, nil
}

func (s *Store) pageKey() [32]byte {
	s.metaMu.Lock()
	defer s.metaMu.Unlock()
	return s.key
}

// Lock takes the store's lock: exclusive for writers (checkpoint, gc,
// retention), shared for readers (restore, verify). It waits until ctx is
// done and then fails with ErrLocked. The returned function releases it.
// The lock file is created beneath the store and never through a link.
func (s *Store) Lock(ctx context.Context, exclusive bool) (func(), error) {
	f, err := s.r.open("lock", unix.O_RDWR|unix.O_CREAT, fileMode)
	if err != nil {
		return nil, fmt.Errorf("lock store: %w", err)
	}
	if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("lock store: %s/lock is not a regular file", s.Dir)
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
// work that a killed writer left behind, and unfinished pack files. The
// caller must hold the exclusive lock.
func (s *Store) CleanStaging() (int, error) {
	ents, err := s.r.readDir("staging")
	if err != nil {
		return 0, err
	}
	var errs []error
	n := 0
	for _, e := range ents {
		if e.Name() == journalDir {
			continue // recovery's business, not debris
		}
		errs = append(errs, s.r.removeAll("staging/"+e.Name()))
		n++
	}
	if ents, err := s.r.readDir("packs"); err == nil {
		for _, e := range ents {
			if isPackTemp(e.Name()) {
				errs = append(errs, s.r.remove("packs/"+e.Name()))
				n++
			}
		}
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
	ents, err := s.r.readDir("checkpoints")
	if err != nil {
		return nil, err
	}
	var gens []int
	for _, e := range ents {
		if g, err := strconv.Atoi(e.Name()); err == nil && g > 0 && e.IsDir() && strconv.Itoa(g) == e.Name() {
			gens = append(gens, g)
		}
	}
	sort.Ints(gens)
	return gens, nil
}

// GenDir is the directory of a committed generation (for messages; the
// store itself opens it through its descriptor).
func (s *Store) GenDir(gen int) string {
	return filepath.Join(s.Dir, "checkpoints", strconv.Itoa(gen))
}

func genRel(gen int) string { return "checkpoints/" + strconv.Itoa(gen) }

// ReadManifest reads and checks a committed generation's manifest.
func (s *Store) ReadManifest(gen int) (*Manifest, error) {
	rel := genRel(gen) + "/manifest.json"
	p := filepath.Join(s.GenDir(gen), "manifest.json")
	b, err := s.r.readFile(rel, MaxManifest)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			if !s.r.exists(genRel(gen)) {
				return nil, fmt.Errorf("%w: %d in %s", ErrNoGeneration, gen, s.Dir)
			}
			return nil, fmt.Errorf("%w: generation %d: %s is missing", ErrCorrupt, gen, p)
		}
		return nil, fmt.Errorf("%w: generation %d: %v", ErrCorrupt, gen, err)
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

// manifestBytes reads a committed generation's manifest.json as it is.
func (s *Store) manifestBytes(gen int) ([]byte, error) {
	return s.r.readFile(genRel(gen)+"/manifest.json", MaxManifest)
}

// ChunkPath is where a format-1 store keeps the chunk with this hash (a
// pack store's chunks are in packs/, see ChunkLocation).
func (s *Store) ChunkPath(hash string) string {
	return filepath.Join(s.Dir, legacyRel(hash))
}

func legacyRel(hash string) string {
	if len(hash) < 2 {
		return "chunks/" + hash
	}
	return "chunks/" + hash[:2] + "/" + hash
}

// Remove deletes a committed generation (its chunks stay until GC). The
// caller must hold the exclusive lock.
func (s *Store) Remove(gen int) error {
	tmp := fmt.Sprintf("staging/removing-%d", gen)
	// Rename first so that a crash never leaves a half-deleted generation
	// that looks committed.
	if err := s.r.rename(genRel(gen), tmp); err != nil {
		return fmt.Errorf("remove generation %d: %w", gen, err)
	}
	if err := s.r.syncDir("checkpoints"); err != nil {
		return err
	}
	return s.r.removeAll(tmp)
}

// maxLogs is how many CRIU logs logs/ keeps.
const maxLogs = 20

// SaveLog copies the file at src (a CRIU log in a private work directory)
// into logs/ as a new file for a failed operation op, trims logs/ to its
// newest maxLogs files, and returns the new file's path. At most limit
// bytes of src are kept (its end).
func (s *Store) SaveLog(op, src string, limit int64) (string, error) {
	b, err := os.ReadFile(src)
	if err != nil {
		return "", err
	}
	if int64(len(b)) > limit {
		b = b[int64(len(b))-limit:]
	}
	if ents, err := s.r.readDir("logs"); err == nil && len(ents) >= maxLogs {
		for _, e := range ents[:len(ents)-maxLogs+1] { // names sort by time
			_ = s.r.remove("logs/" + e.Name())
		}
	}
	name := fmt.Sprintf("%s-%s.log", time.Now().UTC().Format("20060102T150405.000"), safeName(op))
	f, err := s.r.open("logs/"+name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL, fileMode)
	if err != nil {
		return "", err
	}
	_, err = f.Write(b)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return filepath.Join(s.Dir, "logs", name), err
}

// safeName keeps letters, digits and '-' of s.
func safeName(s string) string {
	b := []byte(s)
	out := b[:0]
	for _, c := range b {
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' {
			out = append(out, c)
		}
	}
	if len(out) == 0 {
		return "op"
	}
	return string(out)
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
