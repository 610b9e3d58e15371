package cli

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestSplitCommand(t *testing.T) {
	cases := []struct {
		in   string
		want []string
		bad  bool
	}{
		{in: "worker -addr /tmp/w.sock", want: []string{"worker", "-addr", "/tmp/w.sock"}},
		{in: `  a  'b c'  "d e" f\ g `, want: []string{"a", "b c", "d e", "f g"}},
		{in: `x "it's" 'say "hi"'`, want: []string{"x", "it's", `say "hi"`}},
		{in: `a ''`, want: []string{"a", ""}},
		{in: `a 'b`, bad: true},
		{in: `a b\`, bad: true},
		{in: "", want: nil},
	}
	for _, tc := range cases {
		got, err := splitCommand(tc.in)
		if tc.bad {
			if err == nil {
				t.Errorf("splitCommand(%q) = %q, want an error", tc.in, got)
			}
			continue
		}
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("splitCommand(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
}

// The host writes to cryo's stdout directly only when that is a file of
// its own: a file shared with cryo's stderr would have cryo's messages cut
// along with the job's output on a restore.
func TestStdoutFor(t *testing.T) {
	dir := t.TempDir()
	open := func(name string) *os.File {
		f, err := os.Create(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	out, errf, fallback := open("out"), open("err"), filepath.Join(dir, "host.out")
	if p, relay := stdoutFor("", out, errf, fallback); p != out.Name() || relay != "" {
		t.Errorf("a file of its own: %q relay %q, want %q", p, relay, out.Name())
	}
	both, err := os.OpenFile(out.Name(), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer both.Close()
	if p, relay := stdoutFor("", out, both, fallback); p != fallback || relay != fallback {
		t.Errorf("shared with stderr: %q relay %q, want %q relayed", p, relay, fallback)
	}
	r, w, _ := os.Pipe()
	defer r.Close()
	defer w.Close()
	if p, relay := stdoutFor("", w, errf, fallback); p != fallback || relay != fallback {
		t.Errorf("a pipe: %q relay %q, want %q relayed", p, relay, fallback)
	}
	if p, relay := stdoutFor("x.out", out, errf, fallback); !filepath.IsAbs(p) || relay != "" {
		t.Errorf("explicit: %q relay %q", p, relay)
	}
}

// After a restore cuts host.out back, the restored job writes the same
// again and goes on: the relay shows each of the job's lines once, and
// what only the failed run printed (a launcher's report of a dead rank)
// where it was, never in place of the job's own lines.
func TestRelayAfterACut(t *testing.T) {
	p := filepath.Join(t.TempDir(), "host.out")
	write := func(s string, flags int) {
		f, err := os.OpenFile(p, flags, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteString(s)
		f.Close()
	}
	write("before cryo\n", os.O_CREATE|os.O_WRONLY)
	var out bytes.Buffer
	f := newRelayFile(p, &out, false)
	appendTo := func(s string) { write(s, os.O_WRONLY|os.O_APPEND) }
	appendTo("step 1\nstep 2\n")
	f.pump(false)
	appendTo("step 3\n== BAD TERMINATION ==\n")
	f.pump(false)
	// The restore cuts back to the checkpoint (after step 2); the job
	// writes step 3 again, then step 4, before the relay looks.
	if err := os.Truncate(p, int64(len("before cryo\nstep 1\nstep 2\n"))); err != nil {
		t.Fatal(err)
	}
	appendTo("step 3\nstep 4\nstep 5\n")
	f.pump(false)
	appendTo("step 6\n")
	f.pump(true)
	want := "step 1\nstep 2\nstep 3\n== BAD TERMINATION ==\nstep 4\nstep 5\nstep 6\n"
	if out.String() != want {
		t.Errorf("relayed %q, want %q", out.String(), want)
	}

	// A cut with nothing different written again: nothing twice.
	out.Reset()
	g := newRelayFile(p, &out, true)
	appendTo("a\nb\n")
	g.pump(false)
	st, _ := os.Stat(p)
	os.Truncate(p, st.Size()-2)
	g.pump(false)
	appendTo("b\nc\n")
	g.pump(true)
	if want := "host: a\nhost: b\nhost: c\n"; out.String() != want {
		t.Errorf("relayed %q, want %q", out.String(), want)
	}
}

// A cut below what the relay keeps: the part it cannot compare is taken as
// written again unchanged, the rest is compared.
func TestRelayCutBelowWhatItKeeps(t *testing.T) {
	p := filepath.Join(t.TempDir(), "host.out")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	f := newRelayFile(p, &out, false)
	long := bytes.Repeat([]byte("x"), relayTail+10)
	os.WriteFile(p, append(long, "tail\n"...), 0o600)
	f.pump(false)
	os.WriteFile(p, long[:5], 0o600) // cut far back
	f.pump(false)
	os.WriteFile(p, append(long, "tail\nnew\n"...), 0o600) // written again, and on
	f.pump(true)
	if got := out.String(); got != string(long)+"tail\nnew\n" {
		t.Errorf("relayed %d bytes ending %q, want %d ending %q", len(got), got[max(0, len(got)-12):], len(long)+9, "tail\nnew\n")
	}
}
