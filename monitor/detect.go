package monitor

import (
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/cryo-hpc/cryo/internal/proc"
)

// detect runs the slow failure detectors (about once a second) and returns
// the first failure found.
func (s *Supervisor) detect() failure {
	if s.pending.kind != "" {
		f := s.pending
		s.pending = failure{}
		return f
	}
	trees := s.treePIDs()
	if s.cfg.ChannelGrace > 0 {
		if d, onset := s.chans.check(trees, s.alive); d != "" {
			return failure{kind: kindChannel, detail: d, onset: onset}
		}
	}
	if s.cfg.HeartbeatTimeout > 0 {
		s.beat.look(time.Now())
		// The timeout runs from when the beat was last seen to change (or
		// the job's start), stopped while a checkpoint held the job
		// still; the failure may have begun right after the look before.
		if age := s.quietFor(s.beat.seen); age > s.cfg.HeartbeatTimeout {
			return failure{kind: kindBeat, onset: s.beat.well,
				detail: fmt.Sprintf("no heartbeat from the job for %s (timeout %s)", time.Since(s.beat.seen).Round(time.Second), s.cfg.HeartbeatTimeout)}
		}
	}
	if s.cfg.HangTimeout > 0 {
		if d, tree, onset := s.checkHang(trees); d != "" {
			return failure{kind: kindHang, tree: tree, detail: d, onset: onset}
		}
	}
	if s.cfg.Health != nil {
		var all []int
		for _, ps := range trees {
			all = append(all, ps...)
		}
		if errs := s.cfg.Health.Critical(all); len(errs) > 0 {
			return failure{kind: kindGPU, detail: strings.Join(errs, "; "), onset: time.Now().Add(-time.Second)}
		}
	}
	s.watchMemory(trees)
	return failure{}
}

func (s *Supervisor) alive(pid int) bool { return proc.Live(pid) }

// treePIDs lists the processes of each tree of the job, from one reading
// of /proc, and remembers every process of the job it sees (and its
// session), so that the job can be ended whole even after job-init is
// gone (see endJob).
func (s *Supervisor) treePIDs() map[string][]int {
	out := map[string][]int{}
	t, err := proc.All()
	if err != nil {
		return out
	}
	for _, p := range proc.Descendants(t, s.initPID) {
		st := t[p]
		s.seen[p] = st.StartTime
		s.sessions[st.SID] = true
	}
	for root, name := range s.roots {
		if ps := proc.Descendants(t, root); len(ps) > 0 {
			out[name] = ps
		}
	}
	return out
}

// beatWatch follows the job's heartbeat file by the supervisor's own
// clock: only whether its modification time changed is read, never the
// time itself (on a shared file system that is the file server's clock).
type beatWatch struct {
	path  string
	mtime time.Time // the file's modification time at the last look
	last  time.Time // the last look
	seen  time.Time // when a look first saw the current mtime (or the start)
	well  time.Time // the look before that: the beat came after it
}

func (b *beatWatch) reset(path string, now time.Time) {
	*b = beatWatch{path: path, last: now, seen: now, well: now}
	if st, err := os.Stat(path); err == nil {
		b.mtime = st.ModTime()
	}
}

// look reads the file; a changed modification time is a beat.
func (b *beatWatch) look(now time.Time) {
	if st, err := os.Stat(b.path); err == nil && !st.ModTime().Equal(b.mtime) {
		b.mtime = st.ModTime()
		b.well, b.seen = b.last, now
	}
	b.last = now
}

type hangMark struct {
	pids     []int
	ticks    uint64
	since    time.Time // first sample that saw these ticks
	progress time.Time // the sample before: the tree ran after it
	sampled  time.Time // latest sample
}

func cpuTicks(pids []int) uint64 {
	var ticks uint64
	for _, p := range pids {
		if st, err := proc.ReadStat(p); err == nil {
			ticks += st.CPUTicks
		}
	}
	return ticks
}

