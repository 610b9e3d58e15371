package criu

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// testdata/dump-sockopt.log is an excerpt of a real failed dump (CRIU 4.1.1
// on Linux 6.18, a process holding a TCP socket); dump-sockopt.errors is
// what LogErrors must make of it with two lines of context.
func TestLogErrorsGolden(t *testing.T) {
	want, err := os.ReadFile("testdata/dump-sockopt.errors")
	if err != nil {
		t.Fatal(err)
	}
	got := LogErrors("testdata/dump-sockopt.log", 2)
	if got != string(want) {
		t.Errorf("LogErrors:\n%s\nwant:\n%s", got, want)
	}
}

func TestLogErrorsContext(t *testing.T) {
	lines := func(ls ...string) string { return strings.Join(ls, "\n") + "\n" }
	tests := []struct {
		name string
		log  string
		ctx  int
		want string // "" for no errors
	}{
		{"no errors", lines("a", "b", "Warn (x): careful"), 2, ""},
		{"context before", lines("a", "b", "c", "Error (x): boom", "d"), 2,
			lines("CRIU log errors:", "  b", "  c", "  Error (x): boom")},
		{"no context", lines("a", "Error (x): boom"), 0,
			lines("CRIU log errors:", "  Error (x): boom")},
		{"error on the first line", lines("Error (x): first", "a"), 3,
			lines("CRIU log errors:", "  Error (x): first")},
		{"adjacent errors share context", lines("a", "b", "Error 1", "Error 2", "c", "Error 3"), 2,
			lines("CRIU log errors:", "  a", "  b", "  Error 1", "  Error 2", "  c", "  Error 3")},
		{"pie err: lines count", lines("a", "pie: 12: err: no memory"), 1,
			lines("CRIU log errors:", "  a", "  pie: 12: err: no memory")},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "dump.log")
			if err := os.WriteFile(p, []byte(tc.log), 0o600); err != nil {
				t.Fatal(err)
			}
			got := LogErrors(p, tc.ctx)
			if tc.want != "" {
				tc.want = strings.TrimSuffix(tc.want, "\n")
			}
			if got != tc.want {
				t.Errorf("LogErrors:\n%q\nwant:\n%q", got, tc.want)
			}
		})
	}
}

func TestLogErrorsLimit(t *testing.T) {
	var b strings.Builder
	for i := range 30 {
		fmt.Fprintf(&b, "Error %d\n", i)
	}
	p := filepath.Join(t.TempDir(), "dump.log")
	if err := os.WriteFile(p, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	got := strings.Split(LogErrors(p, 2), "\n")
	if len(got) != 22 || got[20] != "  Error 19" || got[21] != "  ... (10 more lines)" {
		t.Errorf("LogErrors of 30 errors gave %d lines ending %q, want 20 errors then a count", len(got), got[len(got)-2:])
	}
}

func TestLogErrorsMissingLog(t *testing.T) {
	if got := LogErrors(filepath.Join(t.TempDir(), "nope.log"), 2); got != "" {
		t.Errorf("LogErrors of a missing log = %q, want \"\"", got)
	}
}

func TestErrorNamesLog(t *testing.T) {
	cause := errors.New("criu DUMP failed: (errno 0)")
	e := &Error{Err: cause, Log: "testdata/dump-sockopt.log"}
	msg := e.Error()
	for _, want := range []string{cause.Error(), "Can't get 1:16 opt", "full CRIU log: testdata/dump-sockopt.log"} {
		if !strings.Contains(msg, want) {
			t.Errorf("Error() = %q, should contain %q", msg, want)
		}
	}
	if !errors.Is(fmt.Errorf("checkpoint: %w", e), cause) {
		t.Error("Error does not unwrap to its cause")
	}
	var ce *Error
	if !errors.As(fmt.Errorf("wrapped: %w", e), &ce) || ce.Log != e.Log {
		t.Error("errors.As does not find *Error through wrapping")
	}
}
