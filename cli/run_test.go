package cli

import (
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
