#!/usr/bin/env bash
# Installs a CRIU that works on current kernels into a project-local prefix.
#
# Debian 12 ships CRIU 3.17, which fails on current kernels ("vdso: Unexpected
# rt vDSO area bounds"). CRIU 4.1.1 is packaged in Debian's next release
# (trixie); we fetch its upstream tarball through apt from the mirror this
# machine already uses, check its sha256 (the .dsc may be missing, so apt
# cannot vouch for it), and build only the criu binary.
#
# Usage: scripts/install-criu.sh [PREFIX]   (default: .deps/criu)
# Prints the path of the installed binary on its last line.
set -euo pipefail

version=4.1.1
sha256=f80a66cb3726bb2116266d4759ce3bcbfab7abdb6b6d430bf20dd41911717afe
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

# Already there and working? Nothing to do.
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "Version: $version" &&
   [ "$(cat "$stamp" 2>/dev/null)" = "$want_stamp" ]; then
  log "CRIU $version already at $bin"
  echo "$bin"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  log "must run as root (installs Debian build dependencies; CRIU itself needs root)"
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
      iproute2 iptables xz-utils ca-certificates patch)
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
echo "deb-src $mirror trixie main" >"$work/sources.list"
aptopts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
         -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
         -o "APT::Sandbox::User=root")
log "fetching criu $version source from trixie"
apt-get "${aptopts[@]}" update -qq >/dev/null 2>&1 || true
( cd "$work/src" && apt-get "${aptopts[@]}" source --download-only "criu=$version-*" >/dev/null 2>&1 ) || true
tarball=$work/src/criu_$version.orig.tar.xz
if [ ! -f "$tarball" ]; then
  ( cd "$work/src" && apt-get "${aptopts[@]}" source --download-only criu >/dev/null 2>&1 ) || true
fi
if [ ! -f "$tarball" ]; then
  log "could not fetch criu_$version.orig.tar.xz from $mirror (trixie deb-src)"
  exit 1
fi
echo "$sha256  $tarball" | sha256sum -c --quiet - || { log "sha256 mismatch for $tarball"; exit 1; }

log "building criu $version (about 20 s on 2 cores)"
tar -C "$work" -xf "$tarball"
for p in "${patches[@]}"; do
  log "applying $(basename "$p")"
  patch -d "$work/criu-$version" -p1 --quiet <"$p" || { log "patch $p does not apply"; exit 1; }
done
make -C "$work/criu-$version" -j"$(nproc)" criu >"$work/build.log" 2>&1 || {
  tail -40 "$work/build.log" >&2; log "build failed"; exit 1; }
install -D -m 0755 "$work/criu-$version/criu/criu" "$bin"
echo "$want_stamp" >"$stamp"
"$bin" check >/dev/null 2>&1 || log "warning: '$bin check' does not say 'Looks good' on this kernel"
log "installed $bin"
echo "$bin"
