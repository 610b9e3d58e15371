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

# The user-mode tier, part two: the packages that talk to CRIU and set up
# job namespaces, run as the unprivileged test user (the e2e user tests run
# cryo as that user from the root test binary). Their binaries are built
# into a directory the user may enter, with the testdata they read.
user=${CRYO_TEST_USER:-cryo-test}
if [ "$(id -u)" = 0 ] && [[ " ${TEST_FLAGS:-} " != *" -short "* ]]; then
  if ! id "$user" >/dev/null 2>&1; then
    echo "--- FAIL: user-mode tier: no test user $user (make test-user creates it)" | tee -a "$log"
    rc=1
  else
    ut=$(mktemp -d)
    chmod 755 "$ut"
    for pkg in internal/criu internal/jobns internal/memread; do
      name=$(basename "$pkg")
      mkdir -p "$ut/$name"
      go test -c -o "$ut/$name/$name.test" "./$pkg" || rc=1
      [ -d "$pkg/testdata" ] && cp -r "$pkg/testdata" "$ut/$name/"
      echo "user-mode tier: ./$pkg as $user" | tee -a "$log"
      # TestCheckStampIsWhatVetReads sets a file capability on a fake CRIU
      # (root's) and then runs its user part as nobody: the root tier runs
      # it whole, so this tier leaves it out rather than skip it.
      ( cd "$ut/$name" && runuser -u "$user" -- env -i PATH=/usr/bin:/bin HOME=/tmp \
          CRYO_CRIU="${CRYO_CRIU:-}" CRYO_NO_SKIP="${CRYO_NO_SKIP:-}" "./$name.test" -test.count=1 -test.v \
          -test.skip '^TestCheckStampIsWhatVetReads$' ) 2>&1 |
        tee -a "$log" | grep -E '^(--- |    --- |ok|FAIL|PASS|panic)|_test\.go:[0-9]+:'
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1
    done
    rm -rf "$ut"
  fi
fi
pass=$(grep -cE '^\s*--- PASS' "$log")
fail=$(grep -cE '^\s*--- FAIL' "$log")
skip=$(grep -cE '^\s*--- SKIP' "$log")
if [ "$skip" -gt 0 ]; then
  echo "skipped tests and why:"
  grep -A1 -E '^\s*--- SKIP' "$log" | grep -vE '^\s*--- SKIP|^--$' | sed 's/^ */  /'
fi
echo "tests: $pass passed, $fail failed, $skip skipped"
exit "$rc"
