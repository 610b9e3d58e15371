package store

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

// FormatVersion is the manifest format this cryo writes. Format 2 added
// shuffled chunks (compress.go) and Chunk.Check; format 3 names chunks by
// their keyed page digests (digest.go), stores them in packs, maybe as
// deltas (delta.go), records the address of memory chunks (Chunk.Addr),
// and gives zero chunks no name. This cryo reads formats 1 and 2 as well,
// whose chunks are named by the SHA-256 of their content.
const FormatVersion = 3

// Bounds on what a manifest may say, checked before anything is allocated
// for it: a manifest is data from a directory its owner can write, and a
// crafted one must not make a restore (maybe root's) allocate or loop
// beyond what a real job needs.
const (
	// MaxManifest is the largest manifest.json read: about 800k chunks,
	// 800 GiB of memory in 1 MiB chunks.
	MaxManifest = 128 << 20
	maxFiles    = 1 << 16 // image files in one generation
	maxProcs    = 1 << 16 // processes, and thread IDs of one process
	maxOffload  = 1 << 12 // offload contexts, and devices or attributes of one
	maxName     = 4096    // a file or tree name
	maxText     = 1 << 16 // any other string
	// MaxImage is the largest non-pages image a reader loads into memory
	// whole (pagemaps, mm, core, pstree). Real ones are kilobytes to a
	// few megabytes.
	MaxImage = 64 << 20
	// maxZeroLengths bounds the zero-chunk lengths of a format-1 or -2
	// manifest whose names are checked by hashing zeros.
	maxZeroLengths = 64
)

// Manifest describes one committed generation.
type Manifest struct {
	Format     int       `json:"format"`
	Generation int       `json:"generation"`
	Created    time.Time `json:"created"`
	Host       string    `json:"host"`
	CreatedBy  string    `json:"created_by"`
	Job        Job       `json:"job"`
	CRIU       CRIUInfo  `json:"criu"`
	Stats      Stats     `json:"stats"`
	Files      []File    `json:"files"`
	Offload    []Offload `json:"offload,omitempty"`
	// Checksum is the SHA-256 of the manifest with this field empty.
	Checksum string `json:"checksum"`
}

// Job is what was checkpointed.
type Job struct {
	RootPID   int       `json:"root_pid"`
	Processes []Process `json:"processes"`
	// Trees names the image subdirectories when a job was dumped as several
	// trees; empty for one tree whose images are at the top level.
	Trees []string `json:"trees,omitempty"`
}

// Process is one task of the dumped tree, from CRIU's pstree and core images.
type Process struct {
	PID     int    `json:"pid"`
	PPID    int    `json:"ppid"`
	PGID    int    `json:"pgid"`
	SID     int    `json:"sid"`
	Threads int    `json:"threads"`
	TIDs    []int  `json:"tids,omitempty"` // thread IDs, which restore needs free too
	Comm    string `json:"comm"`
}

// CRIUInfo records how CRIU made the images.
type CRIUInfo struct {
	Version        string `json:"version"`
	LeaveRunning   bool   `json:"leave_running"`
	TCPEstablished bool   `json:"tcp_established"`
	ShellJob       bool   `json:"shell_job"`
}

// Stats are the costs of taking the checkpoint.
type Stats struct {
	FrozenMS     int64 `json:"frozen_ms"`              // the job could not run (CRIU freezing + frozen)
	DumpMS       int64 `json:"dump_ms"`                // the CRIU dump call
	DurableMS    int64 `json:"durable_ms"`             // start of checkpoint until committed
	FreezingMS   int64 `json:"freezing_ms"`            // from CRIU's stats-dump
	MemdumpMS    int64 `json:"memdump_ms"`             // from CRIU's stats-dump
	MemwriteMS   int64 `json:"memwrite_ms"`            // from CRIU's stats-dump
	PagesScanned int64 `json:"pages_scanned"`          // from CRIU's stats-dump
	PagesWritten int64 `json:"pages_written"`          // from CRIU's stats-dump
	RawBytes     int64 `json:"raw_bytes"`              // image bytes before compression
	StoredBytes  int64 `json:"stored_bytes"`           // compressed bytes of all chunks referenced
	NewBytes     int64 `json:"new_bytes"`              // compressed bytes this generation added
	Chunks       int   `json:"chunks"`                 // chunks referenced
	NewChunks    int   `json:"new_chunks"`             // chunks this generation added
	DeltaChunks  int   `json:"delta_chunks,omitempty"` // new chunks stored as page deltas
	Packs        int   `json:"packs,omitempty"`        // pack files this generation added
}

