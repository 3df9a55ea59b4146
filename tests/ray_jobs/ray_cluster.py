"""A Ray head on loopback for tests, in a short temporary directory, stopped by the process ids it started
(never `ray stop`, which is machine-wide)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil


def free_port(low: int = 20000) -> int:
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= low:
            return port
    raise RuntimeError("no free port")


class LocalRayCluster:
    def __init__(self, num_cpus: int = 4):
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        self.port, self.dashboard_port, self.client_port = free_port(), free_port(), free_port()
        self.env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        self.env.pop("RAY_ADDRESS", None)
        ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        self.proc = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", "--port", str(self.port), "--node-ip-address", "127.0.0.1",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
             "--ray-client-server-port", str(self.client_port), "--temp-dir", self.temp_dir, "--num-cpus", str(num_cpus),
             # the agents' default ports (52365, ...) are taken when another cluster runs on this machine: then the
             # job agent never starts ("No available agent to submit job")
             "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
             "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=2):
                    return
            except OSError:
                time.sleep(1)
        raise TimeoutError("the Ray head did not come up")

    def submit(self, entrypoint: list[str], working_dir: str, timeout: float = 600) -> subprocess.CompletedProcess:
        ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        runtime_env = '{"excludes": [".venv", ".git", "runs", "bench", "*.parquet"], "env_vars": {"WANDB_MODE": "offline", "RAY_AUTH_MODE": "disabled"}}'
        cmd = [ray_bin, "job", "submit", "--address", self.address, "--working-dir", working_dir,
               "--runtime-env-json", runtime_env, "--", *entrypoint]
        for _ in range(72):  # the dashboard answers before its job agent is up: minutes on a loaded machine
            proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
            if proc.returncode == 0 or "No available agent to submit job" not in proc.stderr + proc.stdout:
                return proc
            time.sleep(5)
        return proc

    def stop(self) -> None:
        """SIGTERM every process this cluster started (the `ray start --block` process and its descendants),
        wait, then SIGKILL what is left."""
        try:
            procs = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=20)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
