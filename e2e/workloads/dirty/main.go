// Command dirty is a test workload that keeps writing its memory at a set
// rate, for the migration tests and the migration benchmark.
//
// It fills -mem MiB with pseudo-random words, then for -steps steps (one
// every -delay) rewrites -pages pages, each chosen by a generator seeded
// with the step number, and prints "step N" every -every steps; at the end
// it prints "result HEX", the SHA-256 of the whole buffer. The result
// depends only on the steps, not on when they ran, so a run that was
// migrated must print the same result as an uninterrupted one. The dirty
// rate is pages/delay: 1 GiB, -pages 655 and -delay 50ms dirty 5% of the
// memory per second.
package main

import (
	"crypto/sha256"
	"encoding/binary"
	"flag"
	"fmt"
	"os"
	"time"
	"unsafe"
)

const pageWords = 4096 / 8

func main() {
	mem := flag.Int("mem", 64, "MiB of state")
	steps := flag.Int("steps", 200, "number of steps")
	pages := flag.Int("pages", 100, "pages rewritten per step")
	delay := flag.Duration("delay", 50*time.Millisecond, "pause after each step")
	every := flag.Int("every", 10, "print a step line every this many steps")
	flag.Parse()

	words := *mem << 20 / 8
	npages := uint64(words / pageWords)
	buf := make([]uint64, words)
	x := uint64(0x9E3779B97F4A7C15)
	next := func() uint64 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		return x
	}
	for i := range buf {
		buf[i] = next()
	}
	fmt.Printf("ready %d MiB\n", *mem)
	for s := 1; s <= *steps; s++ {
		x = uint64(s)*0x9E3779B97F4A7C15 | 1
		for range *pages {
			p := next() % npages
			w := p*pageWords + next()%pageWords
			buf[w] = buf[w]*6364136223846793005 + uint64(s)
		}
		if s%*every == 0 {
			fmt.Printf("step %d\n", s)
		}
		time.Sleep(*delay)
	}
	h := sha256.New()
	b := unsafe.Slice((*byte)(unsafe.Pointer(&buf[0])), len(buf)*8)
	h.Write(b)
	var n [8]byte
	binary.LittleEndian.PutUint64(n[:], uint64(*steps))
	h.Write(n[:])
	fmt.Printf("result %x\n", h.Sum(nil))
	os.Exit(0)
}
