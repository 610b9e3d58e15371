#!/usr/bin/env bash
# The benchmark (make bench): cryo against raw CRIU on the same workload in
# the same run. See e2e/bench/main.go for what is measured and how.
#
#   BENCH_MIB=2048   memory of the workload (MiB)
#   BENCH_REPS=3     repetitions per tool and half
#   BENCH_CONDITIONS=warm,cold  the halves: warm (fresh memory touched and freed before
#                    every timed step), cold (an idle spell instead, no warm-up)
#   BENCH_DIR=/var/tmp         disk for CRIU's images and cryo's store (same disk for both)
#   BENCH_WARM_MIB=max(2048, 2*BENCH_MIB+512)  warm: fresh memory touched and freed
#   BENCH_SETTLE=0s  warm: idle before every timed step; BENCH_COLD_SETTLE=5s: cold
#   BENCH_RSS_MIB=1024,8192   then cryo's peak memory with jobs of these sizes ("" skips it)
#   BENCH_MIGRATE_MIB=1024  then live migration of a job this size, pre-copy against stop and copy
#   BENCH_MIGRATE_REPS=3     migrations of each kind ("" for the MiB skips it)
#   BENCH_JSON=bin/bench-<time>.json   where the results go (-rss.json for the memory run)
#
# Needs root, bin/cryo (make build) and CRIU ($CRYO_CRIU, else .deps/criu).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
: "${CRYO_CRIU:=$repo/.deps/criu/sbin/criu}"
[ -x "$CRYO_CRIU" ] || CRYO_CRIU=$(command -v criu || true)
[ -n "$CRYO_CRIU" ] || { echo "bench: no CRIU (make criu)" >&2; exit 1; }
[ -x bin/cryo ] || { echo "bench: no bin/cryo (make build)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "bench: needs root" >&2; exit 1; }

work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/cryo-bench.XXXXXX")
shm=$(mktemp -d /dev/shm/cryo-bench.XXXXXX)
out=${BENCH_JSON:-$repo/bin/bench-$(date -u +%Y%m%dT%H%M%SZ).json}

# Whatever happens, no workload may outlive the bench. The bench cleans up
# itself; this is for when it cannot (e.g. it was killed): every process
# whose command line names our private directory (the bench, the workloads,
# restored or not, and cryo or CRIU working on them) is ended, twice in case
# a restore was finishing, and then the directories are removed.
cleanup() {
  local pass p cmd killed=0
  for pass in 1 2; do
    for p in /proc/[0-9]*; do
      cmd=$(tr '\0' ' ' 2>/dev/null <"$p/cmdline") || continue
      case "$cmd" in
        *"$work"* | *"$shm"*) kill -9 "${p#/proc/}" 2>/dev/null && killed=1 ;;
      esac
    done
    [ "$killed" = 1 ] && [ "$pass" = 1 ] && sleep 1
  done
  rm -rf "$work" "$shm"
}
trap cleanup EXIT

mkdir "$work/bin"
go build -o "$work/bin/mixed" ./e2e/workloads/mixed
go build -o "$work/bin/bench" ./e2e/bench

echo "load before: $(uptime)"
# The bench runs in the background so that a signal to this script reaches
# it at once (it then stops, kills its workloads and cleans up).
run_bench() {
  "$work/bin/bench" -cryo "$repo/bin/cryo" -criu "$CRYO_CRIU" -workload "$work/bin/mixed" \
    -dir "$work/run" -shm "$shm" -mib "${BENCH_MIB:-2048}" -reps "${BENCH_REPS:-3}" \
    -conditions "${BENCH_CONDITIONS:-warm,cold}" -warm-mib "${BENCH_WARM_MIB:--1}" \
    -settle "${BENCH_SETTLE:-0s}" -cold-settle "${BENCH_COLD_SETTLE:-5s}" "$@" &
  bench=$!
  trap 'kill -TERM "$bench" 2>/dev/null || true' INT TERM
  local r=0
  wait "$bench" || r=$?
  while kill -0 "$bench" 2>/dev/null; do r=0; wait "$bench" || r=$?; done
  return "$r"
}
rc=0
run_bench -json "$out" || rc=$?
rss=${BENCH_RSS_MIB-1024,8192}
if [ "$rc" = 0 ] && [ -n "$rss" ]; then
  run_bench -rss "$rss" -json "${out%.json}-rss.json" || rc=$?
fi
# Live migration: pre-copy against stop and copy, a job rewriting 5% of
# its memory a second (BENCH_MIGRATE_MIB="" skips it).
mig=${BENCH_MIGRATE_MIB-1024}
if [ "$rc" = 0 ] && [ -n "$mig" ]; then
  go build -o "$work/bin/dirty" ./e2e/workloads/dirty
  go build -o "$work/bin/benchmigrate" ./e2e/benchmigrate
  mkdir -p "$work/migrate"
  "$work/bin/benchmigrate" -cryo "$repo/bin/cryo" -criu "$CRYO_CRIU" -workload "$work/bin/dirty" \
    -dir "$work/migrate" -mib "$mig" -reps "${BENCH_MIGRATE_REPS:-3}" -json "${out%.json}-migrate.json" || rc=$?
fi
echo "load after: $(uptime)"
exit "$rc"
