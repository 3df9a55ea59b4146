"""Helpers of the Slurm tests: submit a batch script of slurm/ with an environment, wait for it, check that
nothing it started outlives it."""

from __future__ import annotations

import glob
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
    for _ in range(60):  # a Ray worker exits within seconds of its raylet, up to ~15 s on a loaded machine
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


def ray_env(recipe, shards, out, temp_parent):
    """The Ray script's environment; ``temp_parent``: a short folder of the test's own where every node of the job
    makes its Ray temp dir and token dir (socket paths must stay under 107 bytes)."""
    return job_env(CONFIG=recipe, DATA=shards, OUT=out, RAY_NUM_CPUS=4, RAY_TEMP_PARENT=temp_parent,
                   RAY_PORT=free_port(), RAY_DASHBOARD_PORT=free_port(), RAY_CLIENT_PORT=free_port(),
                   RAY_DASHBOARD_AGENT_PORT=free_port(), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")


def http_status(url: str, token: str | None = None) -> int | None:
    """The HTTP status of a GET (None when nothing answers: refused, reset, timed out)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def probe_ray_auth(slurm, job, port: int, other_addr: str, temp_parent: str, timeout: float = 300) -> dict:
    """While the job's Ray cluster runs: what its job API answers without a token, with a wrong one, with the job's
    own (read from the head's token dir), whether it answers on ``other_addr`` (a non-loopback address of this
    machine), and the modes of the temp/token dirs the job made under ``temp_parent``."""
    deadline = time.time() + timeout
    url = f"http://127.0.0.1:{port}/api/jobs/"
    while time.time() < deadline:
        status = http_status(url)
        tokens = sorted(glob.glob(os.path.join(temp_parent, "ray*", "token")))
        if status is not None and tokens:
            token = open(tokens[0]).read()
            return {"no_token": status, "wrong_token": http_status(url, "0" * 64), "own_token": http_status(url, token),
                    "other_addr": http_status(f"http://{other_addr}:{port}/api/jobs/", token), "token": token,
                    "modes": {os.path.basename(p): oct(os.stat(p).st_mode & 0o777) for p in glob.glob(f"{temp_parent}/*")},
                    "token_modes": {oct(os.stat(t).st_mode & 0o777) for t in tokens}}
        assert slurm.show_job(job)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), slurm.show_job(job)
        time.sleep(0.5)
    raise TimeoutError(f"job {job}: the Ray job API never answered on 127.0.0.1:{port}")


def non_loopback_ipv4() -> str:
    """An IPv4 address of this machine other than 127.x (the one a default route would use)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
        addr = s.getsockname()[0]
    assert not addr.startswith("127."), addr
    return addr


