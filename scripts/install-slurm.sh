#!/usr/bin/env bash
# Install what the Slurm tests (tests/slurm/) and a single-machine trial of slurm/*.sbatch need: the Debian/Ubuntu
# packages slurm-wlm (slurmctld, slurmd, sbatch/srun/...) and munge. Does nothing when sbatch is already there.
# Needs root (or sudo) and apt-get; starts no daemon (the tests start their own, under a temporary directory).
set -euo pipefail
if command -v sbatch >/dev/null 2>&1 && { command -v slurmd || test -x /usr/sbin/slurmd; } >/dev/null 2>&1; then
    echo "install-slurm: Slurm already installed ($(command -v sbatch))"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-slurm: no apt-get here; install Slurm (slurmctld, slurmd, client) and munge with your package manager" >&2
    exit 1
fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "install-slurm: run as root (or install sudo)" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends slurm-wlm munge
echo "install-slurm: installed slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm 2>/dev/null)"
