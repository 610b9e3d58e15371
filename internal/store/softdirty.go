package store

import (
	"encoding/binary"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// softDirty probes, once per process, whether the kernel tracks soft-dirty
// pages: a page of cryo's own is written, the bits cleared
// (/proc/self/clear_refs 4), and the pagemap must then show the page clean,
// and dirty again after another write. Kernels built without
// CONFIG_MEM_SOFT_DIRTY accept the clear and never set the bit.
var softDirty = sync.OnceValue(func() bool { return probeSoftDirty("/proc/self") })

const pagemapSoftDirty = 1 << 55

func probeSoftDirty(procSelf string) bool {
	mem, err := unix.Mmap(-1, 0, PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return false
	}
	defer unix.Munmap(mem)
	mem[0] = 1
	pm, err := os.Open(procSelf + "/pagemap")
	if err != nil {
		return false
	}
	defer pm.Close()
	bit := func() (bool, bool) {
		var e [8]byte
		off := int64(uintptr(unsafe.Pointer(&mem[0]))/PageSize) * 8
		if _, err := pm.ReadAt(e[:], off); err != nil {
			return false, false
		}
		return binary.LittleEndian.Uint64(e[:])&pagemapSoftDirty != 0, true
	}
	if err := os.WriteFile(procSelf+"/clear_refs", []byte("4"), 0); err != nil {
		return false
	}
	if dirty, ok := bit(); !ok || dirty {
		return false
	}
	mem[0] = 2
	dirty, ok := bit()
	return ok && dirty
}
