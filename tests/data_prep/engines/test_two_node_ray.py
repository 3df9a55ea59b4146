"""Prep on a 2-node Ray cluster (a loopback head plus a second `ray start` node on this machine, 1 CPU each,
both stopped by process id): both nodes run chunk tasks, and the output folder is byte-identical to the local
engine's."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.shipped_data import tiny_shipped_data
from tests.ray_jobs.ray_cluster import LocalRayCluster


def _prep(files: list[str], out, engine: str, env: dict) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "prep", *files, "--out", str(out),
                           f"data.engine={engine}", "data.workers=2", "data.seq_len=1024"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _folder_bytes(root) -> dict:
    """{relative path: bytes} of every file of a prep output but run.json (timings)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), root)
            if rel != "run.json":
                with open(os.path.join(dirpath, n), "rb") as f:
                    out[rel] = f.read()
    return out


def _chunk_task_nodes(address: str, timeout: float = 90) -> set:
    """The node ids that ran prep's chunk tasks (Ray's state API; task events arrive within seconds). A task whose
    worker reported it running on a node but whose last event was lost (a worker stopped before its event buffer
    was flushed) still counts for that node: its latest state is then RUNNING, not FINISHED."""
    from ray.util.state import list_tasks

    deadline, nodes = time.time() + timeout, set()
    while time.time() < deadline:
        tasks = list_tasks(address=address, limit=10000, raise_on_missing_output=False)
        nodes = {t.node_id for t in tasks if t.name.endswith("_chunk_pieces") and t.state in ("RUNNING", "FINISHED") and t.node_id}
        if len(nodes) >= 2:
            break
        time.sleep(1)
    return nodes


@pytest.mark.slow
def test_two_node_cluster_output_is_byte_identical_to_local(shared_data, tmp_path):
    from data_prep.scaled_corpus import write_scaled_corpus

    corpus = write_scaled_corpus(str(tiny_shipped_data(shared_data, tmp_path / "data")), str(tmp_path / "corpus"), 2)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    _prep(corpus["files"], tmp_path / "local", "local", env)
    cluster = LocalRayCluster(num_cpus=1)
    try:
        cluster.add_node(num_cpus=1)
        assert cluster.alive_nodes() == 2
        _prep(corpus["files"], tmp_path / "ray", "ray", dict(env, RAY_ADDRESS=cluster.gcs_address))
        nodes = _chunk_task_nodes(cluster.address)
    finally:
        cluster.stop()
    assert len(nodes) == 2, nodes
    local, ray = _folder_bytes(tmp_path / "local"), _folder_bytes(tmp_path / "ray")
    assert "manifest.json" in local and any(k.endswith(".parquet") for k in local)
    assert sorted(ray) == sorted(local)
    assert all(ray[k] == local[k] for k in local), [k for k in local if ray[k] != local[k]]
