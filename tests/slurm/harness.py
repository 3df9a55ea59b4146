"""Helpers of the Slurm tests: submit a batch script of slurm/ with an environment, wait for it, check that
nothing it started outlives it."""

from __future__ import annotations

import os
import sys
import time

from tests.repo import REPO

from .slurm_cluster import free_port


def job_env(**kw) -> dict:
    env = {"PYTHON": sys.executable, "WANDB_MODE": "offline", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.update({k: str(v) for k, v in kw.items()})
    return env


def submit(slurm, script, tmp_path, env, args=(), sbatch_opts=()):
    log = tmp_path / "slurm-%j.out"
    t0 = time.time()
    job = slurm.sbatch([f"--output={log}", *sbatch_opts, os.path.join(REPO, "slurm", script), *args], env=env, cwd=REPO)
    return job, str(log).replace("%j", job), t0


def finish(slurm, job, log, t0, timeout=480):
    info = slurm.wait(job, timeout=timeout)
    text = open(log, errors="replace").read() if os.path.exists(log) else "(no job output)"
    print(f"job {job}: {info.get('JobState')} ExitCode={info.get('ExitCode')} in {time.time() - t0:.1f} s")
    return info, text


def assert_no_leftovers(slurm, job):
    """Nothing the job started outlives it (proctrack/linuxproc lets daemonized processes escape a job)."""
    left = []
    for _ in range(20):
        left = slurm.job_processes(job)
        if not left:
            return
        time.sleep(0.5)
    for pid, _ in left:  # clean up this test's own leftovers before failing
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    raise AssertionError(f"processes of job {job} still running after it ended: {left}")


def ray_env(recipe, shards, out):
    return job_env(CONFIG=recipe, DATA=shards, OUT=out, RAY_NUM_CPUS=4, RAY_TEMP_DIR=f"/tmp/rs{os.getpid()}",
                RAY_PORT=free_port(), RAY_DASHBOARD_PORT=free_port(), RAY_CLIENT_PORT=free_port(),
                RAY_DASHBOARD_AGENT_PORT=free_port(), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")


