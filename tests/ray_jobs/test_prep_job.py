"""`ray job submit` of the prep job to a loopback Ray head started by the test: same output as the embedded run."""

from __future__ import annotations

import json
import os
import sys

import psutil
import pytest

from data_prep.config import DataConfig
from data_prep.prep import prepare

from .ray_cluster import LocalRayCluster

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cluster():
    c = LocalRayCluster()
    pids = [c.proc.pid] + [p.pid for p in psutil.Process(c.proc.pid).children(recursive=True)]
    yield c
    c.stop()
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_ray_job_submit_prep_equals_embedded_run(cluster, shared_data, tmp_path):
    inputs = [str(shared_data / "personachat" / "valid.json"), str(shared_data / "msc" / "session_2_test.jsonl")]
    job_out = tmp_path / "job"
    proc = cluster.submit([sys.executable, "-m", "ray_jobs.prep", *inputs, "--out", str(job_out), "data.seq_len=1024",
                           "data.max_dialogues=200"], REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    embedded = tmp_path / "embedded"
    prepare(inputs, str(embedded), DataConfig(seq_len=1024, max_dialogues=200, engine="local"), progress=False)
    job_m, emb_m = (json.loads((d / "manifest.json").read_text()) for d in (job_out, embedded))
    assert job_m["config"]["engine"] == "ray"
    assert [s["sha256"] for s in job_m["shards"]] == [s["sha256"] for s in emb_m["shards"]]
    assert job_m["counts"] == emb_m["counts"]
