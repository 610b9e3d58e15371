// Command tcp is a test workload of two processes joined by a TCP
// connection over loopback.
//
// The parent listens on 127.0.0.1:0 over plain TCP (and keeps listening), starts itself
// again as a child (with os/exec, so the parent also holds a pidfd), and
// the child connects. For -steps steps the parent sends a numbered message
// carrying its running state, the child folds it into its own state and
// answers with that, and the parent folds the answer in, prints "step N"
// and waits -delay. At the end the child sends a digest of everything it
// saw, and the parent prints "result HEX", a digest of every message both
// ways. A restored run matches an uninterrupted one only if the restore
// brought back both processes' memory and the established connection with
// its sequence numbers and any bytes in flight.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"time"
)

const msgLen = 8 + 32 // step number, state

func main() {
	steps := flag.Int("steps", 100, "number of round trips")
	delay := flag.Duration("delay", 50*time.Millisecond, "pause after each step")
	connect := flag.String("connect", "", "internal: run as the child, connecting here")
	flag.Parse()
	var err error
	if *connect != "" {
		err = child(*connect)
	} else {
		err = parent(*steps, *delay)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "tcp:", err)
		os.Exit(1)
	}
}

func parent(steps int, delay time.Duration) error {
	// Go listens with MPTCP by default where the kernel has it (since Go
	// 1.24), and CRIU 4.1.1 cannot dump MPTCP sockets ("inet: Unsupported
	// proto 262"): this workload asks for plain TCP.
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	self, err := os.Executable()
	if err != nil {
		return err
	}
	cmd := exec.Command(self, "-connect", ln.Addr().String())
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start child: %w", err)
	}
	conn, err := ln.Accept()
	if err != nil {
		return err
	}
	state := sha256.Sum256([]byte("tcp parent"))
	all := sha256.New()
	msg := make([]byte, msgLen)
	reply := make([]byte, msgLen)
	for s := 1; s <= steps; s++ {
		binary.LittleEndian.PutUint64(msg, uint64(s))
		copy(msg[8:], state[:])
		if _, err := conn.Write(msg); err != nil {
			return fmt.Errorf("step %d: send: %w", s, err)
		}
		if _, err := io.ReadFull(conn, reply); err != nil {
			return fmt.Errorf("step %d: receive: %w", s, err)
		}
		if got := binary.LittleEndian.Uint64(reply); got != uint64(s) {
			return fmt.Errorf("step %d: child answered step %d", s, got)
		}
		all.Write(msg)
		all.Write(reply)
		state = sha256.Sum256(append(state[:], reply...))
		fmt.Printf("step %d\n", s)
		time.Sleep(delay)
	}
	// Step 0 ends the conversation; the child answers with its digest.
	clear(msg)
	if _, err := conn.Write(msg); err != nil {
		return fmt.Errorf("send end: %w", err)
	}
	theirs := make([]byte, 32)
	if _, err := io.ReadFull(conn, theirs); err != nil {
		return fmt.Errorf("receive child's digest: %w", err)
	}
	all.Write(theirs)
	conn.Close()
	if err := cmd.Wait(); err != nil {
		return fmt.Errorf("child: %w", err)
	}
	fmt.Printf("result %x\n", all.Sum(nil))
	return nil
}

func child(addr string) error {
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	state := sha256.Sum256([]byte("tcp child"))
	seen := sha256.New()
	msg := make([]byte, msgLen)
	reply := make([]byte, msgLen)
	for {
		if _, err := io.ReadFull(conn, msg); err != nil {
			return fmt.Errorf("child: receive: %w", err)
		}
		s := binary.LittleEndian.Uint64(msg)
		if s == 0 {
			break
		}
		seen.Write(msg)
		state = sha256.Sum256(append(state[:], msg...))
		binary.LittleEndian.PutUint64(reply, s)
		copy(reply[8:], state[:])
		if _, err := conn.Write(reply); err != nil {
			return fmt.Errorf("child: send: %w", err)
		}
	}
	if _, err := conn.Write(seen.Sum(nil)); err != nil {
		return fmt.Errorf("child: send digest: %w", err)
	}
	// Wait for the parent to close, so the parent never sees a reset.
	if _, err := conn.Read(msg); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("child: wait for close: %w", err)
	}
	return nil
}
