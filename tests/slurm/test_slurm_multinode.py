"""The same batch scripts on a 2-node Slurm emulated on this machine (two slurmd, `slurmd -N n1` / `-N n2`):
the multi-node paths run unchanged: two torchrun agents (one srun task per node) meet at the c10d rendezvous on
the first node; the Ray script starts a worker node on the second node through srun and stops it at the end."""

from __future__ import annotations

import json
import os

import pytest

from .harness import REPO, assert_no_leftovers, finish, job_env, non_loopback_ipv4, probe_ray_auth, ray_env, submit
from .slurm_cluster import LocalSlurm, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm2():
    with LocalSlurm(cpus=1, nodes=2) as cluster:
        yield cluster


def test_torchrun_sbatch_on_two_nodes(slurm2, shards, recipe, tmp_path):
    out = tmp_path / "run"
    job, log, t0 = submit(slurm2, "train_torchrun.sbatch", tmp_path,
                          job_env(CONFIG=recipe, DATA=shards, OUT=out, NPROC_PER_NODE=1, RDZV_PORT=free_port()),
                          args=["train.max_steps=2", "train.save_every=2"], sbatch_opts=["--nodes=2"])
    info, text = finish(slurm2, job, log, t0)
    assert_no_leftovers(slurm2, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-6000:]
    assert info["NodeList"] == "n[1-2]"
    assert "2 node(s) x 1 rank(s)" in text
    files = os.listdir(out / "checkpoints" / "step000002")
    for rank in (0, 1):
        assert any(f"zero_pp_rank_{rank}_" in f for f in files), files
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["nnodes"] == 2 and cfg["train"]["nproc"] == 1


def test_ray_sbatch_on_two_nodes(slurm2, shards, recipe, tmp_path, ray_temp_parent):
    """Also Ray's token authentication: a client without the job's token (or with another) is refused, the job API
    answers on the first node's loopback only, every temp/token dir is new and 0700, and the job still runs."""
    assert os.path.isfile(os.path.join(REPO, "ray_jobs", "train.py")), "ray_jobs/train.py (the Ray Train entry) is missing"
    out = tmp_path / "run"
    addr = non_loopback_ipv4()  # the head on this machine's network address, as on a real cluster
    env = dict(ray_env(recipe, shards, out, ray_temp_parent), RAY_NUM_CPUS=1, NPROC_PER_NODE=1, RAY_HEAD_ADDR=addr)
    job, log, t0 = submit(slurm2, "train_ray.sbatch", tmp_path, env, args=["train.max_steps=2", "train.save_every=2"],
                          sbatch_opts=["--nodes=2"])
    seen = probe_ray_auth(slurm2, job, int(env["RAY_DASHBOARD_PORT"]), addr, ray_temp_parent)
    info, text = finish(slurm2, job, log, t0, timeout=540)
    assert_no_leftovers(slurm2, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-8000:]
    assert seen["no_token"] == 401 and seen["wrong_token"] == 403 and seen["own_token"] == 200, seen
    assert seen["other_addr"] is None, seen  # the job API is not on the network address
    assert len(seen["token"]) == 64 and seen["token"] not in text, seen
    assert set(seen["modes"].values()) == {"0o700"} and seen["token_modes"] == {"0o600"}, seen
    assert any(n.startswith("rayw.") for n in seen["modes"]), seen  # the worker node's own temp dir
    assert "Ray worker node on" in text and "(n2)" in text
    # both Train workers started (Ray Train numbers node_rank by IP, and both emulated nodes share this machine's,
    # so which node each worker ran on is not visible here)
    assert "world_rank=0" in text and "world_rank=1" in text, text[-8000:]
    assert "waiting for 2 Ray node(s)" in text and "Ray head stopped" in text
    assert "Found multiple active Ray instances" not in text  # RAY_API_SERVER_ADDRESS reached the job
    assert os.listdir(ray_temp_parent) == [], text[-3000:]  # both nodes' temp and token dirs removed
    files = os.listdir(out / "checkpoints" / "step000002")
    for rank in (0, 1):
        assert any(f"zero_pp_rank_{rank}_" in f for f in files), files
