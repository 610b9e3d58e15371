package cli

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"time"
)

// relay copies what the job appends to its output files to cryo's own
// streams: stdout as it is, stderr a line at a time, each line prefixed
// "host: ". After a restore has cut a file back, what the restored job
// writes again is relayed only from where it differs from what was
// relayed before (see relayFile), so nothing is shown twice or lost.
//
// hold(true) relays what the files hold now and then nothing more until
// hold(false): a job stopped for a migration may run on at the
// destination, whose cryo shows what it writes from there.
func relay(ctx context.Context, outPath string, out io.Writer, errPath string, errw io.Writer) (stop func(), hold func(bool)) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	holds := make(chan bool)
	go func() {
		defer close(done)
		var files []*relayFile
		if outPath != "" {
			files = append(files, newRelayFile(outPath, out, false))
		}
		if errPath != "" {
			files = append(files, newRelayFile(errPath, errw, true))
		}
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		held := false
		for {
			select {
			case <-ctx.Done():
				for _, f := range files {
					if !held {
						f.pump(true)
					}
				}
				return
			case on := <-holds:
				if on && !held {
					for _, f := range files {
						f.pump(true)
					}
				}
				held = on
			case <-t.C:
				for _, f := range files {
					if !held {
						f.pump(false)
					}
				}
			}
		}
	}()
	stop = func() { cancel(); <-done }
	hold = func(on bool) {
		select {
		case holds <- on:
		case <-done:
		}
	}
	return stop, hold
}

// relayTail is how much of what it relayed a relayFile keeps, to find
// where a file cut back and written again departs from it.
const relayTail = 1 << 20

// relayFile relays one file. It starts at the file's size (what is there
// was written before this cryo, and shown by the one then). A restore cuts
// the file back to its size at the checkpoint, and the restored job
// writes the same again, then goes on; but before the failure the job may
// have written what it does not write again (a launcher's report of a
// dead rank). So the relay keeps the last relayTail bytes it relayed, and
// when the file is shorter than what was relayed, or its bytes before
// that point changed, it finds where the file departs from them: what was
// relayed beyond that point is "ahead", and what the job writes from
// there is shown only from the first byte that differs from it. What lies
// before the kept bytes is taken as written again unchanged.
type relayFile struct {
	path  string
	w     io.Writer
	lines bool   // prefix each line with "host: "
	pos   int64  // the file's bytes up to here are accounted for
	tail  []byte // the last of them
	ahead []byte // relayed once after pos, from a file since cut back
	part  []byte // lines: the end of what was relayed that is not a whole line yet, not shown
}

func newRelayFile(path string, w io.Writer, lines bool) *relayFile {
	f := &relayFile{path: path, w: w, lines: lines}
	if st, err := os.Stat(path); err == nil {
		f.pos = st.Size()
	}
	return f
}

// pump relays what the file holds beyond what was relayed; flush shows a
// last line without its newline too.
func (f *relayFile) pump(flush bool) {
	fd, err := os.Open(f.path)
	if err != nil {
		return
	}
	defer fd.Close()
	st, err := fd.Stat()
	if err != nil {
		return
	}
	f.realign(fd, st.Size())
	b := make([]byte, max(0, min(st.Size()-f.pos, 16<<20)))
	n, _ := fd.ReadAt(b, f.pos)
	b = b[:max(n, 0)]
	f.pos += int64(len(b))
	f.tail = append(f.tail, b...)
	if over := len(f.tail) - relayTail; over > 0 {
		f.tail = append(f.tail[:0:0], f.tail[over:]...)
	}
	// What matches what was relayed before is not shown again.
	j := 0
	for j < len(b) && j < len(f.ahead) && b[j] == f.ahead[j] {
		j++
	}
	if j == len(b) {
		f.ahead = f.ahead[j:]
		f.show(nil, flush)
		return
	}
	if f.lines {
		// The rest of ahead is given up; of it, what was not shown yet
		// (the start of a line) never will be.
		f.part = f.part[:max(0, len(f.part)-(len(f.ahead)-j))]
	}
	f.ahead = nil
	f.show(b[j:], flush)
}

// realign finds where the file departs from what was relayed, if it
// does: the relay goes back there, and what it had relayed beyond is
// ahead.
func (f *relayFile) realign(fd *os.File, size int64) {
	if size >= f.pos {
		// Cheap check: the last bytes accounted for are still the file's.
		n := min(len(f.tail), 64)
		cur := make([]byte, n)
		if k, _ := fd.ReadAt(cur, f.pos-int64(n)); k == n && bytes.Equal(cur, f.tail[len(f.tail)-n:]) {
			return
		}
	}
	start := f.pos - int64(len(f.tail)) // where the kept bytes begin in the file
	cur := make([]byte, max(0, min(size, f.pos)-start))
	k, _ := fd.ReadAt(cur, start)
	cur = cur[:max(k, 0)]
	i := 0
	for i < len(cur) && cur[i] == f.tail[i] {
		i++
	}
	f.ahead = append(append([]byte(nil), f.tail[i:]...), f.ahead...)
	// (Cut back below the kept bytes, the file is read on from where
	// they begin once it has grown back there: what lies before is taken
	// as written again unchanged.)
	f.pos, f.tail = start+int64(i), f.tail[:i]
}

func (f *relayFile) show(b []byte, flush bool) {
	if !f.lines {
		if len(b) > 0 {
			f.w.Write(b)
		}
		return
	}
	f.part = append(f.part, b...)
	for {
		i := bytes.IndexByte(f.part, '\n')
		if i < 0 {
			break
		}
		fmt.Fprintf(f.w, "host: %s\n", f.part[:i])
		f.part = f.part[i+1:]
	}
	if flush && len(f.part) > 0 {
		fmt.Fprintf(f.w, "host: %s\n", f.part)
		f.part = nil
	}
}
