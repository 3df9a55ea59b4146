"""The Slurm batch scripts on a real single-node Slurm (munged + slurmctld + slurmd started by the test):
torchrun over srun trains two ranks and checkpoints both ranks' ZeRO shards; a bad config and a failing rank
or Ray job reach the job's exit code; nothing a job started outlives it. (The Ray script's successful run is in
test_slurm_multinode.py, on two emulated nodes.)"""

from __future__ import annotations

import json
import os

import pytest

from .harness import assert_no_leftovers, finish, job_env, ray_env, submit
from .slurm_cluster import LocalSlurm, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm():
    with LocalSlurm(cpus=2) as cluster:
        yield cluster


def test_torchrun_sbatch_trains_two_ranks_and_checkpoints(slurm, shards, recipe, tmp_path):
    out = tmp_path / "run"
    job, log, t0 = submit(slurm, "train_torchrun.sbatch", tmp_path,
                           job_env(CONFIG=recipe, DATA=shards, OUT=out, OVERRIDES="train.max_steps=4", RDZV_PORT=free_port()),
                           args=["train.save_every=4"], sbatch_opts=["--cpus-per-task=2"])
    info, text = finish(slurm, job, log, t0)
    assert_no_leftovers(slurm, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-6000:]
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step000004"
    files = os.listdir(root / "step000004")
    for rank in (0, 1):
        assert any(f"zero_pp_rank_{rank}_" in f for f in files), files
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["max_steps"] == 4 and cfg["train"]["save_every"] == 4 and cfg["train"]["nnodes"] == 1
    assert cfg["train"]["nproc"] == 2
    result = json.loads((out / "result.json").read_text())
    assert result["checkpoint"].endswith("step000004")
    assert "rendezvous 127.0.0.1:" in text and "2 rank(s)" in text


def test_failures_reach_the_job_exit_code(slurm, shards, recipe, tmp_path):
    # a bad config key fails before any rank starts (exit 2); a rank failing (missing DeepSpeed JSON, only read by
    # the ranks) fails the srun step and so the job. Both jobs run side by side (1 CPU each).
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    bad_key, log1, t0 = submit(slurm, "train_torchrun.sbatch", tmp_path / "a",
                                job_env(CONFIG=recipe, DATA=shards, OUT=tmp_path / "bad_key"), args=["train.no_such_key=1"])
    rank_fail, log2, _ = submit(slurm, "train_torchrun.sbatch", tmp_path / "b",
                                 job_env(CONFIG=recipe, DATA=shards, OUT=tmp_path / "rank_fail", RDZV_PORT=free_port()),
                                 args=["train.max_steps=2", f"train.ds_config={tmp_path}/missing.json"])
    info, text = finish(slurm, bad_key, log1, t0)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", text[-4000:]
    assert "no_such_key" in text
    assert not (tmp_path / "bad_key" / "config.json").exists()
    info, text = finish(slurm, rank_fail, log2, t0)
    assert_no_leftovers(slurm, rank_fail)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", text[-6000:]
    assert "missing.json" in text and "training failed (srun exit" in text
    assert not (tmp_path / "rank_fail" / "result.json").exists()


def test_ray_sbatch_failures_reach_the_job_exit_code(slurm, shards, recipe, tmp_path, ray_temp_parent):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    # a bad key is refused before any Ray process starts
    job, log, t0 = submit(slurm, "train_ray.sbatch", tmp_path / "a", ray_env(recipe, shards, tmp_path / "bad_key", ray_temp_parent),
                           args=["train.no_such_key=1"])
    info, text = finish(slurm, job, log, t0)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", text[-4000:]
    assert "no_such_key" in text and "Ray head" not in text
    # a Ray job that fails on the cluster (its entry point refuses an option) fails the Slurm job, and the
    # cluster is stopped all the same
    job, log, t0 = submit(slurm, "train_ray.sbatch", tmp_path / "b",
                          dict(ray_env(recipe, shards, tmp_path / "job_fail", ray_temp_parent), JOB_ARGS="--no-such-option"))
    info, text = finish(slurm, job, log, t0, timeout=540)
    assert_no_leftovers(slurm, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", text[-8000:]
    assert "--no-such-option" in text and "ray job submit exited 1" in text and "Ray head stopped" in text
    assert os.listdir(ray_temp_parent) == []  # its temp and token dirs removed
