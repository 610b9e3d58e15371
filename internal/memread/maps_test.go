package memread

import (
	"bufio"
	"errors"
	"os"
	"slices"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

func TestParseMapsLine(t *testing.T) {
	for _, tc := range []struct {
		name string
		line string
		want Region
		keep bool
		bad  bool
	}{
		{"anonymous", "7f0d42364000-7f0d42367000 rw-p 00000000 00:00 0 \n", Region{0x7f0d42364000, 0x7f0d42367000, true}, true, false},
		{"anonymous without the trailing space", "7f0d42364000-7f0d42367000 rw-p 00000000 00:00 0", Region{0x7f0d42364000, 0x7f0d42367000, true}, true, false},
		{"heap", "56153effc000-56153f01d000 rw-p 00000000 00:00 0                          [heap]\n", Region{0x56153effc000, 0x56153f01d000, true}, true, false},
		{"stack", "7ffd3e6a0000-7ffd3e6c1000 rw-p 00000000 00:00 0                          [stack]\n", Region{0x7ffd3e6a0000, 0x7ffd3e6c1000, true}, true, false},
		{"thread stack, old kernels", "7f0000000000-7f0000800000 rw-p 00000000 00:00 0                          [stack:1234]\n", Region{0x7f0000000000, 0x7f0000800000, true}, true, false},
		{"named anonymous", "7f0000000000-7f0000001000 rw-p 00000000 00:00 0                          [anon:arena]\n", Region{0x7f0000000000, 0x7f0000001000, true}, true, false},
		{"read-only anonymous", "7f0000000000-7f0000001000 r--p 00000000 00:00 0 \n", Region{0x7f0000000000, 0x7f0000001000, true}, true, false},
		{"guard", "7f0000000000-7f0000001000 ---p 00000000 00:00 0 \n", Region{0x7f0000000000, 0x7f0000001000, false}, true, false},
		{"PROT_NONE reservation, 16 TiB", "200000000000-300000000000 ---p 00000000 00:00 0 \n", Region{0x200000000000, 0x300000000000, false}, true, false},
		{"upper-case hex", "7F0000000000-7F0000001000 rw-p 00000000 00:00 0", Region{0x7f0000000000, 0x7f0000001000, true}, true, false},
		{"vdso", "7f0d4255f000-7f0d42561000 r-xp 00000000 00:00 0                          [vdso]\n", Region{}, false, false},
		{"vvar", "7f0d42559000-7f0d4255d000 r--p 00000000 00:00 0                          [vvar]\n", Region{}, false, false},
		{"vvar_vclock", "7f0d4255d000-7f0d4255f000 r--p 00000000 00:00 0                          [vvar_vclock]\n", Region{}, false, false},
		{"vsyscall", "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]\n", Region{}, false, false},
		{"uprobes", "7fff00000000-7fff00001000 r-xp 00000000 00:00 0                          [uprobes]\n", Region{}, false, false},
		{"file, private", "7f0d4253a000-7f0d4253c000 rw-p 001d3000 fe:00 326269                     /usr/lib/x86_64-linux-gnu/libc.so.6\n", Region{}, false, false},
		{"file with a space in its name", "7f0d4253a000-7f0d4253c000 rw-p 00000000 fe:00 326269                     /tmp/a b (deleted)\n", Region{}, false, false},
		{"file, shared", "7f0d4254f000-7f0d42556000 r--s 00000000 fe:00 325737                     /usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache\n", Region{}, false, false},
		{"shared anonymous", "7f0000000000-7f0000100000 rw-s 00000000 00:01 2050                       /dev/zero (deleted)\n", Region{}, false, false},
		{"SysV shm", "7f0000000000-7f0000100000 rw-s 00000000 00:01 32769                      /SYSV00000000 (deleted)\n", Region{}, false, false},
		{"memfd, private", "7f0000000000-7f0000100000 rw-p 00000000 00:01 1025                       /memfd:buf (deleted)\n", Region{}, false, false},
		{"shared named anonymous", "7f0000000000-7f0000100000 rw-s 00000000 00:01 1025                       [anon_shmem:ring]\n", Region{}, false, false},
		{"no dash", "7f00000000007f0000001000 rw-p 00000000 00:00 0\n", Region{}, false, true},
		{"start after end", "7f0000001000-7f0000000000 rw-p 00000000 00:00 0\n", Region{}, false, true},
		{"empty range", "7f0000001000-7f0000001000 rw-p 00000000 00:00 0\n", Region{}, false, true},
		{"not hex", "7f000000zz00-7f0000001000 rw-p 00000000 00:00 0\n", Region{}, false, true},
		{"too many digits", "117f0000000000000-127f0000000000000 rw-p 00000000 00:00 0\n", Region{}, false, true},
		{"short perms", "7f0000000000-7f0000001000 rw 00000000 00:00 0\n", Region{}, false, true},
		{"no inode", "7f0000000000-7f0000001000 rw-p 00000000 00:00\n", Region{}, false, true},
		{"empty", "\n", Region{}, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, keep, err := parseMapsLine([]byte(tc.line))
			if (err != nil) != tc.bad {
				t.Fatalf("error %v, want one: %v", err, tc.bad)
			}
			if keep != tc.keep || r != tc.want {
				t.Errorf("got %+v (kept: %v), want %+v (kept: %v)", r, keep, tc.want, tc.keep)
			}
		})
	}
}

