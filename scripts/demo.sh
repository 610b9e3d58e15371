#!/usr/bin/env bash
# The demo: a job whose state lives only in memory is started, checkpointed
# and stopped by cryo, restored from the store, and finishes with the same
# answer as a run that was never interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
cryo=$PWD/bin/cryo
work=$(mktemp -d /tmp/cryo-demo.XXXXXX)
udir=
# What the demo's user made, the user removes: root deletes nothing in a
# directory a user can write.
cleanup() {
  [ -n "$udir" ] && [ -d "$udir" ] && as find "$udir" -xdev -mindepth 1 -delete
  rm -rf "$work"
}
trap cleanup EXIT
go build -o "$work/memstate" ./e2e/workloads/memstate
go build -o "$work/offload" ./e2e/workloads/offload

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
args=(-steps 80 -mem 64 -delay 50ms)

say "reference: the job run straight through (no pauses)"
want=$("$work/memstate" -steps 80 -mem 64 -delay 0 | tail -n 1)
want1=$want
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

# Part two: the main job. A host streams 160 work items to an offload
# worker over a socket; both run under `cryo run`, which checkpoints them
# together every second. At item 100 the worker is killed (once); cryo sees
# the job break, kills what is left, restores the last checkpoint taken
# before the failure, and the job finishes with the right answer.
say "reference: host and offload worker straight through"
sock=$work/ref.sock
"$work/offload" -role worker -addr "$sock" & wpid=$!
want=$("$work/offload" -role host -addr "$sock" -items 160 -delay 0 | tail -n 1)
wait $wpid || true
echo "$want"

say "cryo run: host + offload worker, a checkpoint every second; the worker dies at item 100"
sock=$work/job.sock
rc=0
"$cryo" run --store "$work/runstore" --interval 1s \
  --offload "$work/offload -role worker -addr $sock -fault kill -fault-at 100 -fault-file $work/fault-done" \
  -- "$work/offload" -role host -addr "$sock" -items 160 -delay 25ms >"$work/run.out" 2>"$work/run.err" || rc=$?
cat "$work/run.err"
got=$(tail -n 1 "$work/run.out")
echo "cryo run exited $rc; the host's last line: $got"
[ -f "$work/fault-done" ] || { say "the fault never struck"; exit 1; }
if [ "$rc" = 0 ] && [ "$got" = "$want" ] && [ "$(grep -c '^step 1$' "$work/run.out")" = 1 ]; then
  say "same result: cryo restored the job after its offload worker died, and it finished right"
else
  say "MISMATCH"; exit 1
fi

