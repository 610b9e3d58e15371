#!/usr/bin/env bash
# Installs a CRIU that works on current kernels, and for users who are not
# root, into a prefix (default: the project-local .deps/criu).
#
# Debian 12 ships CRIU 3.17, which fails on current kernels ("vdso: Unexpected
# rt vDSO area bounds"). CRIU 4.2.1 is packaged in Debian unstable (sid); we
# fetch its upstream tarball through apt from the mirror this machine already
# uses, check its sha256 (the .dsc may be missing, so apt cannot vouch for
# it), apply cryo's patches (scripts/criu-patches: unprivileged restores on
# nodes that lack a capability, and unprivileged dumps and restores of jobs in
# namespaces of their own) and build only the criu binary.
#
# The binary gets the file capability cap_checkpoint_restore, so that users
# run it as themselves (`criu --unprivileged`, as cryo does for them) on their
# own processes; the kernel gives it nothing over anyone else's. It is
# installed root-owned, writable by root only, in directories that are too:
# a capability on a file that others could replace would be theirs.
#
# Usage: scripts/install-criu.sh [PREFIX]
# Prints the path of the installed binary on its last line.
set -euo pipefail

version=4.2.1
sha256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
cap=cap_checkpoint_restore
top=$(cd "$(dirname "$0")/.." && pwd)
prefix=${1:-$top/.deps/criu}
bin=$prefix/sbin/criu

log() { printf 'install-criu: %s\n' "$*" >&2; }

# Our patches (scripts/criu-patches, applied in order) are part of what is
# installed: a binary built without the current set is rebuilt.
patches=("$top"/scripts/criu-patches/*.patch)
[ -e "${patches[0]}" ] || patches=()
stamp=$prefix/patches.sha256
want_stamp=$(cat /dev/null "${patches[@]}" | sha256sum | cut -d' ' -f1)

capable() { command -v getcap >/dev/null && getcap "$1" 2>/dev/null | grep -q "$cap[=+]eip"; }

# Every directory from the binary's up to / must be root's and writable by
# root alone, or a user could put their own binary where the capable one is.
safe_tree() {
  local d=$1
  while :; do
    if [ "$(stat -c %u "$d")" != 0 ] || (( 8#$(stat -c %a "$d") & 8#022 )); then
      log "$d is not root-owned and writable by root alone, so a capability below it is not safe; use another PREFIX"
      return 1
    fi
    [ "$d" = / ] && return 0
    d=$(dirname "$d")
  done
}

# Already there, patched as now, and capable? Nothing to do.
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "Version: $version" &&
   [ "$(cat "$stamp" 2>/dev/null)" = "$want_stamp" ] && capable "$bin"; then
  log "CRIU $version already at $bin"
  echo "$bin"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  log "must run as root (installs Debian build dependencies and sets a file capability)"
  exit 1
fi

# The mirror: the first Debian archive URI of this machine's own apt sources.
mirror_from_sources() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk '
      /^[[:space:]]*$/ { if (uri != "" && suites ~ /(bookworm|trixie|stable|sid)( |$)/ && suites !~ /security/) { print uri; exit } uri=""; suites=""; next }
      /^URIs:/ { uri=$2 }
      /^Suites:/ { $1=""; suites=$0 }
      END { if (uri != "" && suites ~ /(bookworm|trixie|stable|sid)( |$)/ && suites !~ /security/) print uri }
    ' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1 == "deb" && $0 !~ /security/ && $0 !~ /^#/ {
           for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' "$f"
  done
}
mirror=$(mirror_from_sources | grep -m1 -i debian || true)
if [ -z "$mirror" ]; then
  log "could not find a Debian mirror in /etc/apt/sources.list{,.d}; add one or install criu >= 4.0 yourself"
  exit 1
fi
log "using the Debian mirror from this machine's apt sources: $mirror"

export DEBIAN_FRONTEND=noninteractive
deps=(build-essential pkgconf libbsd-dev libcap-dev libgnutls28-dev libnet1-dev
      libnftables-dev libnl-3-dev libprotobuf-c-dev libprotobuf-dev
      protobuf-c-compiler protobuf-compiler uuid-dev python3-protobuf libaio-dev
      iproute2 iptables xz-utils ca-certificates patch libcap2-bin)
missing=()
for p in "${deps[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing build dependencies: ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/src"
echo "deb-src $mirror sid main" >"$work/sources.list"
aptopts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
         -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
         -o "APT::Sandbox::User=root")
log "fetching criu $version source from sid"
apt-get "${aptopts[@]}" update -qq >/dev/null 2>&1 || true
# The Debian part of the source package may be gone from the mirror while
# the upstream tarball, all we need, is there: apt then fails but keeps it.
tarball=$work/src/criu_$version.orig.tar.xz
for want in "criu=$version-1" criu; do
  [ -f "$tarball" ] && break
  ( cd "$work/src" && apt-get "${aptopts[@]}" source --download-only "$want" >/dev/null 2>&1 ) || true
done
if [ ! -f "$tarball" ]; then
  log "could not fetch criu_$version.orig.tar.xz from $mirror (sid deb-src)"
  exit 1
fi
echo "$sha256  $tarball" | sha256sum -c --quiet - || { log "sha256 mismatch for $tarball"; exit 1; }

log "building criu $version (about 35 s on 2 cores)"
tar -C "$work" -xf "$tarball"
for p in "${patches[@]}"; do
  log "applying $(basename "$p")"
  patch -d "$work/criu-$version" -p1 --quiet <"$p" || { log "patch $p does not apply"; exit 1; }
done
make -C "$work/criu-$version" -j"$(nproc)" criu >"$work/build.log" 2>&1 || {
  tail -40 "$work/build.log" >&2; log "build failed"; exit 1; }

install -d -m 0755 -o root -g root "$(dirname "$bin")"
safe_tree "$(dirname "$bin")"
# Replace the file, never write through it: a running criu keeps the old one.
install -m 0755 -o root -g root "$work/criu-$version/criu/criu" "$bin.new"
setcap "$cap+eip" "$bin.new" || {
  rm -f "$bin.new"; log "setcap failed: the file system under $prefix may not keep file capabilities"; exit 1; }
mv -f "$bin.new" "$bin"
capable "$bin" || { log "$bin has no $cap after setcap"; exit 1; }
echo "$want_stamp" >"$stamp"
"$bin" check >/dev/null 2>&1 || log "warning: '$bin check' does not say 'Looks good' on this kernel"
log "installed $bin ($cap+eip)"
echo "$bin"
