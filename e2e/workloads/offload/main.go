// Command offload is the host/offload test workload of the monitor tests.
//
// The host (-role host) streams -items work items to an offload worker
// (-role worker) over a socket (-addr: a unix socket path, or host:port for
// TCP). The worker keeps state — a running SHA-256 over every item it saw —
// and answers each item with its digest so far; the host computes the same
// digest itself and checks every answer. At the end the host prints
// "result HEX", a digest that depends on every item in order, so a lost,
// duplicated or reordered message changes it (and a wrong answer stops the
// host with "MISMATCH" and exit code 3).
//
// Faults for the detectors (-fault, at item -fault-at, only while the file
// -fault-file does not exist; the worker creates it, so a restored job
// does not fail again; with no -fault-file, every time): exit (exit 1),
// kill (SIGKILL itself), close (close the connection and keep running),
// hang (stop, using no CPU). A -patient host does not exit when the
// channel breaks: it waits forever, as a host that misses the loss would.
// -work makes the worker spend that much CPU on each item.
package main

import (
	"crypto/sha256"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"time"
)

func main() {
	role := flag.String("role", "host", "host or worker")
	addr := flag.String("addr", "", "unix socket path, or host:port")
	items := flag.Int("items", 200, "work items")
	delay := flag.Duration("delay", 20*time.Millisecond, "host's pause between items")
	fault := flag.String("fault", "", "worker fault: exit, kill, close, hang")
	faultAt := flag.Int("fault-at", 50, "item at which the fault strikes")
	faultFile := flag.String("fault-file", "", "the fault strikes only while this file is absent")
	patient := flag.Bool("patient", false, "host: on a broken channel, wait instead of exiting")
	work := flag.Duration("work", 0, "worker: CPU time to spend on each item")
	flag.Parse()
	network := "tcp"
	if strings.Contains(*addr, "/") {
		network = "unix"
	}
	switch *role {
	case "worker":
		worker(network, *addr, *fault, *faultAt, *faultFile, *work)
	default:
		code := host(network, *addr, *items, *delay)
		if code == 4 && *patient {
			fmt.Println("waiting for the worker")
			for {
				time.Sleep(time.Hour)
			}
		}
		os.Exit(code)
	}
}

func step(d []byte, item uint64) []byte {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], item)
	h := sha256.New()
	h.Write(d)
	h.Write(b[:])
	return h.Sum(nil)
}

func itemValue(i int) uint64 { return uint64(i)*0x9E3779B97F4A7C15 ^ 0xDEADBEEF }

func host(network, addr string, items int, delay time.Duration) int {
	var c net.Conn
	var err error
	for try := 0; try < 200; try++ {
		if c, err = net.Dial(network, addr); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "host: cannot reach worker:", err)
		return 2
	}
	hb := os.Getenv("CRYO_HEARTBEAT_FILE")
	digest := make([]byte, 32)
	ans := make([]byte, 32)
	var b [8]byte
	for i := 1; i <= items; i++ {
		v := itemValue(i)
		binary.LittleEndian.PutUint64(b[:], v)
		if _, err := c.Write(b[:]); err != nil {
			fmt.Fprintf(os.Stderr, "host: send item %d: %v\n", i, err)
			return 4
		}
		if _, err := io.ReadFull(c, ans); err != nil {
			fmt.Fprintf(os.Stderr, "host: answer to item %d: %v\n", i, err)
			return 4
		}
		digest = step(digest, v)
		if string(ans) != string(digest) {
			fmt.Printf("MISMATCH at item %d\n", i)
			return 3
		}
		fmt.Printf("step %d\n", i)
		if hb != "" {
			now := time.Now()
			_ = os.Chtimes(hb, now, now)
		}
		time.Sleep(delay)
	}
	fmt.Printf("result %x\n", digest)
	return 0
}

func worker(network, addr, fault string, faultAt int, faultFile string, work time.Duration) {
	if network == "unix" {
		os.Remove(addr)
	}
	l, err := net.Listen(network, addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		os.Exit(2)
	}
	c, err := l.Accept()
	if err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		os.Exit(2)
	}
	l.Close()
	digest := make([]byte, 32)
	var b [8]byte
	for n := 1; ; n++ {
		if _, err := io.ReadFull(c, b[:]); err != nil {
			os.Exit(0) // the host is done
		}
		if work > 0 {
			for t := time.Now(); time.Since(t) < work; {
			}
		}
		if fault != "" && n == faultAt {
			if _, err := os.Stat(faultFile); faultFile == "" || err != nil {
				if faultFile != "" {
					os.WriteFile(faultFile, []byte(fault), 0o644)
				}
				switch fault {
				case "exit":
					os.Exit(1)
				case "kill":
					syscall.Kill(os.Getpid(), syscall.SIGKILL)
				case "close":
					c.Close()
					for {
						time.Sleep(time.Hour)
					}
				case "hang":
					for {
						time.Sleep(time.Hour)
					}
				}
			}
		}
		digest = step(digest, binary.LittleEndian.Uint64(b[:]))
		if _, err := c.Write(digest); err != nil {
			os.Exit(0)
		}
	}
}
