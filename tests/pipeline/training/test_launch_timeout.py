"""No hangs: a launch whose rank hangs ends at ``train.launch_timeout_s`` with the ranks' last output in the error,
and neither a timed-out nor an interrupted launch leaves a rank process behind."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from pipeline.config import load_config
from pipeline.training.launch import TrainingFailed, launch_training
from pipeline.training.launcher_process import LauncherProcess
from tests.repo import REPO


def _gone(pid: int, within_s: float = 10.0) -> bool:
    """The process has ended (or is a zombie waiting to be reaped) within ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.2)
    return False


def test_a_hung_rank_ends_the_launch_at_its_timeout_showing_the_rank_output(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))  # ranks import tests.*
    timeout = 20
    cfg = load_config(None, ["data.seq_len=128", "train.nproc=2", f"train.launch_timeout_s={timeout}", "wandb.mode=disabled"])
    out = tmp_path / "run"
    start = time.monotonic()
    with pytest.raises(TrainingFailed) as err:
        launch_training(cfg, shards, str(out), rank_module="tests.pipeline.training.hanging_rank")
    took = time.monotonic() - start
    assert timeout <= took < timeout + 30, f"the launch ended after {took:.0f} s, not at its {timeout} s timeout"
    first, *rest = str(err.value).splitlines()
    assert f"train.launch_timeout_s={timeout}" in first
    assert "rank 1: waiting for a collective that never comes" in rest, str(err.value)
    assert "rank 1: waiting for a collective that never comes" in err.value.log_tail
    hung = int((out / "hanging-rank1.pid").read_text())
    assert _gone(hung), f"the hung rank (pid {hung}) outlived its launch"
    assert not (out / "result.json").exists()


def test_an_interrupted_launch_takes_its_ranks_down(tmp_path):
    """What pytest-timeout does to a test stuck in a launch (an exception raised by a signal handler while the
    launcher runs): the launcher's process group, rank children included, is ended before the exception goes on."""
    rank = "import time; time.sleep(600)"
    launcher = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {rank!r}]); "
                "print('rank pid', p.pid, flush=True); time.sleep(600)")
    proc = LauncherProcess([sys.executable, "-c", launcher], dict(os.environ))

    def interrupt(signum, frame):
        raise RuntimeError("interrupted by the test's timeout")

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(5)
    try:
        with pytest.raises(RuntimeError, match="interrupted by the test's timeout"):
            proc.run(timeout_s=None)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    pids = [int(line.split()[-1]) for line in proc.tail().splitlines() if line.startswith("rank pid")]
    assert pids, proc.tail()
    assert _gone(pids[0]), "the rank child outlived the interrupted launch"
