// Command benchmigrate measures live migration (make bench, after the
// checkpoint bench): a job of -mib MiB that rewrites -rate of its memory a
// second is moved between two cryos on this machine, alternately with
// pre-copy rounds and by stop and copy (cryo migrate --no-precopy), and
// the downtime, the bytes sent against the job's size and the rounds are
// compared. The goal: pre-copy downtime at most 0.2x stop and copy.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

type result struct {
	Rounds     []json.RawMessage `json:"rounds"`
	JobBytes   int64             `json:"job_bytes"`
	Sent       int64             `json:"sent_bytes"`
	FinalSent  int64             `json:"final_bytes"`
	DowntimeNS int64             `json:"downtime_ns"`
	FrozenNS   int64             `json:"frozen_ns"`
	RestoreNS  int64             `json:"restore_ns"`
}

type config struct {
	cryo, criu, workload, dir string
	mib, reps                 int
	rate                      float64
	out                       string
}

func main() {
	var c config
	flag.StringVar(&c.cryo, "cryo", "bin/cryo", "cryo binary")
	flag.StringVar(&c.criu, "criu", os.Getenv("CRYO_CRIU"), "CRIU binary")
	flag.StringVar(&c.workload, "workload", "", "the dirty workload binary (required)")
	flag.StringVar(&c.dir, "dir", "", "scratch directory (required; removed)")
	flag.IntVar(&c.mib, "mib", 1024, "MiB of job memory")
	flag.IntVar(&c.reps, "reps", 3, "migrations per kind")
	flag.Float64Var(&c.rate, "rate", 0.05, "fraction of the job's memory rewritten per second")
	flag.StringVar(&c.out, "json", "", "write the results here as JSON")
	flag.Parse()
	if c.workload == "" || c.dir == "" {
		fmt.Fprintln(os.Stderr, "benchmigrate: -workload and -dir are required")
		os.Exit(2)
	}
	if err := run(c); err != nil {
		fmt.Fprintln(os.Stderr, "benchmigrate:", err)
		os.Exit(1)
	}
}

func run(c config) error {
	key := filepath.Join(c.dir, "key")
	if out, err := exec.Command(c.cryo, "keygen", key).CombinedOutput(); err != nil {
		return fmt.Errorf("keygen: %v: %s", err, out)
	}
	res := map[string][]result{}
	kinds := []string{"pre-copy", "stop-and-copy"}
	for rep := range c.reps {
		for i := range kinds {
			kind := kinds[(i+rep)%2] // alternate which goes first
			r, err := once(c, key, kind, rep)
			if err != nil {
				return fmt.Errorf("%s, rep %d: %w", kind, rep+1, err)
			}
			fmt.Printf("%-14s rep %d: downtime %7.3fs (dump %.3fs, restore there %.3fs), %d rounds, sent %s (%s while stopped) for %s\n",
				kind, rep+1, secs(r.DowntimeNS), secs(r.FrozenNS), secs(r.RestoreNS), len(r.Rounds), mib(r.Sent), mib(r.FinalSent), mib(r.JobBytes))
			res[kind] = append(res[kind], r)
		}
	}
	pre, sc := median(res["pre-copy"], down), median(res["stop-and-copy"], down)
	ratio := pre / sc
	verdict := "met"
	if ratio > 0.2 {
		verdict = "MISSED"
	}
	fmt.Printf("\nmigration of a %d MiB job rewriting %.0f%% of its memory a second (medians of %d):\n", c.mib, c.rate*100, c.reps)
	fmt.Printf("  downtime: pre-copy %.3fs, stop and copy %.3fs: %.2fx (goal <= 0.20x: %s)\n", pre, sc, ratio, verdict)
	fmt.Printf("  bytes sent / job size: pre-copy %.2fx (%.3fx while stopped), stop and copy %.2fx\n",
		median(res["pre-copy"], sentRatio), median(res["pre-copy"], finalRatio), median(res["stop-and-copy"], sentRatio))
	fmt.Printf("  pre-copy rounds: %.0f\n", median(res["pre-copy"], func(r result) float64 { return float64(len(r.Rounds)) }))
	if c.out != "" {
		b, _ := json.MarshalIndent(map[string]any{"mib": c.mib, "rate": c.rate, "results": res, "downtime_ratio": ratio}, "", " ")
		if err := os.WriteFile(c.out, b, 0o644); err != nil {
			return err
		}
	}
	return nil
}

func down(r result) float64       { return secs(r.DowntimeNS) }
func sentRatio(r result) float64  { return float64(r.Sent) / float64(r.JobBytes) }
func finalRatio(r result) float64 { return float64(r.FinalSent) / float64(r.JobBytes) }

// once migrates a fresh job once, and ends everything it started.
func once(c config, key, kind string, rep int) (result, error) {
	dir := filepath.Join(c.dir, fmt.Sprintf("%s-%d", kind, rep))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return result{}, err
	}
	defer os.RemoveAll(dir)
	port, err := freePort()
	if err != nil {
		return result{}, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	dst, err := start(c, filepath.Join(dir, "dst.log"), "run", "--store", filepath.Join(dir, "dst"), "--receive", addr, "--key", key, "--adopt-grace", "1s")
	if err != nil {
		return result{}, err
	}
	defer stop(dst)
	pages := int(c.rate * float64(c.mib) * 256 / 20) // per 50 ms step
	src, err := start(c, filepath.Join(dir, "src.log"), "run", "--store", filepath.Join(dir, "src"), "--namespaces", "on", "--stdout", filepath.Join(dir, "job.out"), "--",
		c.workload, "-mem", fmt.Sprint(c.mib), "-pages", fmt.Sprint(pages), "-delay", "50ms", "-steps", "100000000", "-every", "100000000")
	if err != nil {
		return result{}, err
	}
	defer stop(src)
	if err := waitFor(filepath.Join(dir, "job.out"), "ready", 2*time.Minute); err != nil {
		return result{}, err
	}
	time.Sleep(2 * time.Second) // the job writes at its pace
	args := []string{"migrate", "--json", "--store", filepath.Join(dir, "src"), "--to", addr, "--key", key}
	if kind == "stop-and-copy" {
		args = append(args, "--no-precopy")
	}
	cmd := exec.Command(c.cryo, args...)
	cmd.Env = append(os.Environ(), "CRYO_CRIU="+c.criu)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return result{}, fmt.Errorf("cryo migrate: %v: %s", err, errb.String())
	}
	var r result
	if err := json.Unmarshal(out.Bytes(), &r); err != nil {
		return result{}, fmt.Errorf("cryo migrate --json: %v", err)
	}
	return r, nil
}

func start(c config, logf string, args ...string) (*exec.Cmd, error) {
	f, err := os.Create(logf)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	cmd := exec.Command(c.cryo, args...)
	cmd.Env = append(os.Environ(), "CRYO_CRIU="+c.criu)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return cmd, cmd.Start()
}

// stop ends a cryo and its job (job-init dies with its supervisor).
func stop(cmd *exec.Cmd) {
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	_ = cmd.Wait()
	time.Sleep(200 * time.Millisecond) // job-init's namespace goes with it
}

func waitFor(path, s string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if b, err := os.ReadFile(path); err == nil && strings.Contains(string(b), s) {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return errors.New(path + ": no " + s)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func median(rs []result, f func(result) float64) float64 {
	v := make([]float64, 0, len(rs))
	for _, r := range rs {
		v = append(v, f(r))
	}
	slices.Sort(v)
	if len(v) == 0 {
		return 0
	}
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

func secs(ns int64) float64 { return float64(ns) / 1e9 }
func mib(n int64) string    { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }
