// Command files is a test workload whose state lives partly in files.
//
// It keeps two files in -dir open for its whole run:
//
//   - records.dat, opened once and preallocated to its final size, gets one
//     -rec byte record per step through plain write(2) calls, so where each
//     record lands depends on the descriptor's file offset;
//   - shared.map, mapped MAP_SHARED, has one of its slots rewritten every
//     step, after the previous step's slot is read back through the mapping.
//
// Every record and slot is derived from a running digest held in memory.
// After -steps steps (one every -delay, each announced by "step N") it
// prints "result HEX", a digest of the in-memory state and of both files'
// contents read back from disk. A restored run matches an uninterrupted one
// only if the restore brought back the memory, the open descriptor with its
// offset, and a mapping that still writes through to the file.
//
// Both files keep a constant size, so a checkpoint taken with the job left
// running can be restored after the job went on writing.
package main

import (
	"crypto/sha256"
	"encoding/binary"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

const (
	slotSize = 256
	slots    = 64
)

func main() {
	steps := flag.Int("steps", 100, "number of steps")
	rec := flag.Int("rec", 512, "bytes per record")
	dir := flag.String("dir", ".", "directory for records.dat and shared.map")
	delay := flag.Duration("delay", 50*time.Millisecond, "pause after each step")
	flag.Parse()
	if err := run(*steps, *rec, *dir, *delay); err != nil {
		fmt.Fprintln(os.Stderr, "files:", err)
		os.Exit(1)
	}
}

func run(steps, rec int, dir string, delay time.Duration) error {
	recPath, mapPath := filepath.Join(dir, "records.dat"), filepath.Join(dir, "shared.map")
	records, err := os.OpenFile(recPath, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if err := records.Truncate(int64(steps * rec)); err != nil {
		return err
	}
	mf, err := os.OpenFile(mapPath, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if err := mf.Truncate(slots * slotSize); err != nil {
		return err
	}
	shared, err := unix.Mmap(int(mf.Fd()), 0, slots*slotSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("mmap %s: %w", mapPath, err)
	}
	// Only the mapping is used from here on; closing the descriptor
	// leaves a mapping that CRIU must restore from the file alone.
	mf.Close()

	state := sha256.Sum256([]byte("files"))
	buf := make([]byte, rec)
	for s := 1; s <= steps; s++ {
		prev := (s - 1) % slots
		h := sha256.New()
		h.Write(state[:])
		binary.Write(h, binary.LittleEndian, uint64(s))
		h.Write(shared[prev*slotSize : (prev+1)*slotSize])
		h.Sum(state[:0])

		for i := 0; i < rec; i += len(state) {
			copy(buf[i:], state[:])
		}
		if _, err := records.Write(buf); err != nil {
			return fmt.Errorf("step %d: write record: %w", s, err)
		}
		slot := shared[(s%slots)*slotSize : (s%slots+1)*slotSize]
		for i := 0; i < slotSize; i += len(state) {
			copy(slot[i:], state[:])
			slot[i] ^= byte(s)
		}
		fmt.Printf("step %d\n", s)
		time.Sleep(delay)
	}
	if err := unix.Msync(shared, unix.MS_SYNC); err != nil {
		return err
	}
	if err := records.Close(); err != nil {
		return err
	}
	h := sha256.New()
	h.Write(state[:])
	for _, p := range []string{recPath, mapPath} {
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		h.Write(b)
	}
	fmt.Printf("result %x\n", h.Sum(nil))
	return nil
}
