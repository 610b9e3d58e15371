package cuda

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"strings"
)

// Driver API versions, as cuDriverGetVersion reports them (1000*major +
// 10*minor).
const (
	// MinCheckpointVersion is CUDA 12.8 (display driver r570): the first with
	// cuCheckpointProcess* in the driver API, lock timeouts included.
	MinCheckpointVersion = 12080
	// MinRemapVersion is CUDA 13.0 (display driver r580): the first whose
	// CUcheckpointRestoreArgs carries GPU UUID pairs for restoring onto other
	// GPUs.
	MinRemapVersion = 13000
)

// ArgsSize is the size of every cuCheckpointProcess* argument struct.
const ArgsSize = 64

// Layout is the shape of CUcheckpointRestoreArgs a driver expects. The
// lock, checkpoint and unlock arguments have kept one shape since CUDA 12.8
// (lock: timeoutMs uint32 at 0, reserved0 uint32 at 4, reserved1[7] uint64;
// checkpoint, unlock: 64 reserved bytes, which later headers begin with
// optional pointers that must be NULL for cryo's use).
type Layout int

const (
	// LayoutNone: the driver has no checkpoint API (before CUDA 12.8).
	LayoutNone Layout = iota
	// LayoutReserved: CUDA 12.8 and 12.9 (r570, r575). Restore args are
	// cuuint64_t reserved[8], all zero: no GPU remapping.
	LayoutReserved
	// LayoutGPUPairs: CUDA 13.0 and later (r580+). Restore args begin with
	// CUcheckpointGpuPair *gpuPairs (offset 0) and unsigned int
	// gpuPairsCount (offset 8); bytes 12-63 are reserved and zero. Headers
	// from 13.0 to 13.2 spell the reserved part char[44] + cuuint64_t,
	// 13.3 char[52], and 13.4 adds padding0 and customStorageInfo_out
	// (offset 16, NULL for restore from host memory): the same bytes.
	LayoutGPUPairs
)

func (l Layout) String() string {
	switch l {
	case LayoutNone:
		return "none (no checkpoint API)"
	case LayoutReserved:
		return "reserved (CUDA 12.8-12.9, no GPU remapping)"
	case LayoutGPUPairs:
		return "gpu-pairs (CUDA 13.0+)"
	}
	return fmt.Sprintf("layout(%d)", int(l))
}

// LayoutFor picks the restore-args layout of a driver API version.
func LayoutFor(version int) Layout {
	switch {
	case version >= MinRemapVersion:
		return LayoutGPUPairs
	case version >= MinCheckpointVersion:
		return LayoutReserved
	}
	return LayoutNone
}

// VersionString renders 12080 as "12.8".
func VersionString(v int) string {
	if v <= 0 {
		return "unknown"
	}
	return fmt.Sprintf("%d.%d", v/1000, v%1000/10)
}

// UUID is a GPU UUID as the driver passes it (CUuuid, 16 bytes).
type UUID [16]byte

// ParseUUID reads "GPU-8f4022ba-e0cb-1298-286e-225c953a7feb".
func ParseUUID(s string) (UUID, error) {
	var u UUID
	h := strings.ReplaceAll(strings.TrimPrefix(strings.TrimPrefix(s, "GPU-"), "gpu-"), "-", "")
	b, err := hex.DecodeString(h)
	if err != nil || len(b) != 16 {
		return u, fmt.Errorf("%q is not a GPU UUID", s)
	}
	copy(u[:], b)
	return u, nil
}

func (u UUID) String() string {
	h := hex.EncodeToString(u[:])
	return "GPU-" + h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

// Pair is one CUcheckpointGpuPair: restore what was on Old onto New.
type Pair struct {
	Old, New UUID
}

// PairSize is sizeof(CUcheckpointGpuPair).
const PairSize = 32

// encodePairs lays out pairs as an array of CUcheckpointGpuPair.
func encodePairs(pairs []Pair) []byte {
	b := make([]byte, 0, len(pairs)*PairSize)
	for _, p := range pairs {
		b = append(b, p.Old[:]...)
		b = append(b, p.New[:]...)
	}
	return b
}

// encodeRestoreArgs lays out CUcheckpointRestoreArgs for a driver's layout,
// with the pairs array at address pairs (n of them). It refuses pairs the
// layout cannot carry.
func encodeRestoreArgs(l Layout, pairs uintptr, n int) ([ArgsSize]byte, error) {
	var b [ArgsSize]byte
	switch l {
	case LayoutReserved:
		if n > 0 {
			return b, fmt.Errorf("%w: this driver's restore arguments have no GPU pairs (need CUDA %s, driver r580, or newer)",
				errRemap, VersionString(MinRemapVersion))
		}
	case LayoutGPUPairs:
		if n > 0 {
			binary.LittleEndian.PutUint64(b[0:8], uint64(pairs))
			binary.LittleEndian.PutUint32(b[8:12], uint32(n))
		}
	default:
		return b, errNoAPI
	}
	return b, nil
}

// encodeLockArgs lays out CUcheckpointLockArgs.
func encodeLockArgs(timeoutMs uint32) [ArgsSize]byte {
	var b [ArgsSize]byte
	binary.LittleEndian.PutUint32(b[0:4], timeoutMs)
	return b
}
