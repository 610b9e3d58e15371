// Command mixed is the benchmark workload: a process that holds -mib MiB of
// memory whose content resembles an HPC job's, fills it once, and then
// idles so that it can be checkpointed and restored.
//
// The memory is one anonymous mapping cut into 1 MiB segments, in a
// repeating pattern of ten:
//
//	2 of 10  random bytes (incompressible, unique)
//	3 of 10  zero pages, written so that they are resident
//	3 of 10  float64 fields: a smooth function of the cell index, quantised
//	         to 2^-10, as a simulation's state array on a fine mesh
//	2 of 10  text records: repeated log-like lines with counters
//
// Protocol (for e2e/bench): once filled, it writes the SHA-256 of the whole
// mapping to -digest (atomically: a temporary file, then a rename) and prints
// "ready HEX" on stdout. On SIGUSR1 it hashes its memory again and rewrites
// -digest, which proves after a restore that the memory came back intact.
// On SIGUSR2 it first changes about 5% of its memory (four contiguous
// stretches, as a solver that advanced a few subdomains) and then does the
// same. On SIGWINCH it changes one word in each of 0.1% of its pages,
// scattered at random (as a job that updates a few values here and there),
// writes those pages, as they are now, to -digest + ".changed" (for the
// bench to compress), and then does the same. SIGTERM or SIGINT end it.
package main

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"flag"
	"fmt"
	"math"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const segment = 1 << 20

// kinds is the pattern of segment contents, repeated every ten segments.
var kinds = [10]byte{'r', 'z', 'f', 't', 'z', 'r', 'f', 't', 'z', 'f'}

func main() {
	mib := flag.Int("mib", envInt("BENCH_MIB", 1024), "MiB of memory to hold")
	digest := flag.String("digest", "", "file to write the memory's SHA-256 to (required)")
	flag.Parse()
	if *digest == "" || *mib <= 0 {
		fmt.Fprintln(os.Stderr, "usage: mixed -mib N -digest FILE")
		os.Exit(2)
	}
	// Ask for the signals before the (long) fill, so an early one is not fatal.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGWINCH, syscall.SIGTERM, syscall.SIGINT)

	mem, err := unix.Mmap(-1, 0, *mib*segment, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		fmt.Fprintf(os.Stderr, "mixed: mmap %d MiB: %v\n", *mib, err)
		os.Exit(1)
	}
	fill(mem)
	scatterPicked = make([]int32, 0, max(len(mem)/4096/1000, 1))
	sum := hash(mem)
	if err := writeDigest(*digest, sum); err != nil {
		fmt.Fprintln(os.Stderr, "mixed:", err)
		os.Exit(1)
	}
	fmt.Printf("ready %s\n", sum)

	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	round := 0
	for {
		select {
		case <-tick.C: // idle
		case s := <-sigs:
			switch s {
			case syscall.SIGUSR2:
				round++
				mutate(mem, round)
				fallthrough
			case syscall.SIGWINCH:
				if s == syscall.SIGWINCH {
					round++
					if err := scatter(mem, round, *digest+".changed"); err != nil {
						fmt.Fprintln(os.Stderr, "mixed:", err)
						os.Exit(1)
					}
				}
				fallthrough
			case syscall.SIGUSR1:
				if err := writeDigest(*digest, hash(mem)); err != nil {
					fmt.Fprintln(os.Stderr, "mixed:", err)
					os.Exit(1)
				}
			default:
				os.Exit(0)
			}
		}
	}
}

