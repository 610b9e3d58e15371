package criu

import (
	"bufio"
	"fmt"
	"os"
	"strings"
)

// Error is a failed CRIU operation: the RPC error plus the Error lines of
// CRIU's log (with a little context) and where the full log is.
type Error struct {
	Err error
	Log string // path of CRIU's full log at the time of failure
}

func (e *Error) Error() string {
	s := e.Err.Error()
	if ex := LogErrors(e.Log, 2); ex != "" {
		s += "\n" + ex
	}
	return s + "\nfull CRIU log: " + e.Log
}

func (e *Error) Unwrap() error { return e.Err }

// LogErrors returns the "Error" lines of a CRIU log, each with up to ctx
// lines before it, at most 20 lines in all. It returns "" when the log is
// missing or has no errors.
func LogErrors(path string, ctx int) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	var window, out []string
	lastOut := -1
	i := 0
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.Contains(line, "Error") || strings.Contains(line, "err:") {
			start := i - len(window)
			for j, w := range window {
				if start+j > lastOut {
					out = append(out, "  "+w)
				}
			}
			out = append(out, "  "+line)
			lastOut = i
			window = window[:0]
		} else {
			window = append(window, line)
			if len(window) > ctx {
				window = window[1:]
			}
		}
		i++
	}
	if len(out) == 0 {
		return ""
	}
	if len(out) > 20 {
		out = append(out[:20], fmt.Sprintf("  ... (%d more lines)", len(out)-20))
	}
	return "CRIU log errors:\n" + strings.Join(out, "\n")
}
