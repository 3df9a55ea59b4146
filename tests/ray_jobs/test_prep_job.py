"""`ray job submit` of the prep job to a loopback Ray head started by the test (stopped by its process ids, never
`ray stop`): the same bytes as a run of the same entry point on the local engine (byte-identical to the embedded
Ray's, tests/data_prep/engines/test_ray_data.py); bad input fails the job with FILE:LINE."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
from tests.repo import REPO

ARGS = ["data.seq_len=1024", "data.max_dialogues=150", "data.smr.samples=10", "data.lmr.samples=10"]


def _submit(cluster, entrypoint):
    return cluster.submit(entrypoint, REPO, timeout=900)


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != "run.json"}


def test_ray_job_submit_prep_equals_a_local_engine_run(cluster, shared_data, tmp_path):
    inputs = [str(shared_data / "personachat" / "valid.json"), str(shared_data / "msc" / "session_2_*.jsonl")]
    job_out = tmp_path / "job"
    proc = _submit(cluster, [sys.executable, "-m", "ray_jobs.prep", *inputs, "--out", str(job_out), *ARGS])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in (proc.stdout + proc.stderr).lower()
    local = tmp_path / "local"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ref = subprocess.run([sys.executable, "-m", "ray_jobs.prep", *inputs, "--out", str(local), "--engine", "local", *ARGS],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    job_files, local_files = _files(job_out), _files(local)
    assert job_files.keys() == local_files.keys() and "manifest.json" in job_files and "lmr-00000.parquet" in job_files
    assert job_files == local_files, "byte-identical shards and manifest"
    assert len(json.loads(job_files["manifest.json"])["inputs"]) == 3  # the glob matched both session_2 files
    assert json.loads((job_out / "run.json").read_text())["engine"] == "ray"


def test_ray_job_bad_input_fails_with_file_and_line(cluster, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"id": "a", "turns": [{"text": "fine"}]}) + "\n{oops\n")
    proc = _submit(cluster, [sys.executable, "-m", "ray_jobs.prep", str(src), "--out", str(tmp_path / "o")])
    assert proc.returncode != 0
    assert f"{src}:2: malformed JSON" in proc.stdout + proc.stderr
    assert not (tmp_path / "o").exists()
