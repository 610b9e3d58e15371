package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cryo-hpc/cryo/migrate"
)

// Live migration between two "nodes": two network namespaces on this
// machine joined by a veth pair, each with its own cryo. The source is a
// `cryo run` in one, the destination a `cryo run --receive` in the other;
// they share the file system, as nodes share a parallel file system.

type nodePair struct {
	a, b   string // the network namespaces, as /proc/PID/ns/net paths
	dstIP  string // the destination's address, in b
	subnet int
}

var nodeSeq int

// twoNodes makes the two network namespaces, each held by a process of its
// own (not `ip netns add`, whose bind mounts under /run/netns would become
// mounts of the node that every namespaced job's checkpoint then meets),
// joined by a veth pair; they go with their holders at the end.
func twoNodes(t *testing.T) nodePair {
	t.Helper()
	nodeSeq++
	n := nodePair{subnet: (os.Getpid()+nodeSeq)%200 + 20}
	hold := func() string {
		t.Helper()
		h := exec.Command("unshare", "--net", "sleep", "1000000")
		if err := h.Start(); err != nil {
			t.Fatalf("unshare --net: %v", err)
		}
		t.Cleanup(func() { h.Process.Kill(); h.Wait() })
		ns := fmt.Sprintf("/proc/%d/ns/net", h.Process.Pid)
		// unshare has made the namespace once the holder runs sleep.
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) {
			if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", h.Process.Pid)); err == nil && strings.TrimSpace(string(b)) == "sleep" {
				return ns
			}
			time.Sleep(5 * time.Millisecond)
		}
		t.Fatal("the namespace holder did not start")
		return ""
	}
	n.a, n.b = hold(), hold()
	va, vb := fmt.Sprintf("cm%da", n.subnet), fmt.Sprintf("cm%db", n.subnet)
	n.dstIP = fmt.Sprintf("10.213.%d.2", n.subnet)
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	inNS := func(ns string, args ...string) { run(append([]string{"nsenter", "--net=" + ns}, args...)...) }
	run("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
	t.Cleanup(func() { exec.Command("ip", "link", "del", va).Run() }) // if it never moved
	run("ip", "link", "set", va, "netns", strings.TrimSuffix(strings.TrimPrefix(n.a, "/proc/"), "/ns/net"))
	run("ip", "link", "set", vb, "netns", strings.TrimSuffix(strings.TrimPrefix(n.b, "/proc/"), "/ns/net"))
	inNS(n.a, "ip", "addr", "add", fmt.Sprintf("10.213.%d.1/30", n.subnet), "dev", va)
	inNS(n.b, "ip", "addr", "add", n.dstIP+"/30", "dev", vb)
	for _, ns := range []string{n.a, n.b} {
		inNS(ns, "ip", "link", "set", "lo", "up")
	}
	inNS(n.a, "ip", "link", "set", va, "up")
	inNS(n.b, "ip", "link", "set", vb, "up")
	return n
}

// in makes a cryo command run in network namespace ns.
func in(ns string) func(*exec.Cmd) {
	return func(c *exec.Cmd) {
		nsenter, _ := exec.LookPath("nsenter")
		c.Args = append([]string{"nsenter", "--net=" + ns, c.Path}, c.Args[1:]...)
		c.Path = nsenter
	}
}

