package cuda

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/cryo-hpc/cryo/offload"
)

func TestLayoutFor(t *testing.T) {
	for _, tc := range []struct {
		version int
		want    Layout
	}{
		{0, LayoutNone},
		{12040, LayoutNone}, // r550: cuda-checkpoint utility only, no driver API
		{12080, LayoutReserved},
		{12090, LayoutReserved},
		{13000, LayoutGPUPairs},
		{13020, LayoutGPUPairs},
		{13040, LayoutGPUPairs},
	} {
		if got := LayoutFor(tc.version); got != tc.want {
			t.Errorf("LayoutFor(%d) = %v, want %v", tc.version, got, tc.want)
		}
	}
}

func TestRestoreArgsLayout(t *testing.T) {
	const pairs = uintptr(0x7f00deadbe00)

	// CUDA 13+: pointer at 0, count at 8, every other byte zero.
	b, err := encodeRestoreArgs(LayoutGPUPairs, pairs, 3)
	if err != nil {
		t.Fatal(err)
	}
	if got := binary.LittleEndian.Uint64(b[0:8]); got != uint64(pairs) {
		t.Errorf("gpuPairs = %#x, want %#x", got, pairs)
	}
	if got := binary.LittleEndian.Uint32(b[8:12]); got != 3 {
		t.Errorf("gpuPairsCount = %d, want 3", got)
	}
	for i := 12; i < ArgsSize; i++ {
		if b[i] != 0 {
			t.Fatalf("reserved byte %d = %#x, want 0", i, b[i])
		}
	}

	// No pairs: all zero in every layout.
	for _, l := range []Layout{LayoutReserved, LayoutGPUPairs} {
		b, err := encodeRestoreArgs(l, 0, 0)
		if err != nil || b != [ArgsSize]byte{} {
			t.Errorf("%v without pairs = %x, %v; want 64 zero bytes", l, b, err)
		}
	}

	// CUDA 12.8/12.9 cannot carry pairs: refused, not silently dropped.
	if _, err := encodeRestoreArgs(LayoutReserved, pairs, 1); !errors.Is(err, offload.ErrRemapUnsupported) {
		t.Errorf("pairs on the reserved layout: %v, want ErrRemapUnsupported", err)
	}
	if _, err := encodeRestoreArgs(LayoutNone, 0, 0); !errors.Is(err, ErrNoCheckpointAPI) {
		t.Errorf("no API: %v, want ErrNoCheckpointAPI", err)
	}
}

func TestLockArgsLayout(t *testing.T) {
	b := encodeLockArgs(1500)
	if binary.LittleEndian.Uint32(b[0:4]) != 1500 {
		t.Errorf("timeoutMs = %d", binary.LittleEndian.Uint32(b[0:4]))
	}
	for i := 4; i < ArgsSize; i++ {
		if b[i] != 0 {
			t.Fatalf("reserved byte %d = %#x, want 0", i, b[i])
		}
	}
}

func TestPairsLayout(t *testing.T) {
	a, _ := ParseUUID("GPU-00112233-4455-6677-8899-aabbccddeeff")
	c, _ := ParseUUID("GPU-ffeeddcc-bbaa-9988-7766-554433221100")
	b := encodePairs([]Pair{{Old: a, New: c}})
	if len(b) != PairSize || [16]byte(b[:16]) != a || [16]byte(b[16:]) != c {
		t.Errorf("pair bytes %x", b)
	}
}

func TestUUIDRoundTrip(t *testing.T) {
	s := "GPU-8f4022ba-e0cb-1298-286e-225c953a7feb"
	u, err := ParseUUID(s)
	if err != nil {
		t.Fatal(err)
	}
	if u.String() != s {
		t.Errorf("round trip: %s", u)
	}
	for _, bad := range []string{"", "GPU-12", "GPU-zz4022ba-e0cb-1298-286e-225c953a7feb", "8f4022ba"} {
		if _, err := ParseUUID(bad); err == nil {
			t.Errorf("ParseUUID(%q) accepted", bad)
		}
	}
}

func TestPairsFor(t *testing.T) {
	u0, u1, u2 := "GPU-00000000-0000-0000-0000-000000000000", "GPU-11111111-1111-1111-1111-111111111111", "GPU-22222222-2222-2222-2222-222222222222"
	rec := offload.Record{Kind: Kind, PID: 1, Devices: []offload.Device{{UUID: u0}, {UUID: u1}}}
	// Nothing moves: no pairs (works on every driver).
	if p, err := pairsFor(rec, offload.DeviceMap{u0: u0, u1: u1}); err != nil || p != nil {
		t.Errorf("identity map: %v, %v; want no pairs", p, err)
	}
	// One moves: a pair for every GPU of the context, as the driver requires.
	p, err := pairsFor(rec, offload.DeviceMap{u0: u2})
	if err != nil || len(p) != 2 || p[0].New.String() != u2 || p[1].Old.String() != u1 || p[1].New.String() != u1 {
		t.Errorf("moving map: %v, %v", p, err)
	}
	// GPUs unknown: the map as given.
	p, err = pairsFor(offload.Record{Kind: Kind, PID: 1}, offload.DeviceMap{u1: u2})
	if err != nil || len(p) != 1 || p[0].Old.String() != u1 || p[0].New.String() != u2 {
		t.Errorf("unrecorded GPUs: %v, %v", p, err)
	}
}
