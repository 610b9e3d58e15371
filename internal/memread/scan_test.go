package memread

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/cryo-hpc/cryo/internal/proc"
)

// scanRegion scans the child with tr and returns the stats and the pages of
// its region that fn got, by page index. It checks what every run must be:
// Data and Digests agree, at most 1 MiB, in address order, and a run that
// touches the child's region lies inside it; runsIn counts those.
func scanRegion(t *testing.T, tr *Tracker, id int, c *testChild) (stats ScanStats, got map[int][]byte, runsIn []Run) {
	t.Helper()
	lo, hi := c.base, c.addr(c.pages)
	got = map[int][]byte{}
	var last uint64
	stats, err := tr.Scan(context.Background(), id, c.cmd.Process.Pid, func(r Run) error {
		n := len(r.Digests)
		if n == 0 || len(r.Data) != n*PageSize || n > batchPages || r.Addr%PageSize != 0 {
			t.Errorf("run at %#x: %d digests, %d bytes", r.Addr, n, len(r.Data))
		}
		if r.Addr < last {
			t.Errorf("run at %#x after one ending at %#x", r.Addr, last)
		}
		end := r.Addr + uint64(len(r.Data))
		last = end
		for i := range n {
			if PageDigest(r.Data[i*PageSize:(i+1)*PageSize]) != r.Digests[i] {
				t.Errorf("page %#x: digest does not match data", r.Addr+uint64(i)*PageSize)
			}
		}
		if end <= lo || r.Addr >= hi {
			return nil
		}
		if r.Addr < lo || end > hi {
			t.Errorf("run %#x-%#x crosses the region's edge %#x-%#x", r.Addr, end, lo, hi)
		}
		runsIn = append(runsIn, Run{Addr: r.Addr, Digests: slices.Clone(r.Digests)})
		for i := range n {
			if a := r.Addr + uint64(i)*PageSize; a >= lo && a < hi {
				got[int((a-lo)/PageSize)] = bytes.Clone(r.Data[i*PageSize : (i+1)*PageSize])
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("scan: %v", err)
	}
	if stats.Changed < int64(len(got)) || stats.Pages < stats.Changed || stats.Zero > stats.Changed {
		t.Errorf("stats %+v: with %d changed pages in the region alone", stats, len(got))
	}
	return stats, got, runsIn
}

// checkPages compares the pages fn got with those wanted, by content.
func checkPages(t *testing.T, step string, got, want map[int][]byte) {
	t.Helper()
	g, w := slices.Sorted(maps.Keys(got)), slices.Sorted(maps.Keys(want))
	if !slices.Equal(g, w) {
		t.Errorf("%s: %d changed pages %v, want %d: %v", step, len(g), g[:min(len(g), 20)], len(w), w[:min(len(w), 20)])
		return
	}
	for k, w := range want {
		if !bytes.Equal(got[k], w) {
			t.Errorf("%s: page %d has the wrong content", step, k)
		}
	}
}

// tracked counts the pages tr tracks of process id in [lo, hi).
func tracked(tr *Tracker, id int, lo, hi uint64) int {
	n := 0
	if tb := tr.procs[id]; tb != nil {
		for k, c := range tb.chunks {
			for i := range chunkPages {
				a := (k*chunkPages + uint64(i)) * PageSize
				if c.present&(1<<i) != 0 && a >= lo && a < hi {
					n++
				}
			}
		}
	}
	return n
}

// TestScan follows a child's region through a series of changes: what
// each scan reports changed, what it forgets, what Seen says.
func TestScan(t *testing.T) {
	const n, id = 640, 42
	c := startChild(t, n)
	pid := c.cmd.Process.Pid

	// Touched: below 300 all but every fifth page (2, 7, 12, ...), page 8
	// written with zeros; 300-319 untouched; 320-639 all, a run longer
	// than a batch.
	want := map[int][]byte{}
	for i := range n {
		if (i < 300 && i%5 != 2) || i >= 320 {
			want[i] = pageContent(i, 0)
		}
	}
	want[8] = make([]byte, PageSize)
	for lo := 0; lo < 300; lo += 5 {
		c.do(t, "write %d 2 0", lo)
		c.do(t, "write %d 2 0", lo+3)
	}
	c.do(t, "write 320 320 0")
	c.do(t, "zero 8 1")

	tr := NewTracker()
	stats, got, runs := scanRegion(t, tr, id, c)
	checkPages(t, "first scan", got, want)
	if stats.Zero < 1 {
		t.Errorf("first scan: %d zero pages, want at least the one written", stats.Zero)
	}
	long := 0
	for _, r := range runs {
		if r.Addr >= c.addr(320) {
			long++
		}
	}
	if long < 2 || long > 3 {
		t.Errorf("first scan: 320 changed pages in %d runs, want 2 or 3 (1 MiB at most, cut where a batch ends)", long)
	}
	if k := tracked(tr, id, c.base, c.addr(n)); k != len(want) || tr.Pages() < int64(k) {
		t.Errorf("after the first scan, %d pages of the region tracked (%d in all), want %d", k, tr.Pages(), len(want))
	}
	wholeFirst := tr.Pages()

	_, got, _ = scanRegion(t, tr, id, c)
	checkPages(t, "second scan, nothing changed", got, nil)

	for _, k := range []int{5, 123, 500} {
		c.do(t, "write %d 1 1", k)
	}
	_, got, _ = scanRegion(t, tr, id, c)
	checkPages(t, "three pages changed", got, map[int][]byte{5: pageContent(5, 1), 123: pageContent(123, 1), 500: pageContent(500, 1)})

	// A page touched for the first time is changed; one written again
	// with the content it had is not.
	c.do(t, "write 301 1 0")
	c.do(t, "write 123 1 1")
	_, got, _ = scanRegion(t, tr, id, c)
	checkPages(t, "one page touched, one rewritten alike", got, map[int][]byte{301: pageContent(301, 0)})

	for _, tc := range []struct {
		name string
		page int
		d    Digest
		want bool
	}{
		{"changed page, new content", 5, PageDigest(pageContent(5, 1)), true},
		{"changed page, old content", 5, PageDigest(pageContent(5, 0)), false},
		{"unchanged page", 6, PageDigest(pageContent(6, 0)), true},
		{"zero page", 8, ZeroDigest, true},
		{"untouched page", 310, ZeroDigest, false},
		{"newly touched page", 301, PageDigest(pageContent(301, 0)), true},
	} {
		if got := tr.Seen(id, c.addr(tc.page), tc.d); got != tc.want {
			t.Errorf("Seen, %s: %v, want %v", tc.name, got, tc.want)
		}
	}
	if tr.Seen(id+1, c.addr(6), PageDigest(pageContent(6, 0))) {
		t.Errorf("Seen of another process id is true")
	}

	// Unmapped pages are forgotten: 8 of pages 0-9 were tracked.
	c.do(t, "unmap 0 10")
	stats, got, _ = scanRegion(t, tr, id, c)
	checkPages(t, "after munmap", got, nil)
	if stats.Gone < 8 || tracked(tr, id, c.base, c.addr(10)) != 0 || tr.Seen(id, c.addr(5), PageDigest(pageContent(5, 1))) {
		t.Errorf("after munmap of 8 tracked pages: Gone %d, %d of them still tracked", stats.Gone, tracked(tr, id, c.base, c.addr(10)))
	}

	// So are pages of a region without read permission now.
	c.do(t, "protect 600 10")
	stats, got, _ = scanRegion(t, tr, id, c)
	checkPages(t, "after mprotect PROT_NONE", got, nil)
	if stats.Gone < 10 || tracked(tr, id, c.addr(600), c.addr(610)) != 0 {
		t.Errorf("after PROT_NONE on 10 tracked pages: Gone %d, %d of them still tracked", stats.Gone, tracked(tr, id, c.addr(600), c.addr(610)))
	}
	if k, w := tracked(tr, id, c.base, c.addr(n)), len(want)+1-8-10; k != w {
		t.Errorf("%d pages of the region tracked, want %d", k, w)
	}

	// Note records what the final phase sent.
	before := tr.Pages()
	d := PageDigest(pageContent(310, 9))
	tr.Note(id, c.addr(310), d)
	if !tr.Seen(id, c.addr(310), d) || tr.Pages() != before+1 {
		t.Errorf("after Note: Seen %v, Pages %d (was %d)", tr.Seen(id, c.addr(310), d), tr.Pages(), before)
	}
	tr.Note(id, c.addr(310), ZeroDigest)
	if tr.Seen(id, c.addr(310), d) || !tr.Seen(id, c.addr(310), ZeroDigest) || tr.Pages() != before+1 {
		t.Errorf("after a second Note of the page: it is not the new digest, or Pages changed")
	}
	tr.Forget(id)
	if tr.Pages() != 0 || tr.Seen(id, c.addr(6), PageDigest(pageContent(6, 0))) {
		t.Errorf("after Forget: %d pages tracked (%d after the first scan)", tr.Pages(), wholeFirst)
	}

	// A scan after Forget starts over.
	_, got, _ = scanRegion(t, tr, id, c)
	if len(got) != len(want)+1-8-10 {
		t.Errorf("scan after Forget: %d pages changed, want every tracked one (%d)", len(got), len(want)+1-8-10)
	}

	c.send(t, "write 0 0 0") // still alive
	if _, err := c.in.Write([]byte("exit\n")); err != nil {
		t.Fatal(err)
	}
	c.cmd.Wait()
	if _, err := tr.Scan(context.Background(), id, pid, func(Run) error { return nil }); !errors.Is(err, ErrGone) {
		t.Errorf("scan of a child that exited: %v, want ErrGone", err)
	}
}

// TestScanZombie: a child that has exited but is not yet reaped is gone
// too.
func TestScanZombie(t *testing.T) {
	c := startChild(t, 1)
	if _, err := c.in.Write([]byte("exit\n")); err != nil {
		t.Fatal(err)
	}
	pid := c.cmd.Process.Pid
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := proc.ReadStat(pid)
		if err != nil {
			t.Fatal(err)
		}
		if st.State == 'Z' {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("child %d not a zombie after 10s: state %c", pid, st.State)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if _, err := NewTracker().Scan(context.Background(), 1, pid, func(Run) error { return nil }); !errors.Is(err, ErrGone) {
		t.Errorf("scan of a zombie: %v, want ErrGone", err)
	}
	if _, err := NewTracker().Scan(context.Background(), 1, freePID(t), func(Run) error { return nil }); !errors.Is(err, ErrGone) {
		t.Errorf("scan of a free PID: %v, want ErrGone", err)
	}
}

// TestScanStops: an error from fn, or a cancelled context, ends the scan
// with that error, and the tracker keeps what it had: the pages fn did not
// accept are reported again next time.
func TestScanStops(t *testing.T) {
	const id = 1
	c := startChild(t, 20)
	c.do(t, "write 0 20 3")
	want := map[int][]byte{}
	for i := range 20 {
		want[i] = pageContent(i, 3)
	}
	tr := NewTracker()
	refused := errors.New("destination refused")
	_, err := tr.Scan(context.Background(), id, c.cmd.Process.Pid, func(r Run) error {
		if r.Addr < c.addr(20) && r.Addr+uint64(len(r.Data)) > c.base {
			return refused
		}
		return nil
	})
	if !errors.Is(err, refused) || !bytes.Contains([]byte(err.Error()), []byte(strconv.Itoa(c.cmd.Process.Pid))) {
		t.Errorf("scan whose fn fails: %v, want the error, with the pid", err)
	}
	if k := tracked(tr, id, c.base, c.addr(20)); k != 0 {
		t.Errorf("%d pages recorded that fn refused", k)
	}
	_, got, _ := scanRegion(t, tr, id, c)
	checkPages(t, "after a refused run", got, want)

	before := tr.Pages()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	c.do(t, "write 0 20 4")
	if _, err := tr.Scan(ctx, id, c.cmd.Process.Pid, func(Run) error { return nil }); !errors.Is(err, context.Canceled) {
		t.Errorf("scan with a cancelled context: %v", err)
	}
	if tr.Pages() != before {
		t.Errorf("a cancelled scan changed the pages tracked: %d, was %d", tr.Pages(), before)
	}
}

// TestReadSkips: process_vm_readv stops at a page it cannot read; read
// goes on after it and marks just that page unread. The pages are a
// child's, which maps nothing meanwhile that could take an unmapped
// page's place.
func TestReadSkips(t *testing.T) {
	const n = 8
	for _, tc := range []struct {
		name      string
		none, gap []int // pages made PROT_NONE, unmapped
	}{
		{"all readable", nil, nil},
		{"first", []int{0}, nil},
		{"last", nil, []int{n - 1}},
		{"scattered", []int{2}, []int{4, 5}},
		{"all", []int{0, 1, 2, 3}, []int{4, 5, 6, 7}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := startChild(t, n)
			c.do(t, "write 0 %d 5", n)
			bad := map[int]bool{}
			for _, k := range tc.none {
				bad[k] = true
				c.do(t, "protect %d 1", k)
			}
			for _, k := range tc.gap {
				bad[k] = true
				c.do(t, "unmap %d 1", k)
			}
			s := newScanner()
			s.pid = c.cmd.Process.Pid
			b := newBatch()
			for k := range n {
				b.addrs = append(b.addrs, c.addr(k))
				b.ok[k] = !bad[k] // the opposite of what read must find
			}
			s.read(b)
			if b.err != nil {
				t.Fatal(b.err)
			}
			for k := range n {
				if b.ok[k] == bad[k] {
					t.Errorf("page %d read: %v, want %v", k, b.ok[k], !bad[k])
				}
				if !bad[k] && (!bytes.Equal(b.buf[k*PageSize:(k+1)*PageSize], pageContent(k, 5)) || b.sums[k] != PageDigest(pageContent(k, 5))) {
					t.Errorf("page %d: wrong content or digest", k)
				}
			}
		})
	}
}

// TestScanOtherUser: root (with CAP_SYS_PTRACE) reads another user's
// process; a user reading another user's process is refused with an
// error that says so.
func TestScanOtherUser(t *testing.T) {
	if os.Geteuid() == 0 {
		cmd := exec.Command("sleep", "60")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		for range 1000 { // until it has exec'd
			if argv, _ := proc.Cmdline(cmd.Process.Pid); len(argv) > 0 && argv[0] == "sleep" {
				break
			}
			time.Sleep(time.Millisecond)
		}
		stats, err := NewTracker().Scan(context.Background(), 1, cmd.Process.Pid, func(Run) error { return nil })
		if err != nil || stats.Pages == 0 {
			t.Errorf("root scanning uid 65534's sleep: %+v, %v", stats, err)
		}
		return
	}
	other := 0
	pids, err := proc.PIDs()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pids {
		if uid, err := proc.StatusInts(p, "Uid"); err == nil && len(uid) > 0 && uid[0] != os.Getuid() {
			if st, err := proc.ReadStat(p); err == nil && !st.Kernel {
				other = p
				break
			}
		}
	}
	if other == 0 {
		if os.Getenv("CRYO_NO_SKIP") == "1" {
			t.Fatal("no process of another user here to be refused, and CRYO_NO_SKIP=1 forbids skipping")
		}
		t.Skip("no process of another user here to be refused")
	}
	_, err = NewTracker().Scan(context.Background(), 1, other, func(Run) error { return nil })
	t.Logf("uid %d scanning pid %d: %v", os.Getuid(), other, err)
	if !errors.Is(err, fs.ErrPermission) {
		t.Errorf("a user scanning pid %d of another user: %v, want a permission error", other, err)
	}
}

// freePID returns a PID that no process has.
func freePID(t testing.TB) int {
	t.Helper()
	b, err := os.ReadFile("/proc/sys/kernel/pid_max")
	if err != nil {
		t.Fatal(err)
	}
	max, err := strconv.Atoi(string(bytes.TrimSpace(b)))
	if err != nil {
		t.Fatal(err)
	}
	for p := max - 1; p > 1; p-- {
		if _, err := os.Stat("/proc/" + strconv.Itoa(p)); errors.Is(err, fs.ErrNotExist) {
			return p
		}
	}
	t.Fatal("no free PID")
	return 0
}

// BenchmarkScan reads a child holding 512 MiB of touched memory: a first
// scan with an empty Tracker, and a scan that finds nothing changed.
// Throughput is of the present pages read (b.SetBytes).
func BenchmarkScan(b *testing.B) {
	const mib = 512
	c := startChild(b, mib<<20/PageSize)
	c.do(b, "write 0 %d 0", mib<<20/PageSize)
	pid := c.cmd.Process.Pid
	none := func(Run) error { return nil }
	var sent int64
	count := func(r Run) error { sent += int64(len(r.Data)); return nil }

	// Once, to size it: the pages read, and the Tracker's memory per page
	// (what Forget gives back).
	var m0, m1 runtime.MemStats
	tr := NewTracker()
	stats, err := tr.Scan(context.Background(), 1, pid, none)
	if err != nil {
		b.Fatal(err)
	}
	pages := tr.Pages()
	runtime.GC()
	runtime.ReadMemStats(&m0)
	tr.Forget(1)
	runtime.GC()
	runtime.ReadMemStats(&m1)
	perPage := float64(m0.HeapAlloc-m1.HeapAlloc) / float64(pages)
	if _, err := tr.Scan(context.Background(), 1, pid, none); err != nil {
		b.Fatal(err)
	}

	b.Run("first", func(b *testing.B) {
		b.SetBytes(stats.Pages * PageSize)
		b.ReportAllocs()
		cpu := cpuTime()
		for b.Loop() {
			sent = 0
			if _, err := NewTracker().Scan(context.Background(), 1, pid, count); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric((cpuTime()-cpu).Seconds()/float64(b.N), "cpu-s/op")
		b.ReportMetric(perPage, "tracker-B/page")
		if sent < mib<<20 {
			b.Errorf("first scan sent %d bytes", sent)
		}
	})
	b.Run("unchanged", func(b *testing.B) {
		b.SetBytes(stats.Pages * PageSize)
		b.ReportAllocs()
		sent = 0
		cpu := cpuTime()
		for b.Loop() {
			if _, err := tr.Scan(context.Background(), 1, pid, count); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric((cpuTime()-cpu).Seconds()/float64(b.N), "cpu-s/op")
		if sent >= mib<<20/16 {
			b.Errorf("unchanged scans sent %d bytes", sent)
		}
	})
}

// cpuTime is the CPU time this process has used, user and system.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