// dirtyReference is the result of an uninterrupted run of the dirty
// workload with these arguments (its result does not depend on time).
func dirtyReference(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(bin("dirty"), append(args, "-delay", "0")...).Output()
	if err != nil {
		t.Fatalf("reference run: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return lines[len(lines)-1]
}

// checkDirtyOutput checks that a job's output shows every step line once,
// in order, and ends with the reference result.
func checkDirtyOutput(t *testing.T, path string, steps, every int, want string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if strings.HasPrefix(l, "step ") || strings.HasPrefix(l, "result ") {
			got = append(got, l)
		}
	}
	var expect []string
	for s := every; s <= steps; s += every {
		expect = append(expect, fmt.Sprintf("step %d", s))
	}
	expect = append(expect, want)
	if strings.Join(got, "\n") != strings.Join(expect, "\n") {
		t.Fatalf("the job's output is not what an uninterrupted run prints once:\n got: %s\nwant: ...step %d, %s", stepLines(got), steps, want)
	}
}

func stepLines(ls []string) string {
	if len(ls) > 8 {
		return strings.Join(ls[:3], ", ") + fmt.Sprintf(" ... (%d lines) ... ", len(ls)) + strings.Join(ls[len(ls)-3:], ", ")
	}
	return strings.Join(ls, ", ")
}

// waitForLine waits until the file at path holds a line equal to line.
func waitForLine(t *testing.T, path, line string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if b, err := os.ReadFile(path); err == nil && regexp.MustCompile(`(?m)^`+regexp.QuoteMeta(line)+`$`).Match(b) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s: no %q after %v", path, line, timeout)
}

// workloadProcs lists the live processes running the dirty workload with
// the given marker argument (a step count unique to the test).
func workloadProcs(marker string) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || procState(pid) == 'Z' {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if len(args) > 0 && filepath.Base(args[0]) == "dirty" && strings.Contains(string(b), "\x00-steps\x00"+marker+"\x00") {
			out = append(out, pid)
		}
	}
	return out
}

type migration struct {
	nodes    nodePair
	key      string
	port     int
	src, dst *runJob
	srcStore string
	args     []string
	steps    int
}

// startMigration starts the destination, then the job at the source.
func startMigration(t *testing.T, criu string, dstEnv []string, grace string, args ...string) *migration {
	t.Helper()
	m := &migration{nodes: twoNodes(t), port: freePort(t), args: args}
	for i, a := range args {
		if a == "-steps" {
			m.steps, _ = strconv.Atoi(args[i+1])
		}
	}
	dir := t.TempDir()
	m.key = filepath.Join(dir, "key")
	if r := cryo(t, "", "keygen", m.key); r.code != 0 {
		t.Fatalf("keygen: %s", r)
	}
	m.srcStore = filepath.Join(dir, "src")
	m.dst = startRunPrep(t, criu, false, func(c *exec.Cmd) {
		c.Env = append(c.Env, dstEnv...)
		in(m.nodes.b)(c)
	}, "--store", filepath.Join(dir, "dst"), "--receive", fmt.Sprintf("%s:%d", m.nodes.dstIP, m.port), "--key", m.key, "--adopt-grace", grace)
	m.dst.waitFor(t, "waiting for a job", 10*time.Second)
	// cryo's stdout is a pipe: the job writes STORE/run/host.out, which
	// the source's cryo shows until the job stops for good there, and the
	// destination's from where the job goes on.
	m.src = startRunPrep(t, criu, true, in(m.nodes.a),
		append([]string{"--store", m.srcStore, "--namespaces", "on", "--", bin("dirty")}, args...)...)
	return m
}

// hostOut is the job's own output file.
func (m *migration) hostOut() string { return filepath.Join(m.srcStore, "run", "host.out") }

// migrate runs cryo migrate (outside both namespaces: it talks to the
// source's control socket).
func (m *migration) migrate(t *testing.T, criu string, extra ...string) (cryoResult, *migrate.Result) {
	t.Helper()
	r := cryo(t, criu, append([]string{"migrate", "--json", "--store", m.srcStore, "--to", fmt.Sprintf("%s:%d", m.nodes.dstIP, m.port), "--key", m.key}, extra...)...)
	if r.code != 0 {
		return r, nil
	}
	var res migrate.Result
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
		t.Fatalf("cryo migrate --json: %v\n%s", err, r.stdout)
	}
	return r, &res
}