# Part three: an MPI job. `mpirun -np 2` (OpenMPI) runs two ranks that sum
# an array every step (testdata/apps/ring.c) under `cryo run`, which
# checkpoints the launcher and its ranks together every second. One rank is
# killed half way; mpirun gives up and exits 137 (128+SIGKILL, how it
# reports a rank killed), cryo ends the rest, restores the last checkpoint,
# and the job finishes with the same answer, each step printed once.
mpi=
if command -v mpirun.openmpi >/dev/null && command -v mpicc.openmpi >/dev/null; then
  mpi=1
  mpicc.openmpi -O2 -o "$work/ring" e2e/testdata/apps/ring.c
  say "reference: mpirun -np 2 ring straight through"
  # mpirun's consent to run as root (an admin's demo; users need none)
  [ "$(id -u)" = 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  mwant=$(mpirun.openmpi -np 2 --oversubscribe "$work/ring" 120 0 "$work/ring-ref.log" | tail -n 1)
  echo "$mwant"

  say "cryo run -- mpirun -np 2 ring, a checkpoint every second; a rank is killed at step 60"
  (
    while ! grep -q '^step 60 ' "$work/mpi.out" 2>/dev/null; do sleep 0.05; done
    rank=$(pgrep -n -f "^$work/ring 120 ")
    echo "killing rank pid $rank" >&2
    kill -9 "$rank"
  ) &
  killer=$!
  rc=0
  "$cryo" run --store "$work/mpistore" --interval 1s \
    -- mpirun.openmpi -np 2 --oversubscribe "$work/ring" 120 40 "$work/mpi.log" >"$work/mpi.out" 2>"$work/mpi.err" || rc=$?
  wait "$killer" || true
  grep -v '^host: ' "$work/mpi.err"
  mgot=$(tail -n 1 "$work/mpi.out")
  echo "cryo run exited $rc; the job's last line: $mgot"
  if [ "$rc" = 0 ] && [ "$mgot" = "$mwant" ] && [ "$(grep -c '^step ' "$work/mpi.out")" = 120 ] &&
     grep -q 'restored: generation' "$work/mpi.err"; then
    say "same result: cryo restored the MPI job after a rank died, and it finished right"
  else
    say "MISMATCH"; exit 1
  fi
else
  say "no MPI part: OpenMPI (openmpi-bin, libopenmpi-dev) is not installed; scripts/install-deps.sh installs it"
fi

# Part four: the same, as an HPC user who is not root. cryo runs CRIU as
# the user (unprivileged, with the file capability `make install` gives
# it), so the user needs no sudo and no daemon; the kernel, not cryo,
# decides what the restored job may do. Run as root, the demo does this
# part as the test user (scripts/test-user.sh); run as a user, as you.
if [ "$(id -u)" = 0 ]; then
  user=${CRYO_TEST_USER:-cryo-test}
  id "$user" >/dev/null 2>&1 || scripts/test-user.sh
  as() { runuser -u "$user" -- env -i PATH=/usr/bin:/bin HOME=/tmp CRYO_CRIU="${CRYO_CRIU:-}" "$@"; }
else
  user=$(id -un)
  as() { "$@"; }
fi
chmod 755 "$work"
cp "$cryo" "$work/cryo"
udir=$work/user
mkdir "$udir"
[ "$(id -u)" = 0 ] && chown "$user" "$udir"
ucryo=$work/cryo

say "as $user (uid $(id -u "$user")): cryo check"
as "$ucryo" check | grep -E '^(criu|mode|criu check|job namespaces):'

say "as $user: start the job, cryo checkpoint --kill, cryo restore"
# The user's own shell makes the job's output file, as at a login.
as bash -c 'setsid -f "$0" "$@" >"'"$udir"'/job.out" 2>&1 </dev/null' "$work/memstate" "${args[@]}"
sleep 1.5
upid=$(pgrep -n -u "$user" -f "^$work/memstate")
as "$ucryo" checkpoint --store "$udir/store" --kill "$upid"
while kill -0 "$upid" 2>/dev/null; do sleep 0.1; done
urpid=$(as "$ucryo" restore --store "$udir/store")
echo "restored as pid $urpid, running as $(ps -o user= -p "$urpid"), capabilities $(awk '/^CapEff/ {print $2}' /proc/"$urpid"/status)"
while kill -0 "$urpid" 2>/dev/null; do sleep 0.2; done
got=$(tail -n 1 "$udir/job.out")
echo "restored run: $got"
[ "$got" = "$want1" ] || { say "MISMATCH"; exit 1; }

say "as $user: cryo run, the worker dies at item 100"
rc=0
as bash -c 'exec "$0" "$@" >"'"$udir"'/run.out" 2>"'"$udir"'/run.err"' "$ucryo" run --store "$udir/runstore" --interval 1s \
  --offload "$work/offload -role worker -addr $udir/job.sock -fault kill -fault-at 100 -fault-file $udir/fault-done" \
  -- "$work/offload" -role host -addr "$udir/job.sock" -items 160 -delay 25ms || rc=$?
cat "$udir/run.err"
got=$(tail -n 1 "$udir/run.out")
if [ "$rc" = 0 ] && [ "$got" = "$want" ] && [ -f "$udir/fault-done" ]; then
  say "same results, as $user: no root, no daemon, no sudo"
else
  say "MISMATCH (exit $rc, $got)"; exit 1
fi
