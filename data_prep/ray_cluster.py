"""The one way convsink reaches Ray: join the cluster of ``RAY_ADDRESS`` (set inside ``ray job submit``), or start
an embedded local Ray (auth off, no usage stats, no dashboard unless asked, a short temp dir removed at exit). It
never joins a cluster by accident (``address="local"``, not a cluster an earlier ``ray start`` left behind)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile


def ensure_ray(num_cpus: int | None = None, worker_logs: bool = True, temp_tag: str = "cs", dashboard: bool = False):
    """The ``ray`` module, initialized. ``num_cpus``: CPUs of an embedded Ray (default: this machine's);
    ``worker_logs=False`` keeps the workers' output off the driver (prep prints its own progress line);
    ``temp_tag`` names the embedded Ray's temp dir ``/tmp/ray-<tag>-XXXXXXXX`` (``embedded_temp_dir``);
    ``dashboard=True`` starts an embedded Ray's dashboard on a free loopback port (Ray Train's state queries need it:
    without, its PlacementGroupCleaner warns every second)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = {} if worker_logs else {"log_to_driver": False, "configure_logging": False}
    if not worker_logs:
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    import ray

    if ray.is_initialized():
        return ray
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
        return ray
    tmp = embedded_temp_dir(temp_tag)
    cpus = {"num_cpus": max(num_cpus, os.cpu_count() or 1)} if num_cpus is not None else {}
    board = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": _free_port()} if dashboard \
        else {"include_dashboard": False}
    ray.init(address="local", _temp_dir=tmp, **board, **cpus, **quiet)

    def _cleanup():
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(_cleanup)
    return ray


def embedded_temp_dir(temp_tag: str) -> str:
    """A new 0700 folder ``/tmp/ray-<tag>-XXXXXXXX`` for an embedded Ray (``mkdtemp``: never one someone else made
    first; short, as AF_UNIX socket paths are limited to 107 bytes)."""
    return tempfile.mkdtemp(prefix=f"ray-{temp_tag}-", dir="/tmp")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
