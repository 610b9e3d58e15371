#!/usr/bin/env bash
# Runs every test tier and prints a summary line that counts passes,
# failures and skips (with the reasons for the skips). As root with CRIU
# installed, CRYO_NO_SKIP=1 turns a would-be skip into a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && [ -x "${CRYO_CRIU:-}" ]; then
  export CRYO_NO_SKIP=${CRYO_NO_SKIP:-1}
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# One line per test result, the tests' own log lines, and the continuation
# lines of multi-line failure messages (what cryo said, say); not the
# workloads' progress lines.
go test -p 1 -count=1 -v -timeout 40m ${TEST_FLAGS:-} ./... 2>&1 | tee "$log" | awk '
  /^(--- |    --- |        --- |ok|FAIL|PASS|panic)/ { print; cont = 0; next }
  /_test\.go:[0-9]+:/ { print; cont = 1; next }
  cont && /^        / && !/^ *step [0-9]+$/ { print; next }
  { cont = 0 }'
rc=${PIPESTATUS[0]}
pass=$(grep -cE '^\s*--- PASS' "$log")
fail=$(grep -cE '^\s*--- FAIL' "$log")
skip=$(grep -cE '^\s*--- SKIP' "$log")
if [ "$skip" -gt 0 ]; then
  echo "skipped tests and why:"
  grep -A1 -E '^\s*--- SKIP' "$log" | grep -vE '^\s*--- SKIP|^--$' | sed 's/^ */  /'
fi
echo "tests: $pass passed, $fail failed, $skip skipped"
exit "$rc"