// TestParseMapsLongLine: a line longer than the buffer is parsed from its
// head and the rest skipped; the lines after it are read as usual.
func TestParseMapsLongLine(t *testing.T) {
	long := "7f0000000000-7f0000001000 rw-p 00000000 fe:00 12 /" + strings.Repeat("x", 3*mapsBuffer) + "\n"
	in := "7e0000000000-7e0000001000 rw-p 00000000 00:00 0 \n" + long +
		"7f0000002000-7f0000003000 ---p 00000000 00:00 0                          [heap]\n"
	regs, lines, err := parseMaps(bufio.NewReaderSize(strings.NewReader(in), mapsBuffer), nil)
	want := []Region{{0x7e0000000000, 0x7e0000001000, true}, {0x7f0000002000, 0x7f0000003000, false}}
	if err != nil || lines != 3 || len(regs) != 2 || regs[0] != want[0] || regs[1] != want[1] {
		t.Errorf("got %+v, %d lines, %v; want %+v, 3 lines", regs, lines, err, want)
	}
	// A stack that grew down between two reads of maps overlaps the line
	// before it.
	in = "7ffd3e600000-7ffd3e6a0000 rw-p 00000000 00:00 0 \n" +
		"7ffd3e690000-7ffd3e6c1000 rw-p 00000000 00:00 0                          [stack]\n" +
		"7ffd3e6c1000-7ffd3e6c2000 rw-p 00000000 00:00 0 \n" +
		"7ffd3e6c0000-7ffd3e6c1000 rw-p 00000000 00:00 0 \n"
	regs, _, err = parseMaps(bufio.NewReader(strings.NewReader(in)), nil)
	want = []Region{{0x7ffd3e600000, 0x7ffd3e6a0000, true}, {0x7ffd3e6a0000, 0x7ffd3e6c1000, true}, {0x7ffd3e6c1000, 0x7ffd3e6c2000, true}}
	if err != nil || !slices.Equal(regs, want) {
		t.Errorf("overlapping lines: got %+v, %v; want %+v", regs, err, want)
	}
	if _, _, err := parseMaps(bufio.NewReader(strings.NewReader("x\n")), nil); err == nil || !strings.Contains(err.Error(), "line 1") {
		t.Errorf("a bad line gave %v, want an error naming line 1", err)
	}
}

func FuzzParseMaps(f *testing.F) {
	f.Add("7f0d42364000-7f0d42367000 rw-p 00000000 00:00 0 \n56153effc000-56153f01d000 rw-p 00000000 00:00 0    [heap]\n")
	f.Add("7f0d4253a000-7f0d4253c000 rw-p 001d3000 fe:00 326269      /usr/lib/libc.so.6\n")
	f.Add("ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]")
	f.Fuzz(func(t *testing.T, in string) {
		regs, _, err := parseMaps(bufio.NewReaderSize(strings.NewReader(in), 64), nil)
		for i, r := range regs {
			if r.Start >= r.End || (i > 0 && r.Start < regs[i-1].End) {
				t.Errorf("region %+v from %q, after %+v", r, in, regs[max(i-1, 0)])
			}
		}
		_ = err
	})
}

// TestRegionsSelf: a mapping this process makes is listed, its permission
// followed, and it is gone once unmapped; a process that does not exist
// gives ErrGone.
func TestRegionsSelf(t *testing.T) {
	const n = 5
	p, err := unix.MmapPtr(-1, 0, nil, n*PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	mem := unsafe.Slice((*byte)(p), n*PageSize)
	// Guards on both sides, so no neighbour merges with it.
	if err := unix.Mprotect(mem[:PageSize], unix.PROT_NONE); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mprotect(mem[(n-1)*PageSize:], unix.PROT_NONE); err != nil {
		t.Fatal(err)
	}
	start := uint64(uintptr(p)) + PageSize
	want := []Region{{start - PageSize, start, false}, {start, start + (n-2)*PageSize, true}, {start + (n-2)*PageSize, start + (n-1)*PageSize, false}}
	regs, err := Regions(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if !hasRegions(regs, want) {
		t.Errorf("Regions of self lacks %+v", want)
	}
	if err := unix.MunmapPtr(p, n*PageSize); err != nil {
		t.Fatal(err)
	}
	regs, err = Regions(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if hasRegions(regs, want) { // (another mapping may have taken the place since)
		t.Errorf("after munmap, Regions still lists %+v", want)
	}
	if _, err := Regions(freePID(t)); !errors.Is(err, ErrGone) {
		t.Errorf("Regions of a free PID: %v, want ErrGone", err)
	}
}

// hasRegions reports whether all of want are among regs, one after the
// other.
func hasRegions(regs, want []Region) bool {
	for i := range regs {
		if i+len(want) <= len(regs) && func() bool {
			for j, w := range want {
				if regs[i+j] != w {
					return false
				}
			}
			return true
		}() {
			return true
		}
	}
	return false
}
