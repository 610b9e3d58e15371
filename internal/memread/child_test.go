package memread

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The test binary, run with MEMREAD_CHILD=1, is the child whose memory the
// tests read. It takes commands on stdin, one a line, and answers each on
// stdout:
//
//	map N              map N pages (between two PROT_NONE guard pages); answers the address
//	write I COUNT V    fill pages I..I+COUNT-1 with pageContent(page, V)
//	zero I COUNT       write zeros into pages I..I+COUNT-1
//	unmap I COUNT      munmap pages I..I+COUNT-1
//	protect I COUNT    mprotect pages I..I+COUNT-1 PROT_NONE
//	exit               exit at once
//
// Its garbage collector is off, so that its runtime frees no memory
// between two scans.
func TestMain(m *testing.M) {
	if os.Getenv("MEMREAD_CHILD") == "1" {
		child(os.Stdin, os.Stdout)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func child(in io.Reader, out io.Writer) {
	debug.SetGCPercent(-1)
	var mem []byte
	sc := bufio.NewScanner(in)
	fail := func(err error) {
		fmt.Fprintf(out, "error %v\n", err)
		os.Exit(1)
	}
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		arg := func(i int) int {
			if i >= len(f) {
				fail(fmt.Errorf("%q: too few arguments", sc.Text()))
			}
			n, err := strconv.Atoi(f[i])
			if err != nil {
				fail(err)
			}
			return n
		}
		pages := func() []byte {
			i, n := arg(1), arg(2)
			return mem[i*PageSize : (i+n)*PageSize]
		}
		switch f[0] {
		case "map":
			n := arg(1)
			p, err := unix.MmapPtr(-1, 0, nil, uintptr(n+2)*PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
			if err != nil {
				fail(err)
			}
			all := unsafe.Slice((*byte)(p), (n+2)*PageSize)
			// Never a huge page, whose first touch would make all its
			// 512 pages present.
			if err := unix.Madvise(all, unix.MADV_NOHUGEPAGE); err != nil {
				fail(err)
			}
			if err := unix.Mprotect(all[:PageSize], unix.PROT_NONE); err != nil {
				fail(err)
			}
			if err := unix.Mprotect(all[(n+1)*PageSize:], unix.PROT_NONE); err != nil {
				fail(err)
			}
			mem = all[PageSize : (n+1)*PageSize]
			fmt.Fprintf(out, "%d\n", uintptr(p)+PageSize)
			continue
		case "write":
			i, n, v := arg(1), arg(2), arg(3)
			for k := i; k < i+n; k++ {
				fillPage(mem[k*PageSize:(k+1)*PageSize], k, byte(v))
			}
		case "zero":
			clear(pages())
		case "unmap":
			b := pages()
			if err := unix.MunmapPtr(unsafe.Pointer(&b[0]), uintptr(len(b))); err != nil {
				fail(err)
			}
		case "protect":
			if err := unix.Mprotect(pages(), unix.PROT_NONE); err != nil {
				fail(err)
			}
		case "exit":
			os.Exit(0)
		default:
			fail(fmt.Errorf("unknown command %q", sc.Text()))
		}
		fmt.Fprintln(out, "ok")
	}
}

// fillPage writes into p the content of page k of the child's region
// written with value v. Pages differ with k and v; none is all zeros.
func fillPage(p []byte, k int, v byte) {
	for j := range p {
		p[j] = byte(j) + byte(j>>8)*3 + byte(k)*7 + v*11 + 1
	}
}

func pageContent(k int, v byte) []byte {
	p := make([]byte, PageSize)
	fillPage(p, k, v)
	return p
}

// testChild is a running child, its region of pages at base.
type testChild struct {
	cmd   *exec.Cmd
	in    io.Writer
	out   *bufio.Reader
	base  uint64
	pages int
}

// startChild starts a child and has it map a region of n pages.
func startChild(t testing.TB, n int) *testChild {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "MEMREAD_CHILD=1", "GOMAXPROCS=1")
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	c := &testChild{cmd: cmd, in: in, out: bufio.NewReader(out), pages: n}
	addr, err := strconv.ParseUint(c.send(t, "map %d", n), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	c.base = addr
	return c
}

// send sends the child a command and returns its answer.
func (c *testChild) send(t testing.TB, format string, args ...any) string {
	t.Helper()
	if _, err := fmt.Fprintf(c.in, format+"\n", args...); err != nil {
		t.Fatalf("child: %v", err)
	}
	line, err := c.out.ReadString('\n')
	if err != nil {
		t.Fatalf("child, after %q: %v", fmt.Sprintf(format, args...), err)
	}
	line = strings.TrimSuffix(line, "\n")
	if strings.HasPrefix(line, "error") {
		t.Fatalf("child, after %q: %s", fmt.Sprintf(format, args...), line)
	}
	return line
}

func (c *testChild) do(t testing.TB, format string, args ...any) {
	t.Helper()
	if a := c.send(t, format, args...); a != "ok" {
		t.Fatalf("child answered %q to %q", a, fmt.Sprintf(format, args...))
	}
}

func (c *testChild) addr(page int) uint64 { return c.base + uint64(page)*PageSize }
