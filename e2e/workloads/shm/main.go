// Command shm is a test workload whose state lives in tmpfs files, as an
// MPI program's shared-memory segments do.
//
// It creates a POSIX shared-memory segment /dev/shm/NAME of -kib KiB
// (shm_open's file), maps it shared and closes the descriptor, and opens
// /dev/shm/NAME.acc, a small file it keeps open and reads and writes
// through its descriptor. Each of -steps steps (one every -delay) evolves
// the segment from its own contents and folds it into an accumulator read
// from and written back to the .acc file, then prints "step N". At the end
// it prints "result HEX" and removes both files. The result depends on
// every step and on both files' contents, so a run restored with files
// other than those of its checkpoint prints another result.
//
// With -fault-file F, a step that finds F removes it and then, as an MPI
// launcher does when a rank dies, removes both files (-fault delete) or
// scribbles over them (-fault change), and kills itself with SIGKILL.
package main

import (
	"crypto/sha256"
	"encoding/binary"
	"flag"
	"fmt"
	"os"
	"syscall"
	"time"
)

func main() {
	name := flag.String("name", "cryo-shm", "segment name in /dev/shm")
	steps := flag.Int("steps", 100, "number of steps")
	kib := flag.Int("kib", 256, "KiB of shared memory")
	delay := flag.Duration("delay", 50*time.Millisecond, "pause after each step")
	faultFile := flag.String("fault-file", "", "a file whose presence makes a step fail")
	fault := flag.String("fault", "delete", "what a failing step does to the files: delete or change")
	flag.Parse()

	seg, acc := "/dev/shm/"+*name, "/dev/shm/"+*name+".acc"
	size := *kib << 10
	f, err := os.OpenFile(seg, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	check(err)
	check(f.Truncate(int64(size)))
	mem, err := syscall.Mmap(int(f.Fd()), 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	check(err)
	check(f.Close()) // the mapping alone holds the segment, as after shm_open and mmap
	a, err := os.OpenFile(acc, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	check(err)
	var word [32]byte
	_, err = a.WriteAt(word[:], 0)
	check(err)

	words := size / 8
	x := uint64(0x9E3779B97F4A7C15)
	for i := 0; i < words; i++ {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(mem[8*i:], x)
	}
	for s := 1; s <= *steps; s++ {
		if *faultFile != "" {
			if err := os.Remove(*faultFile); err == nil {
				damage(*fault, seg, acc)
				syscall.Kill(os.Getpid(), syscall.SIGKILL)
			}
		}
		// Each touched word is a function of the previous contents.
		for i := s % 16; i < words; i += 16 {
			v := binary.LittleEndian.Uint64(mem[8*i:])
			binary.LittleEndian.PutUint64(mem[8*i:], v*6364136223846793005+uint64(s))
		}
		_, err := a.ReadAt(word[:], 0)
		check(err)
		h := sha256.New()
		h.Write(word[:])
		h.Write(mem)
		copy(word[:], h.Sum(nil))
		_, err = a.WriteAt(word[:], 0)
		check(err)
		fmt.Printf("step %d\n", s)
		time.Sleep(*delay)
	}
	fmt.Printf("result %x\n", word)
	os.Remove(seg)
	os.Remove(acc)
}

// damage does to the files what a launcher that saw a rank die does.
func damage(how, seg, acc string) {
	switch how {
	case "delete":
		os.Remove(seg)
		os.Remove(acc)
	case "change":
		junk := make([]byte, 4096)
		for i := range junk {
			junk[i] = 0x5a
		}
		for _, p := range []string{seg, acc} {
			if f, err := os.OpenFile(p, os.O_WRONLY, 0); err == nil {
				f.WriteAt(junk, 0)
				f.Close()
			}
		}
	}
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "shm:", err)
		os.Exit(1)
	}
}
