package migrate

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"

	"github.com/cryo-hpc/cryo/internal/store"
)

// Version is the protocol's version; both sides must speak the same.
const Version = 1

// Message kinds (wire kinds).
const (
	kindHello    uint16 = 1  // src -> dst: hello (JSON)
	kindWelcome  uint16 = 2  // dst -> src: welcome (JSON)
	kindPages    uint16 = 3  // src -> dst: a run of pages (binary, pageHeader)
	kindRoundEnd uint16 = 4  // src -> dst: roundEnd (JSON)
	kindRoundAck uint16 = 5  // dst -> src: roundAck (JSON)
	kindFile     uint16 = 6  // src -> dst: a piece of an image file (binary, fileHeader)
	kindFinal    uint16 = 7  // src -> dst: final (JSON); every page and file was sent
	kindRestored uint16 = 8  // dst -> src: restored (JSON); the job runs there
	kindRunning  uint16 = 9  // dst -> src: the job is alive after the grace period
	kindEnded    uint16 = 10 // src -> dst: the source's copy is gone
)

// PageSize is the page size on the wire.
const PageSize = 4096

// maxRunPages bounds one pages message (1 MiB of pages).
const maxRunPages = 256

// maxFilePiece bounds one file message's data.
const maxFilePiece = 8 << 20

type hello struct {
	Version int `json:"version"`
	// Job is the caller's description of the job (monitor's job
	// definition), passed through to the destination's caller.
	Job json.RawMessage `json:"job"`
	// Bytes is the job's memory the rounds will read, for the
	// destination's estimate of room.
	Bytes int64 `json:"bytes"`
	// Standby: the destination is kept up to date with the job's
	// generations (standby.go), named with the source store's key.
	Standby  bool   `json:"standby,omitempty"`
	StoreKey string `json:"store_key,omitempty"`
	// Base is a generation the source offers as common ground (base.go).
	Base *Base `json:"base,omitempty"`
}

type welcome struct {
	Version int `json:"version"`
	// Base: the destination holds the offered base and loaded its pages.
	Base bool `json:"base,omitempty"`
}

type roundEnd struct {
	Round int   `json:"round"`
	Pages int64 `json:"pages"` // pages sent this round
}

type roundAck struct {
	Round int `json:"round"`
}

type final struct {
	Manifest *store.Manifest `json:"manifest"`
	Files    []string        `json:"files"` // every image file sent, pagemaps included
}

type restored struct {
	RestoreNS int64 `json:"restore_ns"`
}

type running struct {
	Generation int   `json:"generation"`
	CommitNS   int64 `json:"commit_ns"`
}

// Page runs on the wire: a 16-byte header, the pagemap image's name, and
// the pages (none for a run of zero pages).
//
//	u8 flags | u8 name length | u16 0 | u32 pages | u64 address | name | data
const (
	pageZero       = 1 // the pages are zero: no data follows
	pageHeaderSize = 16
)

type pageHeader struct {
	zero  bool
	name  string
	pages int
	addr  uint64
}

// Names of the images pages belong to: a process's pagemap, or a shared
// memory segment's.
var pagemapName = regexp.MustCompile(`^pagemap-(shmem-)?[0-9]{1,20}\.img$`)

func appendPages(b []byte, h pageHeader, data []byte) []byte {
	var flags byte
	if h.zero {
		flags = pageZero
	}
	b = append(b, flags, byte(len(h.name)), 0, 0)
	b = binary.LittleEndian.AppendUint32(b, uint32(h.pages))
	b = binary.LittleEndian.AppendUint64(b, h.addr)
	b = append(b, h.name...)
	if !h.zero {
		b = append(b, data...)
	}
	return b
}

func parsePages(b []byte) (pageHeader, []byte, error) {
	if len(b) < pageHeaderSize {
		return pageHeader{}, nil, errors.New("pages message: short header")
	}
	h := pageHeader{zero: b[0]&pageZero != 0, pages: int(binary.LittleEndian.Uint32(b[4:])), addr: binary.LittleEndian.Uint64(b[8:])}
	n := int(b[1])
	if len(b) < pageHeaderSize+n {
		return pageHeader{}, nil, errors.New("pages message: short name")
	}
	h.name = string(b[pageHeaderSize : pageHeaderSize+n])
	data := b[pageHeaderSize+n:]
	switch {
	case !pagemapName.MatchString(h.name):
		return h, nil, fmt.Errorf("pages message: bad image name %q", h.name)
	case h.pages <= 0 || h.pages > maxRunPages:
		return h, nil, fmt.Errorf("pages message: %d pages", h.pages)
	case h.addr%PageSize != 0 || h.addr > 1<<56:
		return h, nil, fmt.Errorf("pages message: address %#x", h.addr)
	case h.zero && len(data) != 0, !h.zero && len(data) != h.pages*PageSize:
		return h, nil, fmt.Errorf("pages message: %d bytes for %d pages", len(data), h.pages)
	}
	return h, data, nil
}

// File pieces on the wire: u64 offset | u16 name length | name | data.
func appendFile(b []byte, name string, off int64, data []byte) []byte {
	b = binary.LittleEndian.AppendUint64(b, uint64(off))
	b = binary.LittleEndian.AppendUint16(b, uint16(len(name)))
	b = append(b, name...)
	return append(b, data...)
}

func parseFile(b []byte) (name string, off int64, data []byte, err error) {
	if len(b) < 10 {
		return "", 0, nil, errors.New("file message: short header")
	}
	off = int64(binary.LittleEndian.Uint64(b))
	n := int(binary.LittleEndian.Uint16(b[8:]))
	if len(b) < 10+n {
		return "", 0, nil, errors.New("file message: short name")
	}
	name, data = string(b[10:10+n]), b[10+n:]
	if err := validFileName(name); err != nil {
		return "", 0, nil, err
	}
	if off < 0 || off > 1<<40 || len(data) > maxFilePiece {
		return "", 0, nil, fmt.Errorf("file message: %s at %d, %d bytes", name, off, len(data))
	}
	return name, off, data, nil
}

// validFileName accepts the flat names of CRIU's images (core-1.img,
// tmpfs-dev-42.tar.gz.img, outputs.json): no directories, nothing hidden.
func validFileName(name string) error {
	if name == "" || len(name) > 200 || name[0] == '.' {
		return fmt.Errorf("file message: bad file name %q", name)
	}
	for _, c := range name {
		ok := c == '.' || c == '-' || c == '_' || c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
		if !ok {
			return fmt.Errorf("file message: bad file name %q", name)
		}
	}
	return nil
}