// rebaseHang takes the CPU time a checkpoint spent inside the job (CRIU's
// parasite code runs in every task it dumps) out of the hang marks: it is
// not the job's progress, and counting it would date a hang after a
// checkpoint of the hung tree, which a recovery would then restore.
func (s *Supervisor) rebaseHang() {
	for name, m := range s.hang {
		m.ticks = cpuTicks(m.pids)
		s.hang[name] = m
	}
}

// sampleHang records the CPU time each offload tree has used so far.
func (s *Supervisor) sampleHang(trees map[string][]int) {
	for name, pids := range trees {
		if s.isHost(name) {
			continue
		}
		ticks := cpuTicks(pids)
		now := time.Now()
		m, ok := s.hang[name]
		if !ok || m.ticks != ticks {
			// The progress happened since the previous sample: that is
			// the earliest the tree can have stopped.
			prev := m.sampled
			if !ok {
				prev = now
			}
			s.hang[name] = hangMark{pids: pids, ticks: ticks, since: now, progress: prev, sampled: now}
			continue
		}
		m.pids, m.sampled = pids, now
		s.hang[name] = m
	}
}

// checkHang reports an offload tree that used no CPU for HangTimeout, and
// when it last did.
func (s *Supervisor) checkHang(trees map[string][]int) (string, string, time.Time) {
	s.sampleHang(trees)
	names := make([]string, 0, len(trees))
	for name := range trees {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		m, ok := s.hang[name]
		if !ok {
			continue // the host tree
		}
		if idle := s.quietFor(m.since); idle > s.cfg.HangTimeout {
			return fmt.Sprintf("offload tree %s made no CPU progress for %s (timeout %s)", name, time.Since(m.since).Round(time.Second), s.cfg.HangTimeout), name, m.progress
		}
	}
	return "", "", time.Time{}
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// memWatch samples the job's resident memory and warns of steady growth.
type memWatch struct {
	ts     []time.Time
	vs     []float64
	last   time.Time
	warned time.Time
}

const memSamples = 12

func (s *Supervisor) watchMemory(trees map[string][]int) {
	w := &s.mem
	if time.Since(w.last) < 5*time.Second {
		return
	}
	w.last = time.Now()
	var rss int64
	for _, pids := range trees {
		for _, p := range pids {
			r, _ := proc.RSS(p)
			rss += r
		}
	}
	w.ts = append(w.ts, time.Now())
	w.vs = append(w.vs, float64(rss))
	if len(w.ts) > memSamples {
		w.ts, w.vs = w.ts[1:], w.vs[1:]
	}
	if len(w.ts) < memSamples/2 {
		return
	}
	slope, r2 := growth(w.ts, w.vs)
	s.cfg.Metrics.MemoryGrowth(s.cfg.Name, slope)
	// Steady (a good linear fit) and material (>1 MiB/s or >2%/min).
	if r2 > 0.9 && slope > 0 && (slope > 1<<20 || slope*60 > 0.02*float64(rss)) && time.Since(w.warned) > 10*time.Minute {
		w.warned = time.Now()
		s.event("warning", fmt.Sprintf("memory grows steadily: %.1f MiB/min (now %.1f MiB, fit R²=%.2f); a leak?", slope*60/(1<<20), float64(rss)/(1<<20), r2), 0)
	}
}

// channelWatch tracks the connections between different trees of a job and
// reports one that broke while both of its ends are alive.
type channelWatch struct {
	grace  time.Duration
	known  map[string]*channel
	broken map[string]time.Time
	well   map[string]time.Time // last time each channel was seen intact
}

type channel struct {
	a, b         uint64 // socket inodes
	pa, pb       int    // owning pids
	treeA, treeB string
	kind         string
}

func newChannelWatch(grace time.Duration) *channelWatch {
	return &channelWatch{grace: grace, known: map[string]*channel{}, broken: map[string]time.Time{}, well: map[string]time.Time{}}
}

func (c *channel) String() string {
	return fmt.Sprintf("%s channel between %s (pid %d) and %s (pid %d)", c.kind, c.treeA, c.pa, c.treeB, c.pb)
}

func (w *channelWatch) check(trees map[string][]int, alive func(int) bool) (string, time.Time) {
	owner := map[int]string{}
	var all []int
	for name, pids := range trees {
		for _, p := range pids {
			owner[p] = name
			all = append(all, p)
		}
	}
	inos := socketInodes(all)
	us, err := unixSockets(inos)
	if err != nil {
		us = map[uint64]sockInfo{}
	}
	ts := tcpSockets(inos)

	// Discover new channels: connected pairs whose ends are in different trees.
	for ino, si := range us {
		if si.peer == 0 || si.state != 1 {
			continue
		}
		pa, pb := inos[ino], inos[si.peer]
		if pb == 0 || owner[pa] == owner[pb] {
			continue
		}
		a, b := ino, si.peer
		if a > b {
			a, b, pa, pb = b, a, pb, pa
		}
		key := fmt.Sprintf("unix:%d:%d", a, b)
		if _, ok := w.known[key]; !ok {
			w.known[key] = &channel{a: a, b: b, pa: pa, pb: pb, treeA: owner[pa], treeB: owner[pb], kind: "unix"}
		}
	}
	byAddr := map[string]uint64{}
	for ino, si := range ts {
		byAddr[si.local+">"+si.remote] = ino
	}
	for ino, si := range ts {
		if si.state != tcpEstablished {
			continue
		}
		peer, ok := byAddr[si.remote+">"+si.local]
		if !ok {
			continue
		}
		pa, pb := inos[ino], inos[peer]
		if owner[pa] == owner[pb] {
			continue
		}
		a, b := ino, peer
		if a > b {
			a, b, pa, pb = b, a, pb, pa
		}
		key := fmt.Sprintf("tcp:%d:%d", a, b)
		if _, ok := w.known[key]; !ok {
			w.known[key] = &channel{a: a, b: b, pa: pa, pb: pb, treeA: owner[pa], treeB: owner[pb], kind: "tcp"}
		}
	}

	// Check the known ones.
	keys := make([]string, 0, len(w.known))
	for k := range w.known {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, key := range keys {
		ch := w.known[key]
		if !alive(ch.pa) || !alive(ch.pb) {
			// A process died: the tree-exit detector owns that.
			delete(w.known, key)
			delete(w.broken, key)
			continue
		}
		why := ""
		for _, end := range []struct {
			ino uint64
			pid int
		}{{ch.a, ch.pa}, {ch.b, ch.pb}} {
			if _, held := inos[end.ino]; !held {
				why = fmt.Sprintf("pid %d closed its end", end.pid)
				break
			}
			if ch.kind == "unix" {
				if si, ok := us[end.ino]; ok && si.shutdown != 0 {
					why = fmt.Sprintf("pid %d's end is shut down", end.pid)
					break
				}
			} else {
				si, ok := ts[end.ino]
				if !ok {
					why = fmt.Sprintf("pid %d's connection was reset", end.pid)
					break
				}
				if si.state != tcpEstablished {
					why = fmt.Sprintf("pid %d's connection is %s", end.pid, tcpStates[si.state])
					break
				}
			}
		}
		if why == "" {
			delete(w.broken, key)
			w.well[key] = time.Now()
			continue
		}
		first, seen := w.broken[key]
		if !seen {
			w.broken[key] = time.Now()
			continue
		}
		if time.Since(first) >= w.grace {
			delete(w.known, key)
			delete(w.broken, key)
			onset, ok := w.well[key]
			if !ok {
				onset = first
			}
			return fmt.Sprintf("%s broke: %s", ch, why), onset
		}
	}
	return "", time.Time{}
}
