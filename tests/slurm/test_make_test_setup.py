"""`make test` does all the set-up its tests need on a fresh machine: it installs Slurm (scripts/install-slurm.sh)
when sbatch is missing, before pytest runs, as it builds the venv. Checked with a PATH that has no Slurm and a
stub apt-get that records what it was asked to do (nothing is installed)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.repo import REPO

TOOLS = ("bash", "sh", "env", "id", "make", "dpkg-query", "cat", "test", "true", "rm", "touch")


@pytest.fixture
def bare_path(tmp_path):
    """A PATH with the shell tools the Makefile and the install script use, a recording apt-get, and no Slurm."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        if found:
            os.symlink(found, bin_dir / tool)
    log = tmp_path / "apt-get.log"
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    (bin_dir / "apt-get").chmod(0o755)
    return bin_dir, log


def make(target, path, *args):
    env = {"PATH": str(path), "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run(["make", "--no-print-directory", *args, target], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)


def test_make_test_installs_slurm_before_pytest():
    plan = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    lines = plan.splitlines()
    install = [i for i, line in enumerate(lines) if "scripts/install-slurm.sh" in line]
    pytest_run = [i for i, line in enumerate(lines) if "-m pytest" in line]
    assert install and pytest_run and install[0] < pytest_run[0], plan


def test_slurm_setup_installs_when_sbatch_is_missing(bare_path):
    bin_dir, log = bare_path
    proc = make("slurm", bin_dir)
    if os.geteuid() != 0:
        assert proc.returncode != 0 and "root" in proc.stderr, proc.stdout + proc.stderr
        return
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = log.read_text().splitlines()
    assert any(c.startswith("update") for c in calls), calls
    assert any("install" in c and "slurm-wlm" in c and "munge" in c for c in calls), calls


def test_slurm_setup_does_nothing_when_slurm_is_there(bare_path):
    bin_dir, log = bare_path
    for name in ("sbatch", "slurmd"):
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / name).chmod(0o755)
    proc = make("slurm", bin_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "already installed" in proc.stdout
    assert not log.exists(), log.read_text()
