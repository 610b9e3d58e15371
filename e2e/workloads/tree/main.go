// Command tree is a test workload made of two processes and several threads.
//
// The parent re-executes itself as a child. The child streams -steps
// records of -rec bytes from a running pseudo-random generator into a pipe
// as fast as the pipe takes them, so the pipe is full whenever the job is
// frozen. The parent reads them on a reader thread, hashes them on a mixer
// thread, folds them into a digest on the main thread, prints "step N" and
// sends its running digest back through a unix socketpair; the child folds
// those into a digest of its own and sends it to the parent at the end.
// The parent prints "result HEX", a digest of everything both processes
// did, which matches an uninterrupted run only if a restore brought back
// both processes' memory, the data in flight in the pipe and the socketpair,
// and the file descriptors joining them.
//
// The child is started with os/exec, so the parent also holds a pidfd for
// it (Go uses pidfds where the kernel has them); CRIU 4.1.1 dumps and
// restores those, and the parent waits for the child through it at the end.
package main

import (
	"crypto/sha256"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"syscall"
	"time"
)

func main() {
	steps := flag.Int("steps", 100, "number of records and steps")
	rec := flag.Int("rec", 4096, "bytes per record")
	delay := flag.Duration("delay", 50*time.Millisecond, "pause after each step")
	child := flag.Bool("child", false, "internal: run as the producing child")
	flag.Parse()
	if *child {
		os.Exit(produce(*steps, *rec))
	}
	if err := run(*steps, *rec, *delay); err != nil {
		fmt.Fprintln(os.Stderr, "tree:", err)
		os.Exit(1)
	}
}

func run(steps, rec int, delay time.Duration) error {
	pr, pw, err := os.Pipe()
	if err != nil {
		return err
	}
	sp, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	// The child gets the pipe's write end as fd 3 and its end of the
	// socketpair as fd 4. os/exec keeps a pidfd for it, which CRIU must
	// dump and restore too: Wait uses it at the end.
	theirs := os.NewFile(uintptr(sp[1]), "socketpair-child")
	cmd := exec.Command(self, "-child", "-steps", fmt.Sprint(steps), "-rec", fmt.Sprint(rec))
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	cmd.ExtraFiles = []*os.File{pw, theirs}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start child: %w", err)
	}
	pw.Close()
	theirs.Close()
	sock := os.NewFile(uintptr(sp[0]), "socketpair")

	// Reader thread -> mixer thread -> main thread, through unbuffered
	// channels: the order of records is fixed, so the digest is too.
	records := make(chan []byte)
	mixed := make(chan [32]byte)
	go func() {
		runtime.LockOSThread()
		defer close(records)
		for i := 0; i < steps; i++ {
			b := make([]byte, rec)
			if _, err := io.ReadFull(pr, b); err != nil {
				fmt.Fprintln(os.Stderr, "tree: read record:", err)
				return
			}
			records <- b
		}
	}()
	go func() {
		runtime.LockOSThread()
		defer close(mixed)
		var n uint64
		for b := range records {
			n++
			h := sha256.New()
			binary.Write(h, binary.LittleEndian, n)
			h.Write(b)
			var sum [32]byte
			h.Sum(sum[:0])
			mixed <- sum
		}
	}()

	digest := sha256.New()
	s := 0
	for sum := range mixed {
		s++
		digest.Write(sum[:])
		fmt.Printf("step %d\n", s)
		if _, err := sock.Write(digest.Sum(nil)); err != nil {
			return fmt.Errorf("step %d: send to child: %w", s, err)
		}
		time.Sleep(delay)
	}
	if s != steps {
		return fmt.Errorf("got %d records, want %d", s, steps)
	}
	var final [32]byte
	if _, err := io.ReadFull(sock, final[:]); err != nil {
		return fmt.Errorf("read child's digest: %w", err)
	}
	digest.Write(final[:])
	if err := cmd.Wait(); err != nil {
		return fmt.Errorf("child %d: %w", cmd.Process.Pid, err)
	}
	fmt.Printf("result %x\n", digest.Sum(nil))
	return nil
}

// produce is the child: a writer thread streams records into the pipe
// (fd 3) while the main thread folds the parent's digests from the
// socketpair (fd 4).
func produce(steps, rec int) int {
	pipe := os.NewFile(3, "pipe")
	sock := os.NewFile(4, "socketpair")
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		x := uint64(0x2545F4914F6CDD1D)
		b := make([]byte, rec)
		for i := 0; i < steps; i++ {
			for j := 0; j+8 <= len(b); j += 8 {
				x ^= x << 13
				x ^= x >> 7
				x ^= x << 17
				binary.LittleEndian.PutUint64(b[j:], x)
			}
			if _, err := pipe.Write(b); err != nil {
				done <- fmt.Errorf("write record %d: %w", i+1, err)
				return
			}
		}
		done <- pipe.Close()
	}()
	h := sha256.New()
	var d [32]byte
	for i := 0; i < steps; i++ {
		if _, err := io.ReadFull(sock, d[:]); err != nil {
			fmt.Fprintln(os.Stderr, "tree child: read digest:", err)
			return 1
		}
		h.Write(d[:])
	}
	if err := <-done; err != nil {
		fmt.Fprintln(os.Stderr, "tree child:", err)
		return 1
	}
	if _, err := sock.Write(h.Sum(nil)); err != nil {
		fmt.Fprintln(os.Stderr, "tree child: send digest:", err)
		return 1
	}
	return 0
}
