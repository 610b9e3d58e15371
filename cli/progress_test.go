package cli

import (
	"bytes"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cryo-hpc/cryo/internal/store"
)

func TestProgressRender(t *testing.T) {
	l := &progressLine{op: "verify", p: &store.Progress{}, start: time.Unix(100, 0)}
	l.p.AddTotal(4 << 20)
	l.p.Add(1 << 20)
	got := l.render(time.Unix(102, 0))
	for _, want := range []string{"verify: 1.0 MiB of 4.0 MiB (25%)", "0.5 MiB/s"} {
		if !strings.Contains(got, want) {
			t.Errorf("render = %q, want it to contain %q", got, want)
		}
	}
	l = &progressLine{op: "checkpoint", p: &store.Progress{}, start: time.Unix(100, 0)}
	l.p.Add(3 << 30)
	if got := l.render(time.Unix(101, 0)); got != "checkpoint: 3072.0 MiB, 3072.0 MiB/s" {
		t.Errorf("render without a total = %q", got)
	}
}

// TestProgressQuietWhenNotATerminal: batch jobs (stderr a file or pipe)
// and --json get no progress line.
func TestProgressQuietWhenNotATerminal(t *testing.T) {
	var buf bytes.Buffer
	e := &env{stdout: &buf, stderr: &buf}
	for _, c := range []common{{}, {json: true}} {
		p, done := c.progress(e, "verify")
		if p != nil {
			t.Errorf("progress counter handed out for a non-terminal (json=%v)", c.json)
		}
		p.Add(10) // a nil counter is fine to use
		done()
	}
	if buf.Len() != 0 {
		t.Errorf("progress wrote %q", buf.String())
	}
}

// TestProgressLine: on a terminal the line is rewritten in place and
// cleared at the end.
func TestProgressLine(t *testing.T) {
	var buf bytes.Buffer
	l := &progressLine{w: &buf, op: "restore", p: &store.Progress{}, start: time.Now().Add(-time.Second), stop: make(chan struct{})}
	l.p.AddTotal(100 << 20)
	l.p.Add(50 << 20)
	l.done.Add(1)
	go l.run()
	time.Sleep(3 * progressTick)
	close(l.stop)
	l.done.Wait()
	out := buf.String()
	if !strings.HasPrefix(out, "\rrestore: 50.0 MiB of 100.0 MiB (50%)") || !strings.HasSuffix(out, "\r\x1b[K") || strings.Contains(out, "\n") {
		t.Errorf("progress line wrote %q", out)
	}
}

func TestIsTerminal(t *testing.T) {
	if isTerminal(&bytes.Buffer{}) {
		t.Error("a buffer is a terminal")
	}
	f, err := os.CreateTemp(t.TempDir(), "x")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if isTerminal(f) {
		t.Error("a regular file is a terminal")
	}
	pt, err := os.OpenFile("/dev/ptmx", os.O_RDWR, 0)
	if err != nil {
		t.Skipf("no pseudo-terminal to test with: %v", err)
	}
	defer pt.Close()
	if !isTerminal(pt) {
		t.Error("a pseudo-terminal is not a terminal")
	}
}

func TestHuman(t *testing.T) {
	for _, tc := range []struct {
		n    int64
		want string
	}{
		{0, "0.0 MiB"},
		{1, "<0.1 MiB"},
		{50 << 10, "<0.1 MiB"},
		{100 << 10, "0.1 MiB"},
		{3 << 20, "3.0 MiB"},
		{40 << 30, "40960.0 MiB"},
	} {
		if got := human(tc.n); got != tc.want {
			t.Errorf("human(%d) = %q, want %q", tc.n, got, tc.want)
		}
	}
}
