package monitor

import (
	"fmt"
	"io"
	"net/http"
	"sort"
	"sync"
	"time"
)

// Metrics counts what the monitor does, for Prometheus (WriteTo renders the
// text exposition format). The zero value is ready to use; a nil *Metrics
// records nothing.
type Metrics struct {
	mu               sync.Mutex
	checkpoints      map[string]float64 // by job
	checkpointFailed map[string]float64
	durationSum      map[string]float64
	frozenSum        map[string]float64
	bytesRaw         map[string]float64
	bytesNew         map[string]float64
	restores         map[string]float64
	restoreFailed    map[string]float64
	failures         map[[2]string]float64 // (job, kind)
	memGrowth        map[string]float64
	interval         map[string]float64
}

func (m *Metrics) add(mp *map[string]float64, job string, v float64) {
	if m == nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if *mp == nil {
		*mp = map[string]float64{}
	}
	(*mp)[job] += v
}

func (m *Metrics) set(mp *map[string]float64, job string, v float64) {
	if m == nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if *mp == nil {
		*mp = map[string]float64{}
	}
	(*mp)[job] = v
}

// Checkpoint records a successful checkpoint.
func (m *Metrics) Checkpoint(job string, took, frozen time.Duration, raw, fresh int64) {
	if m == nil {
		return
	}
	m.add(&m.checkpoints, job, 1)
	m.add(&m.durationSum, job, took.Seconds())
	m.add(&m.frozenSum, job, frozen.Seconds())
	m.add(&m.bytesRaw, job, float64(raw))
	m.add(&m.bytesNew, job, float64(fresh))
}

// CheckpointFailed records a failed checkpoint.
func (m *Metrics) CheckpointFailed(job string) {
	if m != nil {
		m.add(&m.checkpointFailed, job, 1)
	}
}

// Restore records a restore attempt.
func (m *Metrics) Restore(job string, ok bool) {
	if m == nil {
		return
	}
	if ok {
		m.add(&m.restores, job, 1)
	} else {
		m.add(&m.restoreFailed, job, 1)
	}
}

// Failure records a detected failure of a kind.
func (m *Metrics) Failure(job, kind string) {
	if m == nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.failures == nil {
		m.failures = map[[2]string]float64{}
	}
	m.failures[[2]string{job, kind}]++
}

// MemoryGrowth records the job's memory growth rate in bytes per second.
func (m *Metrics) MemoryGrowth(job string, bps float64) {
	if m != nil {
		m.set(&m.memGrowth, job, bps)
	}
}

// Interval records the checkpoint interval in force.
func (m *Metrics) Interval(job string, d time.Duration) {
	if m != nil {
		m.set(&m.interval, job, d.Seconds())
	}
}

// WriteTo renders the metrics in Prometheus' text format.
func (m *Metrics) WriteTo(w io.Writer) (int64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var n int64
	p := func(format string, a ...any) {
		k, _ := fmt.Fprintf(w, format, a...)
		n += int64(k)
	}
	series := func(name, typ, help string, mp map[string]float64) {
		p("# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
		for _, job := range sortedKeys(mp) {
			p("%s{job=%q} %g\n", name, job, mp[job])
		}
	}
	series("cryo_checkpoints_total", "counter", "Checkpoints committed.", m.checkpoints)
	series("cryo_checkpoint_failures_total", "counter", "Checkpoints that failed (the job was left running).", m.checkpointFailed)
	series("cryo_checkpoint_duration_seconds_sum", "counter", "Time from checkpoint start until durable, summed.", m.durationSum)
	series("cryo_checkpoint_frozen_seconds_sum", "counter", "Time jobs were frozen by checkpoints, summed.", m.frozenSum)
	series("cryo_checkpoint_bytes_total", "counter", "Image bytes checkpointed (before dedup and compression).", m.bytesRaw)
	series("cryo_checkpoint_stored_bytes_total", "counter", "Compressed bytes checkpoints added to the store.", m.bytesNew)
	series("cryo_restores_total", "counter", "Successful restores.", m.restores)
	series("cryo_restore_failures_total", "counter", "Restores that failed.", m.restoreFailed)
	series("cryo_memory_growth_bytes_per_second", "gauge", "Fitted growth rate of the job's resident memory.", m.memGrowth)
	series("cryo_checkpoint_interval_seconds", "gauge", "Checkpoint interval in force.", m.interval)
	p("# HELP cryo_failures_detected_total Failures detected, by kind.\n# TYPE cryo_failures_detected_total counter\n")
	keys := make([][2]string, 0, len(m.failures))
	for k := range m.failures {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i][0]+keys[i][1] < keys[j][0]+keys[j][1] })
	for _, k := range keys {
		p("cryo_failures_detected_total{job=%q,kind=%q} %g\n", k[0], k[1], m.failures[k])
	}
	return n, nil
}

// ServeHTTP serves /metrics.
func (m *Metrics) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	m.WriteTo(w)
}

func sortedKeys(mp map[string]float64) []string {
	ks := make([]string, 0, len(mp))
	for k := range mp {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}