// TestMigrate moves a 1 GiB job that rewrites 5% of its memory a second
// to another node while it runs: it finishes there with the result of an
// uninterrupted run, its output printed once, and nothing of it is left at
// the source.
func TestMigrate(t *testing.T) {
	criu := requireCRIU(t)
	args := []string{"-mem", "1024", "-pages", "655", "-delay", "50ms", "-steps", "360", "-every", "10"}
	want := dirtyReference(t, args...)
	m := startMigration(t, criu, nil, "2s", args...)
	waitForLine(t, m.hostOut(), "step 40", time.Minute)
	r, res := m.migrate(t, criu)
	if r.code != 0 {
		t.Fatalf("cryo migrate: %s\nsource: %s\ndestination: %s", r, m.src.messages(t), m.dst.messages(t))
	}
	t.Logf("migrated: %d rounds, downtime %v (dump %v, restore there %v), %d MiB sent for %d MiB of memory, %d pages while stopped (%d known)",
		len(res.Rounds), res.Downtime, res.Frozen, res.Restore, res.Sent>>20, res.JobBytes>>20, res.FinalPages, res.FinalKnown)
	for _, rd := range res.Rounds {
		t.Logf("  round %d: %d pages read, %d sent, %v", rd.N, rd.Pages, rd.Changed, rd.Took)
	}
	if len(res.Rounds) < 2 || res.JobBytes < 1<<30 || res.FinalKnown == 0 {
		t.Errorf("want pre-copy rounds over the whole 1 GiB and pages the destination already had at the stop; got %+v", res)
	}
	// The pre-copy rounds carried nearly all of it: the stopped job sent
	// far less than its memory.
	if res.FinalPages*4096 > res.JobBytes/4 {
		t.Errorf("%d pages sent while stopped, a quarter of the job or more", res.FinalPages)
	}
	if code := m.src.wait(t, 30*time.Second); code != 0 || !strings.Contains(m.src.messages(t), "migrated: to ") {
		t.Fatalf("the source cryo ended with %d:\n%s", code, m.src.messages(t))
	}
	if code := m.dst.wait(t, 2*time.Minute); code != 0 {
		t.Fatalf("the destination ended with %d:\n%s", code, m.dst.messages(t))
	}
	checkDirtyOutput(t, m.hostOut(), 360, 10, want)
	// What the two cryos showed is the job's output once: the source's up
	// to the stop, the destination's from there.
	shown := filepath.Join(t.TempDir(), "shown")
	a, _ := os.ReadFile(m.src.out)
	b, _ := os.ReadFile(m.dst.out)
	if err := os.WriteFile(shown, append(a, b...), 0o600); err != nil {
		t.Fatal(err)
	}
	checkDirtyOutput(t, shown, 360, 10, want)
	if msgs := m.dst.messages(t); !strings.Contains(msgs, "adopted: the source let the job go") || !strings.Contains(msgs, "completed") {
		t.Errorf("the destination did not run the job to its end:\n%s", msgs)
	}
}