// File is one image file, as a list of chunks in order.
type File struct {
	Name string `json:"name"` // relative path inside the images directory
	Size int64  `json:"size"`
	Mode uint32 `json:"mode"`
	// Kind is "image" (restored with the job), "pages" (memory pages), or
	// "log" (kept for inspection, not restored).
	Kind string `json:"kind"`
	// Digest is the SHA-256 over the file's chunk hashes and lengths: it
	// binds the chunks' order, and each chunk's name binds its content.
	Digest string  `json:"digest"`
	Chunks []Chunk `json:"chunks"`
}

// Chunk is a piece of a file, named by its content: in format 3 by its
// keyed page digests (digest.go), before by the SHA-256 of its content.
type Chunk struct {
	Hash   string `json:"h"`
	Len    int64  `json:"n"` // uncompressed length
	Stored int64  `json:"z"` // length of its blob in the store (a delta's, for a delta)
	// Check is the CRC-32C and the CRC-32 (IEEE) of the chunk file's
	// bytes, 16 hex digits: a read whose file matches it knows the file is
	// as written and decompresses it without hashing the content again
	// (see decodeChunk), which on restore cost more CPU than anything but
	// CRIU. Against damage, 64 bits of CRC are what a disk's checksums
	// give; the SHA-256 name still decides identity (dedup), and cryo
	// verify still hashes every chunk's content. Empty in format 1.
	Check string `json:"c,omitempty"`
	// Zero marks a chunk of zero bytes: it has no blob in the store, and
	// restore leaves a hole where it goes. In format 3 it has no Hash.
	Zero bool `json:"0,omitempty"`
	// Addr is the virtual address of a memory chunk's first byte (format
	// 3, streamed pages): where the next generation looks for the chunk's
	// previous version.
	Addr uint64 `json:"a,omitempty"`
}

var zeros = make([]byte, MaxChunk)

