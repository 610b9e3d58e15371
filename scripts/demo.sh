#!/usr/bin/env bash
# The demo: a job whose state lives only in memory is started, checkpointed
# and stopped by cryo, restored from the store, and finishes with the same
# answer as a run that was never interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
cryo=$PWD/bin/cryo
work=$(mktemp -d /tmp/cryo-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
go build -o "$work/memstate" ./e2e/workloads/memstate

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
args=(-steps 80 -mem 64 -delay 50ms)

say "reference: the job run straight through (no pauses)"
want=$("$work/memstate" -steps 80 -mem 64 -delay 0 | tail -n 1)
echo "$want"

say "start the job (80 steps, 64 MiB of state) in the background"
setsid "$work/memstate" "${args[@]}" >"$work/job.out" 2>&1 </dev/null &
pid=$!
sleep 1.5
echo "pid $pid is at: $(tail -n 1 "$work/job.out")"

say "cryo checkpoint --kill: snapshot the job into the store, then stop it"
"$cryo" checkpoint --store "$work/store" --kill "$pid"
wait "$pid" 2>/dev/null || true
at=$(tail -n 1 "$work/job.out")
echo "the job is gone; its output stopped at: $at"

say "cryo list"
"$cryo" list --store "$work/store"

say "cryo restore: bring it back (it prints the restored PID)"
rpid=$("$cryo" restore --store "$work/store")
echo "restored as pid $rpid"
while kill -0 "$rpid" 2>/dev/null; do sleep 0.2; done

say "the job carried on from where it was"
grep -n -A2 -x "$at" "$work/job.out" | head -n 3
got=$(tail -n 1 "$work/job.out")
steps=$(grep -c '^step ' "$work/job.out")
echo "steps printed: $steps (each exactly once: $(sort "$work/job.out" | uniq -d | wc -l) repeated)"
echo "restored run: $got"
echo "reference:    $want"
if [ "$got" = "$want" ] && [ "$steps" = 80 ]; then
  say "same result: the restored job finished as if never interrupted"
else
  say "MISMATCH"; exit 1
fi
