"""Slurm jobs survive the cluster (real slurmd): a torchrun job requeued mid-run (`scontrol requeue`), and one stopped
by its time limit (the script asks for `--signal=B:USR1@300`: slurmctld itself sends SIGUSR1 when 300 s of the time
limit are left), both resume by default and finish with final weights equal to those of an uninterrupted run.

The time-limited job is submitted with `--time=5 --signal=B:USR1@290` (overriding the script's `@300`): Slurm's
own time-limit check (every 30 s) signals it 10-40 s into its run, whether or not it has saved yet (the ranks save at
the next step boundary). A requeued job keeps its time limit, so once it is requeued the test gives it a long limit
back (else: signalled again 10-40 s into its second start). The test cluster sets cred_expire=10 so that a requeued
job may start again after 10 s (Slurm's default: 120 s)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from .harness import assert_no_leftovers, finish, job_env, submit
from .slurm_cluster import LocalSlurm, free_port

pytestmark = pytest.mark.slow

STEPS = 30


@pytest.fixture(scope="module")
def slurm():
    with LocalSlurm(cpus=6) as cluster:  # three 2-rank jobs side by side
        yield cluster


def final_weights(out) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root = out / "checkpoints"
    tag = (root / "latest").read_text().strip()
    assert tag == f"step{STEPS:06d}", tag
    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)


def start(slurm, shards, recipe, tmp_path, name, sbatch_opts=()):
    (tmp_path / name).mkdir()
    out = tmp_path / name / "run"
    env = job_env(CONFIG=recipe, DATA=shards, OUT=out, RDZV_PORT=free_port())
    job, log, t0 = submit(slurm, "train_torchrun.sbatch", tmp_path / name, env,
                          sbatch_opts=["--cpus-per-task=2", *sbatch_opts],
                          args=[f"train.max_steps={STEPS}", "train.save_every=2"])
    return out, job, log, t0


def when_checkpointed(out, job, slurm, timeout=300):
    """Wait until the run holds a complete checkpoint (and so is mid-run)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        latest = out / "checkpoints" / "latest"
        if latest.is_file():
            return latest.read_text().strip()
        assert slurm.show_job(job)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), slurm.show_job(job)
        time.sleep(0.2)
    raise TimeoutError(f"job {job} saved no checkpoint in {timeout} s")


def restore_time_limit(job, slurm, timeout=400) -> None:
    """When the requeued job runs again, give it a long limit back (else: signalled again 60 s into its start)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = slurm.show_job(job)
        if info["Restarts"] == "1" and info["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"):
            slurm.run(["scontrol", "update", f"JobId={job}", "TimeLimit=30"])
            return
        assert info["JobState"] in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "COMPLETING"), info
        time.sleep(0.2)
    raise TimeoutError(f"job {job} was not requeued by its time limit within {timeout} s")


def test_requeued_and_time_limited_jobs_resume_and_match_an_uninterrupted_run(slurm, shards, recipe, tmp_path):
    ref_out, ref_job, ref_log, t0 = start(slurm, shards, recipe, tmp_path, "reference")
    rq_out, rq_job, rq_log, _ = start(slurm, shards, recipe, tmp_path, "requeued")
    sig_out, sig_job, sig_log, _ = start(slurm, shards, recipe, tmp_path, "time-limited",
                                         sbatch_opts=["--time=5", "--signal=B:USR1@290"])  # USR1 10-40 s in

    rq_at = when_checkpointed(rq_out, rq_job, slurm)
    slurm.run(["scontrol", "requeue", rq_job])  # what an admin, or a pre-emption with PreemptMode=REQUEUE, does
    print(f"requeued after {rq_at}")
    restore_time_limit(sig_job, slurm)  # slurmctld signalled it (its time limit), it saved and requeued itself

    results = {}
    for name, job, log in (("reference", ref_job, ref_log), ("requeued", rq_job, rq_log), ("time-limited", sig_job, sig_log)):
        info, text = finish(slurm, job, log, t0, timeout=600)
        assert_no_leftovers(slurm, job)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{name}:\n{text[-6000:]}"
        results[name] = info, text

    assert results["reference"][0]["Restarts"] == "0"
    for name in ("requeued", "time-limited"):
        info, text = results[name]
        assert info["Restarts"] == "1", (name, info)
        assert "(restart 0)" in text and "(restart 1)" in text and "resume 1" in text, f"{name}:\n{text[-6000:]}"
    signalled = results["time-limited"][1]
    assert "SIGUSR1: asking the ranks to save" in signalled and "requeueing job" in signalled, signalled[-6000:]
    stopped = int(signalled.split("stopped after step ", 1)[1].split()[0])
    assert 0 < stopped < STEPS
    # the second start continued from the step the time-limit signal stopped the first at (a save made for the stop)
    resumed = json.loads((sig_out / f"history-rank0-from{stopped}.json").read_text())
    assert [h["step"] for h in resumed] == list(range(stopped + 1, STEPS + 1))
    assert not (sig_out / ".stop-request").exists()

    reference = final_weights(ref_out)
    for out in (rq_out, sig_out):
        weights = final_weights(out)
        assert weights.keys() == reference.keys()
        for k, v in reference.items():
            assert torch.equal(weights[k], v), (out, k, (weights[k] - v).abs().max())
