package offload

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// JournalVersion is the format of journal entries this cryo writes.
const JournalVersion = 1

// journalExt ends the name of every journal file.
const journalExt = ".jsonl"

// A journal is the intent log of one cryo operation that changes offload
// state. It is a file of JSON lines in the store's journal directory
// (<store>/staging/journal/<op>-<unix nanos>-<cryo pid>.jsonl), written
// before each change and fsynced after each line, and held under an
// exclusive flock by its writer for as long as the writer lives. Entries:
//
//	{"v":1,"at":T,"event":"begin","op":"checkpoint","cryo_pid":N,"job":{"root_pid":N,"procs":[{"pid":N,"start_time":N}]}}
//	{"v":1,"at":T,"event":"context","context":{"kind":"cuda","pid":N,"start_time":N,"devices":[...],"initial":"running"}}
//	{"v":1,"at":T,"event":"intent","kind":"cuda","pid":N,"action":"lock"}       before a change
//	{"v":1,"at":T,"event":"done","kind":"cuda","pid":N,"action":"lock","state":"locked"}
//	{"v":1,"at":T,"event":"failed","kind":"cuda","pid":N,"action":"lock","err":"..."}
//	{"v":1,"at":T,"event":"stopped"}      the job's processes may be left stopped (CRIU leave-stopped)
//	{"v":1,"at":T,"event":"continued"}    they run again
//	{"v":1,"at":T,"event":"end"}          the operation finished; the file is then removed
//
// A restore's begin entry carries the device map ("map":{"GPU-old":"GPU-new"}),
// and its context entries are written twice: before CRIU restores the job
// (start_time 0: not yet known) and after. A torn last line (cryo killed
// mid-write) is ignored. A journal whose writer is gone (its flock is free)
// and that has no end entry belongs to a cryo that was killed half-way:
// Recover puts its contexts back to their initial state.
type Journal struct {
	mu   sync.Mutex // entries come from parallel steps
	f    *os.File
	path string
}

// JobRef names the processes of a job in a journal.
type JobRef struct {
	RootPID int       `json:"root_pid"`
	Procs   []ProcRef `json:"procs,omitempty"`
}

// ProcRef is a process named by PID and start time.
type ProcRef struct {
	PID       int    `json:"pid"`
	StartTime uint64 `json:"start_time"`
}

// Entry is one line of a journal.
type Entry struct {
	V       int       `json:"v"`
	At      time.Time `json:"at"`
	Event   string    `json:"event"`
	Op      string    `json:"op,omitempty"`
	CryoPID int       `json:"cryo_pid,omitempty"`
	Job     *JobRef   `json:"job,omitempty"`
	Context *Record   `json:"context,omitempty"`
	Kind    string    `json:"kind,omitempty"`
	PID     int       `json:"pid,omitempty"`
	Action  string    `json:"action,omitempty"`
	State   *State    `json:"state,omitempty"`
	Map     DeviceMap `json:"map,omitempty"`
	Err     string    `json:"err,omitempty"`
}

// OpenJournal creates a journal for operation op ("checkpoint", "restore")
// in dir and writes its begin entry. The caller must Close it when the
// operation is over, whatever its outcome.
func OpenJournal(dir, op string, job JobRef, m DeviceMap) (*Journal, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("offload journal: %w", err)
	}
	name := fmt.Sprintf("%s-%d-%d%s", op, time.Now().UnixNano(), os.Getpid(), journalExt)
	path := filepath.Join(dir, name)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("offload journal: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("offload journal %s: lock: %w", path, err)
	}
	j := &Journal{f: f, path: path}
	if err := j.append(Entry{Event: "begin", Op: op, CryoPID: os.Getpid(), Job: &job, Map: m}); err != nil {
		j.f.Close()
		os.Remove(path)
		return nil, err
	}
	if err := syncDir(dir); err != nil {
		j.f.Close()
		os.Remove(path)
		return nil, err
	}
	return j, nil
}

// Path is the journal's file.
func (j *Journal) Path() string {
	if j == nil {
		return ""
	}
	return j.path
}

func (j *Journal) append(e Entry) error {
	if j == nil {
		return nil
	}
	e.V, e.At = JournalVersion, time.Now().UTC()
	b, err := json.Marshal(e)
	if err != nil {
		return err
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if _, err := j.f.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("offload journal %s: %w", j.path, err)
	}
	if err := j.f.Sync(); err != nil {
		return fmt.Errorf("offload journal %s: %w", j.path, err)
	}
	return nil
}

// Note appends an entry without a context ("stopped", "continued").
func (j *Journal) Note(event string) error { return j.append(Entry{Event: event}) }

// Close writes the end entry and removes the journal: the operation is over
// and nothing is left to recover.
func (j *Journal) Close() error {
	if j == nil {
		return nil
	}
	err := j.append(Entry{Event: "end"})
	if rerr := os.Remove(j.path); rerr != nil && err == nil {
		err = rerr
	}
	return errors.Join(err, j.f.Close())
}

// Abandon closes the journal but keeps it for recovery (the caller could
// not bring every context back).
func (j *Journal) Abandon() error {
	if j == nil {
		return nil
	}
	return j.f.Close()
}

// journalState is what a journal says, read back for recovery.
type journalState struct {
	Op         string
	Job        JobRef
	Map        DeviceMap
	Contexts   []Record // the last context entry of each (kind, pid), in order of first appearance
	Stopped    bool     // the job may have been left stopped
	Ended      bool
	LastIntent map[string]string // kind/pid -> an action begun and not finished
}

// readJournal parses a journal, ignoring a torn last line.
func readJournal(b []byte) (journalState, error) {
	js := journalState{LastIntent: map[string]string{}}
	idx := map[string]int{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	lines := 0
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		var e Entry
		if err := json.Unmarshal(line, &e); err != nil {
			continue // a torn write: everything before it is intact
		}
		lines++
		if e.V > JournalVersion {
			return js, fmt.Errorf("journal entry version %d is newer than this cryo's %d", e.V, JournalVersion)
		}
		switch e.Event {
		case "begin":
			js.Op = e.Op
			if e.Job != nil {
				js.Job = *e.Job
			}
			js.Map = e.Map
		case "context":
			if e.Context == nil {
				continue
			}
			key := fmt.Sprintf("%s/%d", e.Context.Kind, e.Context.PID)
			if i, ok := idx[key]; ok {
				js.Contexts[i] = *e.Context
			} else {
				idx[key] = len(js.Contexts)
				js.Contexts = append(js.Contexts, *e.Context)
			}
		case "intent":
			js.LastIntent[fmt.Sprintf("%s/%d", e.Kind, e.PID)] = e.Action
		case "done", "failed":
			delete(js.LastIntent, fmt.Sprintf("%s/%d", e.Kind, e.PID))
		case "stopped":
			js.Stopped = true
		case "continued":
			js.Stopped = false
		case "end":
			js.Ended = true
		}
	}
	if lines == 0 {
		return js, errors.New("journal is empty")
	}
	return js, nil
}

// journalFiles lists the journals in dir, oldest first.
func journalFiles(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		if !e.IsDir() && strings.HasSuffix(e.Name(), journalExt) {
			out = append(out, filepath.Join(dir, e.Name()))
		}
	}
	sort.Strings(out)
	return out, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}
