"""A Ray head on loopback for tests, in a short temporary directory, and optionally more nodes joined to it
(`add_node`: a second `ray start --address ... --block` on this machine), all stopped by the process ids they
started (never `ray stop`, which is machine-wide)."""

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
        self.cpus = num_cpus  # the whole cluster's CPUs, the head's and those of the nodes added
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
        self.gcs_address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen] = []  # `ray start --address` processes of the nodes added
        self._wait_ready()

    def add_node(self, num_cpus: int = 1, timeout: float = 120) -> None:
        """Join one more node to this cluster (`ray start --address HEAD --block`, loopback, its own free ports),
        wait until the head counts it alive, then until its CPUs are in the cluster's resource view (a raylet is
        alive before the schedulers learn its resources: tasks scheduled in between see one node fewer)."""
        ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        ports = {flag: str(free_port()) for flag in ("--node-manager-port", "--object-manager-port",
                                                    "--metrics-export-port", "--dashboard-agent-listen-port",
                                                    "--dashboard-agent-grpc-port", "--runtime-env-agent-port")}
        self.nodes.append(subprocess.Popen(
            [ray_bin, "start", "--address", self.gcs_address, "--block", "--node-ip-address", "127.0.0.1",
             "--num-cpus", str(num_cpus), *[x for kv in ports.items() for x in kv]],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        deadline = time.time() + timeout
        while self._alive_or_zero() < 1 + len(self.nodes):
            if self.nodes[-1].poll() is not None:
                raise RuntimeError(f"ray start --address exited with {self.nodes[-1].returncode}")
            if time.time() > deadline:
                raise TimeoutError("the added Ray node did not join")
            time.sleep(1)
        self.cpus += num_cpus
        self._wait_cpus(self.cpus, max(1.0, deadline - time.time()))

    def _wait_cpus(self, cpus: int, timeout: float) -> None:
        """Until a driver connected to the head sees ``cpus`` CPUs in the cluster (``ray.cluster_resources()``),
        asked from a child process so that this process never holds a Ray connection."""
        code = ("import sys, time, ray\n"
                "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
                "deadline = time.time() + float(sys.argv[3])\n"
                "while ray.cluster_resources().get('CPU', 0) < float(sys.argv[2]):\n"
                "    if time.time() > deadline:\n"
                "        sys.exit(f\"the cluster's resource view shows {ray.cluster_resources().get('CPU', 0)} CPUs\")\n"
                "    time.sleep(0.5)\n")
        proc = subprocess.run([sys.executable, "-c", code, self.gcs_address, str(cpus), str(timeout)], env=self.env,
                              capture_output=True, text=True, timeout=timeout + 60)
        if proc.returncode != 0:
            raise TimeoutError(f"the added Ray node's CPUs did not reach the resource view: {proc.stderr.strip()[-500:]}")

    def _alive_or_zero(self) -> int:
        try:
            return self.alive_nodes()
        except OSError:  # the dashboard is busy: ask again
            return 0

    def alive_nodes(self) -> int:
        """How many nodes the head's dashboard reports alive."""
        import json
        import urllib.request

        with urllib.request.urlopen(f"{self.address}/nodes?view=summary", timeout=5) as r:
            summary = json.load(r)["data"]["summary"]
        return sum(1 for n in summary if n.get("raylet", {}).get("state") == "ALIVE")

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
        """SIGTERM every process this cluster started (the `ray start --block` processes of the added nodes and of
        the head, and their descendants), wait, then SIGKILL what is left."""
        procs = []
        for started in [*self.nodes, self.proc]:
            try:
                procs += [psutil.Process(started.pid)] + psutil.Process(started.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
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
