package criu

import (
	"bufio"
	"errors"
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
	// CRIU reports its first Error line as the reason, which on some
	// machines is a harmless complaint; name the real one instead.
	if benign(s) {
		if best := lastError(e.Log); best != "" {
			s = "criu failed: " + best
		}
	}
	if ex := LogErrors(e.Log, 2); ex != "" {
		s += "\n" + ex
	}
	if h := hint(e.Log); h != "" {
		s += "\nhint: " + h
	}
	return s + "\nfull CRIU log: " + e.Log
}

// benignErrors are Error lines CRIU logs without failing because of them.
var benignErrors = []string{
	"rlimit: Can't setup RLIMIT_NOFILE", // CRIU raising its own fd limit inside a container
}

func benign(line string) bool {
	for _, b := range benignErrors {
		if strings.Contains(line, b) {
			return true
		}
	}
	return false
}

// lastError is the last meaningful Error line of a CRIU log, without its
// timestamp: the reason, rather than the "Dumping FAILED." that follows it.
func lastError(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	best := ""
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.Contains(line, "Error (") || benign(line) ||
			strings.Contains(line, "FAILED.") || strings.Contains(line, "Killing processes because of failure") {
			continue
		}
		if i := strings.Index(line, "Error ("); i >= 0 {
			best = line[i:]
		}
	}
	return best
}

// hints turn CRIU failures with a known cause into advice.
var hints = []struct{ match, advice string }{
	{"Unsupported proto 262", "the job has an MPTCP socket, which CRIU cannot checkpoint; Go >= 1.24 programs open MPTCP listeners by default: run them with GODEBUG=multipathtcp=0 (cryo run does so unless GODEBUG is set)"},
	{"Can't get 1:16 opt", "this CRIU cannot dump TCP sockets on Linux >= 6.16; build it with scripts/install-criu.sh, which applies cryo's fix"},
	{"has bad size", "a file the job had open changed size since the checkpoint; cryo run opens the job's output with O_APPEND, which CRIU does not check"},
	{"File exists", "a PID or file the job needs is still taken: wait for the old job to be reaped"},
	{"map_files", "this CRIU cannot dump a user's SysV shared memory (MPICH's); build it with scripts/install-criu.sh, which applies cryo's fix"},
}

func hint(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	for _, h := range hints {
		if strings.Contains(string(b), h.match) {
			return h.advice
		}
	}
	return ""
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
		if benign(line) {
			continue
		}
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

// ErrRecurring marks a CRIU failure that happens again however often the
// same images are dumped or restored the same way: a file the images need
// is missing or changed, a limit of CRIU's was reached, or the job holds
// something CRIU cannot checkpoint. Retrying does not help; something must
// change first. An *Error matches it when its log says so (see recurring).
var ErrRecurring = errors.New("the failure recurs")

// recurring are the CRIU log lines of failures that recur, each with what
// it means for the user.
var recurring = []struct{ match, what string }{
	{"on restore: No such file or directory", "a file the job had open is gone"},
	{"on restore: Permission denied", "a file the job had open may no longer be opened"},
	{"has bad size", "a file the job had open changed size"},
	{"has bad mode", "a file the job had open changed mode"},
	{"has bad build-ID", "a file the job had open was replaced"},
	{"Can't dump ghost file", "a deleted file the job holds open (shared memory of an MPI library, say) is larger than CRIU's ghost limit; --ghost-limit raises it"},
	{"increase limit", "a CRIU limit was reached"},
	{"doesn't live in IPC ns", "the job uses SysV IPC outside an IPC namespace of its own"},
	{"Unsupported proto", "the job holds a socket CRIU cannot checkpoint"},
	{"Can't dump half of stream unix connection", "the job is connected to a process outside it"},
	{"consider using --tcp-established", "the job holds a TCP connection CRIU may not checkpoint"},
}

// ErrAddressInUse marks a restore that failed because an address a socket
// of the job binds (a port it listens on) is in use on this node. It
// passes when that is TCP's TIME_WAIT of the job's own old connections,
// which Linux keeps for 60 s: a job whose server side (an MPI launcher's
// PMIx listener) was killed first leaves its port so, and the restored
// listener cannot bind it until then. It may also be another process's.
var ErrAddressInUse = errors.New("an address the job binds is in use on this node")

// passingFailure is a failure that may pass by itself: the words of
// CRIU's line that show it, the sentinel it matches, and what it means for
// the user.
type passingFailure struct {
	match []string
	err   error
	what  string
}

var passing = []passingFailure{
	{[]string{"Can't bind inet socket", "Address already in use"}, ErrAddressInUse,
		"a port the job listens on is in use on this node (by its old connections' TIME_WAIT, up to 60 s, or by another process)"},
}

// consequences are Error lines CRIU logs because of an earlier one.
var consequences = []string{"FAILED.", "Killing processes because of failure", "exited, status=",
	"Can't wait or restore", "killed by signal", "aborting"}

// Is makes an *Error whose log shows a recurring failure match
// ErrRecurring, and one that shows a failure that may pass match that
// one's sentinel (ErrAddressInUse).
func (e *Error) Is(target error) bool {
	switch target {
	case ErrRecurring:
		_, what := e.classify()
		return what != "" && passingOf(e.Reason()) == nil
	case ErrAddressInUse:
		p := passingOf(e.Reason())
		return p != nil && p.err == target
	}
	return false
}

// passingOf finds the failure that may pass which reason, one of CRIU's
// lines, shows (nil for none).
func passingOf(reason string) *passingFailure {
	for i, p := range passing {
		all := true
		for _, m := range p.match {
			all = all && strings.Contains(reason, m)
		}
		if all {
			return &passing[i]
		}
	}
	return nil
}

// Reason is the one line of CRIU's log that says why it failed (without
// its timestamp), or the RPC error when the log says nothing.
func (e *Error) Reason() string {
	r, _ := e.classify()
	if r == "" {
		return e.Err.Error()
	}
	return r
}

// Brief is a one-line account of the failure for a user: the reason, what
// it means when CRIU's log shows a recurring failure, and where the full
// log is.
func (e *Error) Brief() string {
	r, what := e.classify()
	if r == "" {
		r = e.Err.Error()
	}
	if p := passingOf(r); p != nil {
		what = p.what
	}
	if what != "" {
		r = what + ": " + r
	}
	return r + " (CRIU's log: " + e.Log + ")"
}

// classify finds the reason in CRIU's log: the first Error line that is
// neither benign nor a consequence of an earlier one; and, when it shows a
// failure that recurs, what that means.
func (e *Error) classify() (reason, what string) {
	b, err := os.ReadFile(e.Log)
	if err != nil {
		return "", ""
	}
	if len(b) > 16<<20 {
		b = b[len(b)-16<<20:]
	}
	var first, last string
	for _, line := range strings.Split(string(b), "\n") {
		i := strings.Index(line, "Error (")
		if i < 0 || benign(line) {
			continue
		}
		line = line[i:]
		if j := strings.Index(line, "): "); j >= 0 {
			line = line[j+3:] // the source location is CRIU's, not the user's
		}
		consequence := false
		for _, c := range consequences {
			consequence = consequence || strings.Contains(line, c)
		}
		if consequence {
			if last == "" {
				last = line
			}
			continue
		}
		if first == "" {
			first = line
		}
		for _, r := range recurring {
			if strings.Contains(line, r.match) {
				return line, r.what
			}
		}
	}
	if first == "" {
		first = last
	}
	return first, ""
}
