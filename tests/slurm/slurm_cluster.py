"""A real single-node Slurm cluster for tests: munged, slurmctld and slurmd started with setsid under a short
temporary directory (own munge socket and key, non-default free ports, no root-owned paths touched), stopped by
the process ids it started (SIGTERM, wait, SIGKILL).

    with LocalSlurm() as slurm:
        job = slurm.sbatch(["slurm/train_torchrun.sbatch", "train.max_steps=2"], env={...}, cwd=REPO)
        info = slurm.wait(job)            # {"JobState": "COMPLETED", "ExitCode": "0:0", ...}

Needs the Debian/Ubuntu packages slurm-wlm and munge (``scripts/install-slurm.sh``); without them
:class:`SlurmMissing` says how to install them (tests fail on it, they do not skip).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "srun")
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


class SlurmMissing(RuntimeError):
    pass


def find_binary(name: str) -> str | None:
    path = shutil.which(name)
    if path:
        return path
    for d in SBIN:  # munged/slurmctld/slurmd live in sbin, which a non-root PATH may lack
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


def require_binaries() -> dict[str, str]:
    found = {name: find_binary(name) for name in BINARIES}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        raise SlurmMissing(f"Slurm binaries not found: {', '.join(missing)}. Install them with "
                           "`sudo scripts/install-slurm.sh` (apt-get install slurm-wlm munge); .ci/run does this in CI")
    return found


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A free TCP port in [low, high) (below the usual ephemeral range, above Ray's worker ports 10002-19999)."""
    for _ in range(500):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if low <= port < high:
            return port
    import random

    for _ in range(500):
        port = random.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