// TestMigrateRollback kills the destination at each phase of a migration,
// and kills the job at the destination during its grace period: each time
// the job carries on at the source and finishes with the right result, its
// output printed once, and nothing runs at the destination.
func TestMigrateRollback(t *testing.T) {
	criu := requireCRIU(t)
	for i, tc := range []struct {
		name, crash string
		killJob     bool // kill the job at the destination once it runs there
	}{
		{name: "destination dies during the rounds", crash: "migrate-round"},
		{name: "destination dies with every image received", crash: "migrate-final"},
		{name: "destination dies once the job runs there", crash: "migrate-restored"},
		{name: "job dies at the destination in its grace period", killJob: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			steps := 240 + i // a marker of this subtest's processes
			args := []string{"-mem", "64", "-pages", "50", "-delay", "25ms", "-steps", strconv.Itoa(steps), "-every", "1"}
			want := dirtyReference(t, args...)
			var env []string
			if tc.crash != "" {
				env = []string{migrate.CrashEnv + "=" + tc.crash}
			}
			m := startMigration(t, criu, env, "3s", args...)
			waitForLine(t, m.hostOut(), "step 20", time.Minute)
			if tc.killJob {
				// Kill the job there as soon as it runs, while cryo
				// migrate waits for its grace period.
				go func() {
					re := regexp.MustCompile(`restored: the job migrated here, job-init pid (\d+)`)
					for range 400 {
						if sm := re.FindStringSubmatch(m.dst.messages(t)); sm != nil {
							pid, _ := strconv.Atoi(sm[1])
							killTree(pid)
							return
						}
						time.Sleep(25 * time.Millisecond)
					}
				}()
			}
			r, _ := m.migrate(t, criu)
			if r.code != 1 || !strings.Contains(r.stderr, "the job continues here") {
				t.Fatalf("cryo migrate: want exit 1 saying the job continues here, got %s\ndestination: %s", r, m.dst.messages(t))
			}
			if code := m.src.wait(t, time.Minute); code != 0 {
				t.Fatalf("the source ended with %d:\n%s", code, m.src.messages(t))
			}
			checkDirtyOutput(t, m.hostOut(), steps, 1, want)
			checkDirtyOutput(t, m.src.out, steps, 1, want) // what the source's cryo showed
			if !strings.Contains(m.src.messages(t), "migrate-failed") {
				t.Errorf("the source did not report the failed migration:\n%s", m.src.messages(t))
			}
			if left := workloadProcs(strconv.Itoa(steps)); len(left) > 0 {
				t.Errorf("processes of the job still run after it finished: %v", left)
			}
			if tc.killJob {
				if code := m.dst.wait(t, 30*time.Second); code != 1 || !strings.Contains(m.dst.messages(t), "goes back to its source") {
					t.Errorf("the destination: want exit 1 saying the job goes back, got %d:\n%s", code, m.dst.messages(t))
				}
			}
		})
	}
}

// TestStandby keeps a standby node up to date with a job's checkpoints;
// when the job's node dies (its cryo killed, the job with it), the standby
// resumes the job from the last checkpoint it received, and the job ends
// with the result of an uninterrupted run, its output printed once. A job
// that ends at its source leaves the standby with nothing to do.
func TestStandby(t *testing.T) {
	criu := requireCRIU(t)
	for _, nodeDies := range []bool{true, false} {
		name := "source node dies"
		if !nodeDies {
			name = "job ends at its source"
		}
		t.Run(name, func(t *testing.T) {
			steps := 300
			if !nodeDies {
				steps = 81
			}
			args := []string{"-mem", "128", "-pages", "100", "-delay", "25ms", "-steps", strconv.Itoa(steps), "-every", "1"}
			want := dirtyReference(t, args...)
			n := twoNodes(t)
			dir := t.TempDir()
			key := filepath.Join(dir, "key")
			if r := cryo(t, "", "keygen", key); r.code != 0 {
				t.Fatalf("keygen: %s", r)
			}
			port := freePort(t)
			addr := fmt.Sprintf("%s:%d", n.dstIP, port)
			dst := startRunPrep(t, criu, false, in(n.b), "--store", filepath.Join(dir, "dst"), "--receive", addr, "--key", key)
			dst.waitFor(t, "waiting for a job", 10*time.Second)
			src := startRunPrep(t, criu, false, in(n.a), append([]string{"--store", filepath.Join(dir, "src"), "--namespaces", "on",
				"--interval", "1s", "--standby", addr, "--key", key, "--", bin("dirty")}, args...)...)
			if !nodeDies {
				if code := src.wait(t, time.Minute); code != 0 {
					t.Fatalf("the source ended with %d:\n%s", code, src.messages(t))
				}
				if code := dst.wait(t, 30*time.Second); code != 0 || !strings.Contains(dst.messages(t), "nothing to take over") {
					t.Fatalf("the standby: want exit 0 with nothing to take over, got %d:\n%s", code, dst.messages(t))
				}
				checkDirtyOutput(t, src.out, steps, 1, want)
				return
			}
			// Two generations reach the standby, the second as a delta.
			deadline := time.Now().Add(time.Minute)
			for time.Now().Before(deadline) && strings.Count(src.messages(t), "standby: generation") < 2 {
				time.Sleep(100 * time.Millisecond)
			}
			msgs := src.messages(t)
			if strings.Count(msgs, "standby: generation") < 2 {
				t.Fatalf("no two generations reached the standby:\n%s", msgs)
			}
			t.Logf("source: %s", msgs)
			// The node dies: its cryo is killed, and the job with it
			// (job-init dies with its supervisor).
			syscall.Kill(src.cmd.Process.Pid, syscall.SIGKILL)
			src.wait(t, 30*time.Second)
			if code := dst.wait(t, 2*time.Minute); code != 0 {
				t.Fatalf("the standby ended with %d:\n%s", code, dst.messages(t))
			}
			if m := dst.messages(t); !strings.Contains(m, "taking the job over from generation") || !strings.Contains(m, "completed") {
				t.Fatalf("the standby did not take the job over to its end:\n%s", m)
			}
			checkDirtyOutput(t, src.out, steps, 1, want)
		})
	}
}

