#!/usr/bin/env bash
# Creates the unprivileged user that the tests' user-mode tier runs cryo as
# (CRYO_TEST_USER, default cryo-test): an ordinary account with a home, no
# password and no sudo, as an HPC user has. Safe to run again.
set -euo pipefail
user=${CRYO_TEST_USER:-cryo-test}
if id "$user" >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "test-user: need root to create the test user $user" >&2
  exit 1
fi
useradd --create-home --shell /bin/bash --comment "cryo tests, an unprivileged user" "$user"
echo "test-user: created $user (uid $(id -u "$user"))" >&2