SLURM_CONF = """\
ClusterName=convsinktest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
JobRequeue=1
SlurmdParameters=config_overrides
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MinJobAge=3600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=60
{node_lines}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """munged + slurmctld + slurmd on this machine; ``env`` holds SLURM_CONF for the client commands.

    ``nodes=1``: one node named localhost with ``cpus`` CPUs. ``nodes=N>1``: N emulated nodes n1..nN on this
    machine (one slurmd each, ``slurmd -N nK`` on its own port; they all reach each other over 127.0.0.1), each
    with ``cpus`` CPUs: multi-node scripts run unchanged (srun places one task per "node")."""

    def __init__(self, cpus: int = 2, start_timeout: float = 60, nodes: int = 1):
        self.nodes = ["localhost"] if nodes == 1 else [f"n{i + 1}" for i in range(nodes)]
        self.bin = require_binaries()
        # short: munged's and slurmd's UNIX socket paths must stay under 107 bytes (pytest's tmp_path is too long)
        self.dir = tempfile.mkdtemp(prefix="slurm", dir="/tmp")
        os.chmod(self.dir, 0o755)
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.munge_socket = os.path.join(self.dir, "munge", "munge.socket")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        for k in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
            del self.env[k]  # a test run inside a Slurm job must not leak that job's settings into ours
        try:
            self._start(cpus, start_timeout)
        except BaseException:
            self.stop()
            raise

    # ---------------------------------------------------------------- daemons
    def _start(self, cpus: int, timeout: float) -> None:
        d = self.dir
        for sub in ("munge", "state", "spool", "log"):
            os.makedirs(os.path.join(d, sub), mode=0o700, exist_ok=True)
        key = os.path.join(d, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self._spawn("munged", [self.bin["munged"], "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/munge/munged.log",
                               f"--seed-file={d}/munge/munged.seed"])
        self._wait(lambda: os.path.exists(self.munge_socket), "munged socket", timeout, "munged")
        import pwd

        user = pwd.getpwuid(os.getuid()).pw_name
        with open(self.conf, "w") as f:
            if len(self.nodes) == 1:
                node_lines = f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN"
            else:
                host = socket.gethostname()
                node_lines = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} CPUs={cpus} "
                                       "State=UNKNOWN" for n in self.nodes)
            f.write(SLURM_CONF.format(ctld_port=free_port(), slurmd_port=free_port(), d=d, user=user, node_lines=node_lines,
                                      node_list=",".join(self.nodes), munge_socket=self.munge_socket))
        self._spawn("slurmctld", [self.bin["slurmctld"], "-D", "-i", "-f", self.conf])
        self._wait(self._ctld_up, "slurmctld", timeout, "slurmctld")
        for node in self.nodes:
            os.makedirs(os.path.join(d, "spool", node), mode=0o700, exist_ok=True)
            self._spawn(f"slurmd-{node}", [self.bin["slurmd"], "-D", "-f", self.conf, "-N", node])
        for node in self.nodes:
            self._wait(lambda: self.node_state(node) == "idle", f"node {node} idle", timeout, f"slurmd-{node}")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(os.path.join(self.dir, "log", f"{name}.out"), "wb")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # setsid: own session, no controlling terminal
        log.close()

    def _wait(self, ready, what: str, timeout: float, daemon: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.procs[daemon].poll() is not None:
                raise RuntimeError(f"{daemon} exited with {self.procs[daemon].returncode}:\n{self.logs(daemon)}")
            if ready():
                return
            time.sleep(0.3)
        raise TimeoutError(f"Slurm test cluster: {what} not ready after {timeout:.0f} s:\n{self.logs(daemon)}")

    def logs(self, daemon: str, tail: int = 4000) -> str:
        text = ""
        for path in (os.path.join(self.dir, "log", f"{daemon}.out"), os.path.join(self.dir, f"{daemon}.log"),
                     os.path.join(self.dir, "munge", "munged.log"), os.path.join(self.dir, "slurmctld.log")):
            if os.path.isfile(path) and (daemon in os.path.basename(path) or daemon.startswith("slurmd")):
                with open(path, errors="replace") as f:
                    text += f"--- {path}\n{f.read()[-tail:]}\n"
        return text

    def _ctld_up(self) -> bool:
        return self.run(["scontrol", "ping"], check=False).stdout.count("UP") >= 1

    def node_state(self, node: str = "localhost") -> str:
        return self.run(["sinfo", "-h", "-n", node, "-o", "%T"], check=False).stdout.strip()

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM the daemons this object started (slurmd, slurmctld, munged: reverse start order), wait, SIGKILL."""
        for name in [f"slurmd-{n}" for n in self.nodes] + ["slurmctld", "munged"]:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "LocalSlurm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- clients
    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        cmd = [self.bin.get(cmd[0], cmd[0])] + list(cmd[1:])
        proc = subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=kw.pop("timeout", 60), **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def sbatch(self, args: list[str], env: dict | None = None, cwd: str | None = None) -> str:
        """Submit; returns the job id. ``env`` is added to the cluster's client environment (sbatch exports it all)."""
        full = dict(self.env, **{k: str(v) for k, v in (env or {}).items()})
        out = self.run(["sbatch", "--parsable", *args], env=full, cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def show_job(self, job_id: str) -> dict[str, str]:
        text = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", text))

    def job_processes(self, job_id: str) -> list[tuple[int, str]]:
        """(pid, command) of every live process that a job of this cluster started: found by the environment Slurm
        gave it (SLURM_CONF of this cluster and SLURM_JOB_ID), which survives setsid and re-parenting, and
        which Ray's workers inherit from their raylet."""
        want = {f"SLURM_CONF={self.conf}".encode(), f"SLURM_JOB_ID={job_id}".encode()}
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    env = set(f.read().split(b"\0"))
                if not want <= env:
                    continue
                with open(f"/proc/{name}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        continue
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    found.append((int(name), f.read().replace(b"\0", b" ").decode(errors="replace")[:200]))
            except OSError:
                continue
        return found

    def wait(self, job_id: str, timeout: float = 600, poll: float = 1.0) -> dict[str, str]:
        """Poll squeue until the job leaves the queue (faster than sbatch --wait), then return `scontrol show job`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            q = self.run(["squeue", "-h", "-j", job_id, "-o", "%T"], check=False)
            if q.returncode == 0 and not q.stdout.strip():
                break
            if q.returncode != 0 and "Invalid job id" not in q.stderr:
                raise RuntimeError(f"squeue failed: {q.stderr.strip()}")
            time.sleep(poll)
        else:
            self.run(["scancel", job_id], check=False)
            raise TimeoutError(f"job {job_id} still running after {timeout:.0f} s (cancelled)")
        info = self.show_job(job_id)
        for _ in range(20):  # the state may lag squeue's by a moment
            if info.get("JobState") not in ("RUNNING", "COMPLETING", "PENDING", "CONFIGURING"):
                break
            time.sleep(0.5)
            info = self.show_job(job_id)
        return info
