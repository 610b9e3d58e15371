package cli

import (
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/cryo-hpc/cryo/internal/store"
	"golang.org/x/sys/unix"
)

// progressLine shows a long operation's progress as one line on a
// terminal, rewritten in place: bytes done (of the total when known), the
// percentage and the rate. It stays silent unless stderr is a terminal and
// output is not --json, so batch jobs' logs and machine-read output never
// see it. It appears only after a short delay, so quick operations do not
// flash it.
type progressLine struct {
	w     io.Writer
	op    string
	p     *store.Progress
	start time.Time
	stop  chan struct{}
	done  sync.WaitGroup
	shown bool
}

const (
	progressDelay = 400 * time.Millisecond
	progressTick  = 200 * time.Millisecond
)

// progress returns the counter to hand to a long operation, and a function
// that ends the line; both are inert (nil counter) when no line is shown.
func (c *common) progress(e *env, op string) (*store.Progress, func()) {
	if c.json || !isTerminal(e.stderr) {
		return nil, func() {}
	}
	l := &progressLine{w: e.stderr, op: op, p: &store.Progress{}, start: time.Now(), stop: make(chan struct{})}
	l.done.Add(1)
	go l.run()
	var once sync.Once
	return l.p, func() { once.Do(func() { close(l.stop); l.done.Wait() }) }
}

func (l *progressLine) run() {
	defer l.done.Done()
	t := time.NewTicker(progressTick)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			if l.shown {
				fmt.Fprint(l.w, "\r\x1b[K") // leave the terminal as it was
			}
			return
		case now := <-t.C:
			if now.Sub(l.start) >= progressDelay {
				fmt.Fprint(l.w, "\r"+l.render(now)+"\x1b[K")
				l.shown = true
			}
		}
	}
}

// render is the line's text at time now.
func (l *progressLine) render(now time.Time) string {
	done, total := l.p.Done(), l.p.Total()
	s := l.op + ": " + human(done)
	if total > 0 {
		s += fmt.Sprintf(" of %s (%d%%)", human(total), min(100, done*100/total))
	}
	if secs := now.Sub(l.start).Seconds(); secs > 0 {
		s += fmt.Sprintf(", %s/s", human(int64(float64(done)/secs)))
	}
	return s
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
