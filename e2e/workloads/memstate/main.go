// Command memstate is a test workload whose whole state lives in memory.
//
// It evolves a buffer of -mem MiB for -steps steps (one step every -delay),
// mixing the buffer into a running SHA-256, and prints "step N" after each
// step and "result HEX" at the end. The result depends on every step, so a
// run that was checkpointed, killed and restored must print the same result
// as an uninterrupted one, and its step lines show where it resumed.
package main

import (
	"crypto/sha256"
	"encoding/binary"
	"flag"
	"fmt"
	"os"
	"time"
)

func main() {
	steps := flag.Int("steps", 100, "number of steps")
	mem := flag.Int("mem", 8, "MiB of state")
	delay := flag.Duration("delay", 50*time.Millisecond, "pause after each step")
	flag.Parse()

	words := *mem << 20 / 8
	buf := make([]uint64, words)
	x := uint64(0x9E3779B97F4A7C15)
	for i := range buf {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		buf[i] = x
	}
	h := sha256.New()
	var b [8]byte
	for s := 1; s <= *steps; s++ {
		// Touch a stride of the buffer so the state changes every step.
		for i := s % 64; i < words; i += 64 {
			buf[i] = buf[i]*6364136223846793005 + uint64(s)
		}
		for i := 0; i < words; i += 4096 {
			binary.LittleEndian.PutUint64(b[:], buf[i])
			h.Write(b[:])
		}
		fmt.Printf("step %d\n", s)
		time.Sleep(*delay)
	}
	fmt.Printf("result %x\n", h.Sum(nil))
	os.Exit(0)
}
