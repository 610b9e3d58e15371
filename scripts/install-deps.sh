#!/usr/bin/env bash
# Installs the Debian packages cryo's tests need besides CRIU (which
# install-criu.sh builds): build tools; a Slurm (controller, node daemon
# and client commands) for the e2e TestSlurm* tests, which start their own
# slurmctld and slurmd on loopback; and the applications of e2e/apps_test.go
# and the demo's MPI part: LAMMPS (with OpenMPI's mpirun), OpenMPI's and
# MPICH's launchers and compilers (the -dev packages hold mpi.h), and
# PyTorch (which brings NumPy). No service is enabled or started here.
# Safe to run again: it installs only what is missing.
set -euo pipefail
pkgs=(gcc make iproute2 procps util-linux slurmctld slurmd slurm-client
  lammps openmpi-bin libopenmpi-dev mpich libmpich-dev python3-torch)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
