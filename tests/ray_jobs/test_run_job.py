"""The whole recipe as one Ray job: `ray job submit -- python -m ray_jobs.run configs/quickstart.yaml` to a loopback Ray
head (started and stopped here by its process ids) runs prep, the memory stage, the dialogue stage, export and chat on
that cluster, writing what `convsink run` writes; a bad recipe fails the job with one line."""

from __future__ import annotations

import sys
import time

import pytest

from tests.pipeline.training.test_two_stage import QUICKSTART_SHORT, check_quickstart_run
from tests.repo import REPO

pytestmark = pytest.mark.slow


def test_ray_job_runs_the_whole_recipe_on_the_cluster(cluster, tmp_path):
    out = tmp_path / "quickstart"
    t0 = time.time()
    proc = cluster.submit([sys.executable, "-m", "ray_jobs.run", "configs/quickstart.yaml", "--root", REPO,
                           f"out_dir={out}", *QUICKSTART_SHORT], REPO)
    print(f"ray job submit: {time.time() - t0:.0f} s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    check_quickstart_run(out, proc.stdout)
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr, "the job must run on the submitted-to cluster"


def test_ray_job_with_a_bad_recipe_fails_with_one_line(cluster, tmp_path):
    proc = cluster.submit([sys.executable, "-m", "ray_jobs.run", "configs/quickstart.yaml", "--root", REPO,
                           f"out_dir={tmp_path / 'run'}", "train.memory_steps=zero"], REPO)
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "failed with exit code 2" in printed, printed[-2000:]  # `ray job submit` fails too
    errors = {ln for ln in printed.splitlines() if ln.startswith("ray_jobs.run: error:")}  # (its tail repeats the log)
    assert len(errors) == 1 and "train.memory_steps" in errors.pop(), printed[-2000:]
    assert not (tmp_path / "run").exists()