// TestMigrateToStandby moves a job to its standby, which holds its
// checkpoints: the first pre-copy round sends only what changed since the
// newest of them, and the job finishes there with the right result.
func TestMigrateToStandby(t *testing.T) {
	criu := requireCRIU(t)
	args := []string{"-mem", "256", "-pages", "20", "-delay", "25ms", "-steps", "400", "-every", "1"}
	want := dirtyReference(t, args...)
	n := twoNodes(t)
	dir := t.TempDir()
	key := filepath.Join(dir, "key")
	if r := cryo(t, "", "keygen", key); r.code != 0 {
		t.Fatalf("keygen: %s", r)
	}
	addr := fmt.Sprintf("%s:%d", n.dstIP, freePort(t))
	dst := startRunPrep(t, criu, false, in(n.b), "--store", filepath.Join(dir, "dst"), "--receive", addr, "--key", key, "--adopt-grace", "1s")
	dst.waitFor(t, "waiting for a job", 10*time.Second)
	srcStore := filepath.Join(dir, "src")
	src := startRunPrep(t, criu, false, in(n.a), append([]string{"--store", srcStore, "--namespaces", "on",
		"--interval", "2s", "--standby", addr, "--key", key, "--", bin("dirty")}, args...)...)
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) && !strings.Contains(src.messages(t), "standby: generation") {
		time.Sleep(100 * time.Millisecond)
	}
	r := cryo(t, criu, "migrate", "--json", "--store", srcStore, "--to", addr, "--key", key)
	if r.code != 0 {
		t.Fatalf("cryo migrate: %s\nsource: %s\ndestination: %s", r, src.messages(t), dst.messages(t))
	}
	var res migrate.Result
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
		t.Fatal(err)
	}
	t.Logf("base generation %d (%d pages not sent); rounds %+v; %d MiB sent for %d MiB", res.Base, res.BasePages, res.Rounds, res.Sent>>20, res.JobBytes>>20)
	if res.Base == 0 || res.BasePages == 0 || len(res.Rounds) == 0 || res.Rounds[0].Changed*4 > res.Rounds[0].Pages {
		t.Errorf("the first round did not start from the standby's checkpoint: %+v", res)
	}
	if res.Sent > res.JobBytes/2 {
		t.Errorf("%d bytes sent for a job of %d, most of which the standby had", res.Sent, res.JobBytes)
	}
	if code := src.wait(t, 30*time.Second); code != 0 {
		t.Fatalf("the source ended with %d:\n%s", code, src.messages(t))
	}
	if code := dst.wait(t, 2*time.Minute); code != 0 {
		t.Fatalf("the destination ended with %d:\n%s", code, dst.messages(t))
	}
	checkDirtyOutput(t, src.out, 400, 1, want)
}
