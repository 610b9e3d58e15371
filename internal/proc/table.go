package proc

import (
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
)

// All reads the stat of every process in /proc (thread groups, not their
// other threads), keyed by PID. Processes that end while it reads are left
// out.
func All() (map[int]Stat, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	out := make(map[int]Stat, len(ents))
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, err := ReadStat(p); err == nil {
			out[p] = st
		}
	}
	return out, nil
}

// Descendants lists the roots that are in t and all their descendants in
// t, each parent before its children.
func Descendants(t map[int]Stat, roots ...int) []int {
	children := map[int][]int{}
	for p, st := range t {
		children[st.PPID] = append(children[st.PPID], p)
	}
	seen := map[int]bool{}
	var out []int
	for _, r := range roots {
		if _, ok := t[r]; ok && !seen[r] {
			seen[r] = true
			out = append(out, r)
		}
	}
	for i := 0; i < len(out); i++ {
		kids := children[out[i]]
		sort.Ints(kids)
		for _, c := range kids {
			if !seen[c] {
				seen[c] = true
				out = append(out, c)
			}
		}
	}
	return out
}

// Holder is a process that keeps a number allocated.
type Holder struct {
	ID   int    // the number
	PID  int    // the process that holds it
	Comm string // that process's name
	// How it holds it: "pid", "thread", "process group" or "session".
	How   string
	State byte // the holder's state (Z for a zombie)
}

func (h Holder) String() string {
	if h.How == "pid" {
		return fmt.Sprintf("pid %d is held by %q", h.ID, h.Comm)
	}
	if h.How == "thread" {
		return fmt.Sprintf("pid %d is a thread of pid %d (%q)", h.ID, h.PID, h.Comm)
	}
	return fmt.Sprintf("pid %d is the %s of pid %d (%q)", h.ID, h.How, h.PID, h.Comm)
}

// Holders returns a holder of each of ids that is not free. A number is
// free only when no process or thread has it as its ID and no process has
// it as its process group or session: the kernel keeps the number of a
// group or session whose leader is gone allocated while a member lives
// (even a zombie member), and a fork that asks for it then fails with
// EEXIST. ids with no holder are not in the result.
func Holders(ids []int) ([]Holder, error) {
	want := map[int]bool{}
	for _, id := range ids {
		want[id] = true
	}
	var out []Holder
	found := map[int]bool{}
	for id := range want {
		st, err := ReadStat(id)
		if err != nil {
			continue // no process or thread with that ID
		}
		how := "pid"
		if tg := tgid(id); tg != 0 && tg != id {
			how, st.PID = "thread", tg
			if ts, err := ReadStat(tg); err == nil {
				st.Comm = ts.Comm
			}
		}
		out = append(out, Holder{ID: id, PID: st.PID, Comm: st.Comm, How: how, State: st.State})
		found[id] = true
	}
	t, err := All()
	if err != nil {
		return nil, err
	}
	pids := make([]int, 0, len(t))
	for p := range t {
		pids = append(pids, p)
	}
	sort.Ints(pids)
	for _, p := range pids {
		st := t[p]
		for _, g := range []struct {
			id  int
			how string
		}{{st.PGID, "process group"}, {st.SID, "session"}} {
			if want[g.id] && !found[g.id] {
				out = append(out, Holder{ID: g.id, PID: p, Comm: st.Comm, How: g.how, State: st.State})
				found[g.id] = true
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// tgid is the thread group (process) a task ID belongs to; 0 if unknown.
func tgid(id int) int {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(id) + "/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Tgid:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	return 0
}