// fill writes every byte of mem once.
func fill(mem []byte) {
	rng := uint64(0x9E3779B97F4A7C15)
	line := 0
	for s := 0; s*segment < len(mem); s++ {
		seg := mem[s*segment : (s+1)*segment]
		switch kinds[s%len(kinds)] {
		case 'r':
			for i := 0; i+8 <= len(seg); i += 8 {
				rng ^= rng << 13
				rng ^= rng >> 7
				rng ^= rng << 17
				binary.LittleEndian.PutUint64(seg[i:], rng)
			}
		case 'z':
			// Write a byte and clear it again on every page: the page
			// becomes private and resident, with zero content.
			for i := 0; i < len(seg); i += 4096 {
				seg[i] = 1
			}
			clear(seg)
		case 'f':
			base := s * segment / 8
			for i := 0; i+8 <= len(seg); i += 8 {
				binary.LittleEndian.PutUint64(seg[i:], math.Float64bits(field(base+i/8, 0)))
			}
		case 't':
			rec := make([]byte, 0, 80)
			for off := 0; off < len(seg); off += copy(seg[off:], rec) {
				line++
				rec = append(rec[:0], "step="...)
				rec = strconv.AppendInt(rec, int64(line/4096), 10)
				rec = append(rec, " cell="...)
				rec = strconv.AppendInt(rec, int64(line), 10)
				rec = append(rec, " T="...)
				rec = strconv.AppendFloat(rec, field(line, 0), 'f', 3, 64)
				rec = append(rec, " rho=1.225 status=OK\n"...)
			}
		}
	}
}

// field is a slowly varying temperature-like value at cell i, at time step
// t, quantised to 2^-10 as values read from coarse input usually are.
func field(i, t int) float64 {
	x := float64(i) / (1 << 18)
	v := 293.15 + 4*math.Sin(2*math.Pi*x) + 0.5*math.Cos(7*x) + 0.01*float64(t)
	return math.Round(v*1024) / 1024
}

// mutate changes about 5% of mem, in four contiguous stretches spread over
// it: every 8-byte word there gets a new value.
func mutate(mem []byte, round int) {
	stretch := len(mem) / 80 &^ 7 // 4 x 1.25% = 5%
	for k := 0; k < 4; k++ {
		start := (len(mem)/4*k + len(mem)/8) &^ 4095
		part := mem[start : start+stretch]
		for i := 0; i+8 <= len(part); i += 8 {
			w := binary.LittleEndian.Uint64(part[i:])
			binary.LittleEndian.PutUint64(part[i:], w+0x0101010101010101*uint64(round))
		}
	}
}

// scatter changes one 8-byte word in each of 0.1% of mem's pages, chosen
// at random (the same ones for the same round), and writes those pages to
// path. It keeps no copy of them and allocates nothing: a job that changes
// a few words does not grow its heap by as much as it changed, and the
// bench measures what the change costs, not this.
func scatter(mem []byte, round int, path string) error {
	const page = 4096
	pages := len(mem) / page
	picked := scatterPicked[:0]
	rng := uint64(round)*0x9E3779B97F4A7C15 | 1
	for len(picked) < cap(picked) {
		rng ^= rng << 13
		rng ^= rng >> 7
		rng ^= rng << 17
		p := int32(rng % uint64(pages))
		if slices.Contains(picked, p) {
			continue
		}
		picked = append(picked, p)
		w := int(p)*page + int(rng>>40)%(page/8)*8
		binary.LittleEndian.PutUint64(mem[w:], binary.LittleEndian.Uint64(mem[w:])^(rng|1))
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	for _, p := range picked {
		if _, err := f.Write(mem[int(p)*page : int(p+1)*page]); err != nil {
			f.Close()
			return err
		}
	}
	return f.Close()
}

// scatterPicked holds the pages scatter picks (0.1% of them), allocated
// once when the memory is filled.
var scatterPicked []int32

func hash(mem []byte) string {
	h := sha256.Sum256(mem)
	return hex.EncodeToString(h[:])
}

// writeDigest replaces path with sum, atomically.
func writeDigest(path, sum string) error {
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	if err := os.WriteFile(tmp, []byte(sum+"\n"), 0o600); err != nil {
		return fmt.Errorf("write digest: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write digest: %w", err)
	}
	return nil
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil {
		return v
	}
	return def
}
