"""One loopback Ray head for every `ray job submit` test of this folder (started once: each start and stop costs
10-30 s on this machine), stopped by its process ids after the folder's last test; none of its processes may outlive it."""

from __future__ import annotations

import psutil
import pytest

from .ray_cluster import LocalRayCluster


@pytest.fixture(scope="package")
def cluster():
    c = LocalRayCluster()
    pids = [c.proc.pid] + [p.pid for p in psutil.Process(c.proc.pid).children(recursive=True)]
    try:
        yield c
    finally:
        c.stop()
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