// isZero reports whether b holds only zero bytes.
func isZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeros))
		if !bytes.Equal(b[:n], zeros[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

var zeroHashes sync.Map // length -> hex SHA-256 of that many zero bytes

// zeroHash is the SHA-256 of n zero bytes.
func zeroHash(n int) string {
	if h, ok := zeroHashes.Load(n); ok {
		return h.(string)
	}
	h := sha256.New()
	for left := n; left > 0; {
		k := min(left, len(zeros))
		h.Write(zeros[:k])
		left -= k
	}
	s := hex.EncodeToString(h.Sum(nil))
	if n%PageSize == 0 { // the lengths a writer makes: a bounded cache
		zeroHashes.Store(n, s)
	}
	return s
}

// Offload is one offload context of the job (filled by the offload drivers).
type Offload struct {
	Kind string `json:"kind"` // "cuda", "process"
	PID  int    `json:"pid"`
	// JobPID is PID's PID in the job's own PID namespace (the one the
	// images name), for a job that has one; 0 when it is PID itself.
	JobPID int    `json:"job_pid,omitempty"`
	Device string `json:"device,omitempty"` // the first of Devices, for a quick look
	// Devices are the devices the context held, so that a restore can check
	// (and choose) its target devices before it starts.
	Devices []OffloadDevice `json:"devices,omitempty"`
	// State is the context's state when it was found ("running", "locked").
	State string            `json:"state,omitempty"`
	Attrs map[string]string `json:"attrs,omitempty"`
}

// OffloadDevice is one device an offload context held.
type OffloadDevice struct {
	UUID   string `json:"uuid"`
	Model  string `json:"model,omitempty"`
	Index  int    `json:"index"`
	Memory uint64 `json:"memory_bytes,omitempty"` // device memory it held there
}

// fileDigest binds a file's chunks together.
func fileDigest(chunks []Chunk) string {
	h := sha256.New()
	for _, c := range chunks {
		fmt.Fprintf(h, "%s:%d\n", c.Hash, c.Len)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func (m *Manifest) seal() ([]byte, error) {
	m.Checksum = ""
	body, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(body)
	m.Checksum = hex.EncodeToString(sum[:])
	// Compact: a manifest lists every chunk, and is written anew by every
	// generation (indented, a 2 GiB job's took 15% more).
	return json.Marshal(m)
}

// parseManifest decodes and checks a manifest's own checksum.
func parseManifest(b []byte) (*Manifest, error) {
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("manifest.json is not valid JSON (truncated?): %w", err)
	}
	if m.Format < 1 || m.Format > FormatVersion {
		return nil, fmt.Errorf("manifest.json has format %d; this cryo reads formats 1 to %d", m.Format, FormatVersion)
	}
	want := m.Checksum
	body, _ := json.Marshal(withoutChecksum(m))
	sum := sha256.Sum256(body)
	if hex.EncodeToString(sum[:]) != want {
		return nil, fmt.Errorf("manifest.json does not match its checksum")
	}
	// The checksum covers what the fields say; JSON reads keys without
	// regard to case, so a flipped bit can change a key and still say the
	// same. cryo writes each manifest exactly as its fields encode, so any
	// other byte (but whitespace) is damage.
	var raw bytes.Buffer
	canon, err := json.Marshal(&m)
	if err != nil || json.Compact(&raw, b) != nil || !bytes.Equal(canon, raw.Bytes()) {
		return nil, fmt.Errorf("manifest.json is damaged: its bytes are not those its fields encode to")
	}
	if err := m.checkBounds(); err != nil {
		return nil, err
	}
	zeroLens := map[int64]bool{}
	for _, f := range m.Files {
		if fileDigest(f.Chunks) != f.Digest {
			return nil, fmt.Errorf("manifest.json: %.200s: chunk list does not match its digest", f.Name)
		}
		// The checksums say the manifest is as written, not that whoever
		// wrote it was cryo: every number and name that reaches a path,
		// an allocation or a loop is checked.
		var size int64
		for i, c := range f.Chunks {
			bad := c.Len < 0 || c.Len > MaxChunk || c.Stored < 0 || c.Stored > maxStored || c.Check != "" && !validCheck(c.Check)
			switch {
			case c.Zero && m.Format >= 3:
				bad = bad || c.Hash != "" || c.Stored != 0 || c.Check != ""
			case c.Zero:
				if !zeroLens[c.Len] {
					if len(zeroLens) >= maxZeroLengths {
						return nil, fmt.Errorf("manifest.json: %.200s: zero chunks of more than %d lengths", f.Name, maxZeroLengths)
					}
					zeroLens[c.Len] = true
				}
				if validHash(c.Hash) && c.Hash != zeroHash(int(c.Len)) {
					return nil, fmt.Errorf("manifest.json: %.200s: chunk %d is marked zero but its hash says otherwise", f.Name, i)
				}
				bad = bad || !validHash(c.Hash)
			default:
				bad = bad || !validHash(c.Hash) || c.Len == 0 && len(f.Chunks) > 1
			}
			if bad {
				return nil, fmt.Errorf("manifest.json: %.200s: chunk %d is not a valid chunk (hash %.80q, %d bytes, %d stored)", f.Name, i, c.Hash, c.Len, c.Stored)
			}
			size += c.Len
		}
		if size != f.Size {
			return nil, fmt.Errorf("manifest.json: %.200s: chunks add up to %d bytes, file is %d", f.Name, size, f.Size)
		}
	}
	return &m, nil
}

// checkBounds checks the counts, sizes and names a manifest gives.
func (m *Manifest) checkBounds() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("manifest.json: "+format, a...)
	}
	if m.Generation < 1 {
		return bad("generation %d", m.Generation)
	}
	if len(m.Files) > maxFiles {
		return bad("%d files, more than %d", len(m.Files), maxFiles)
	}
	if len(m.Job.Processes) > maxProcs || len(m.Job.Trees) > maxProcs || len(m.Offload) > maxOffload {
		return bad("%d processes, %d trees, %d offload contexts: more than a job has", len(m.Job.Processes), len(m.Job.Trees), len(m.Offload))
	}
	for _, s := range []string{m.Host, m.CreatedBy, m.CRIU.Version} {
		if len(s) > maxText {
			return bad("a field of %d bytes", len(s))
		}
	}
	for _, p := range m.Job.Processes {
		if len(p.TIDs) > maxProcs || len(p.Comm) > maxText || p.PID < 0 || p.Threads < 0 || p.Threads > maxProcs {
			return bad("process %d is not a valid process", p.PID)
		}
		for _, t := range p.TIDs {
			if t <= 0 {
				return bad("process %d has thread ID %d", p.PID, t)
			}
		}
	}
	trees := map[string]bool{}
	for _, t := range m.Job.Trees {
		if err := validImageName(t); err != nil || strings.Contains(t, "/") || trees[t] {
			return bad("tree name %.200q is not a plain, unique directory name", t)
		}
		trees[t] = true
	}
	for _, o := range m.Offload {
		if len(o.Devices) > maxOffload || len(o.Attrs) > maxOffload || len(o.Kind) > maxText || len(o.Device) > maxText || len(o.State) > maxText {
			return bad("an offload context of kind %.80q says more than one has", o.Kind)
		}
		for k, v := range o.Attrs {
			if len(k) > maxText || len(v) > maxText {
				return bad("an offload attribute of %d bytes", len(k)+len(v))
			}
		}
	}
	names := make(map[string]bool, len(m.Files))
	for _, f := range m.Files {
		if err := validImageName(f.Name); err != nil {
			return bad("file %.200q: %v", f.Name, err)
		}
		if names[f.Name] {
			return bad("file %.200q is listed twice", f.Name)
		}
		names[f.Name] = true
		switch f.Kind {
		case "image", "pages", "log":
		default:
			return bad("file %.200q is of unknown kind %.80q", f.Name, f.Kind)
		}
		if f.Size < 0 || len(f.Chunks) == 0 || f.Size > int64(len(f.Chunks))*MaxChunk {
			return bad("file %.200q: %d bytes in %d chunks", f.Name, f.Size, len(f.Chunks))
		}
		if f.Kind != "pages" && f.Size > MaxImage {
			return bad("image %.200q of %d bytes, more than the %d an image has", f.Name, f.Size, MaxImage)
		}
	}
	return nil
}

// validImageName is a file name a generation may hold: relative, clean,
// without "..", of printable characters, and short.
func validImageName(name string) error {
	if name == "" || len(name) > maxName {
		return fmt.Errorf("a name of %d bytes", len(name))
	}
	if err := cleanRel(name); err != nil {
		return err
	}
	for _, r := range name {
		if r < 0x20 || r == 0x7f || r == utf8.RuneError {
			return errors.New("a name with control characters")
		}
	}
	return nil
}

// validHash is a SHA-256 in lowercase hex, the only form a chunk name has.
func validHash(h string) bool { return len(h) == 64 && lowerHex(h) }

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// fileCheck is a chunk file's Check: its CRC-32C and CRC-32 (IEEE), both
// computed by the CPU's own instructions (tens of GB/s).
func fileCheck(z []byte) string {
	var b [8]byte
	binary.BigEndian.PutUint32(b[:4], crc32.Checksum(z, castagnoli))
	binary.BigEndian.PutUint32(b[4:], crc32.ChecksumIEEE(z))
	return hex.EncodeToString(b[:])
}

// validCheck is a Chunk.Check: 8 bytes in lowercase hex.
func validCheck(h string) bool { return len(h) == 16 && lowerHex(h) }

func lowerHex(h string) bool {
	for i := 0; i < len(h); i++ {
		if c := h[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

func withoutChecksum(m Manifest) Manifest { m.Checksum = ""; return m }

// RawBytes is the sum of the files' sizes.
func (m *Manifest) RawBytes() int64 {
	var n int64
	for _, f := range m.Files {
		n += f.Size
	}
	return n
}
