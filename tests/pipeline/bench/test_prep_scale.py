"""`convsink bench prep --scale N` end to end on a tiny shipped-like data folder: the JSON it writes (corpus,
both engines in their own processes, the effective-cores probes, efficiency, the driver-memory points) and the
exact command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.shipped_data import tiny_shipped_data


@pytest.mark.slow
def test_bench_prep_scale_writes_efficiency_probe_and_driver_memory(shared_data, tmp_path):
    data = tiny_shipped_data(shared_data, tmp_path / "data")
    out, corpus = tmp_path / "scale.json", tmp_path / "corpus"
    argv = ["bench", "prep", "--scale", "2", "--out", str(out), "--corpus-dir", str(corpus)]
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, CONVSINK_SHARED_DATA=str(data)), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "efficiency" in proc.stdout and "local prep of" in proc.stderr  # the summary, and progress lines
    r = json.loads(out.read_text())
    assert r["command"] == "convsink " + " ".join(argv)
    c = r["corpus"]
    assert c["copies"] == 2 and c["records"] == 2 * 120 and c["bytes"] == sum(os.path.getsize(p) for p in c["files"])
    assert json.loads((corpus / "corpus.json").read_text())["sha256"] == c["sha256"]  # kept for reuse
    local, ray1, ray = r["engines"]["local"], r["engines"]["ray_1_worker"], r["engines"]["ray_2_workers"]
    assert local["tokens"] == ray1["tokens"] == ray["tokens"] > 0 and r["identical_output_across_engines"]
    assert ray["ray_init_seconds"] > 0 == local["ray_init_seconds"] and ray["workers_peak_rss_sum_mb"] > 0
    assert len(r["effective_cores_probes"]) == 4 and all(0 < p <= 2.0 for p in r["effective_cores_probes"])
    speedup = ray["tokens_per_s"] / local["tokens_per_s"]
    assert r["efficiency"] == pytest.approx(speedup / r["effective_cores"], abs=2e-3)
    scaling = ray["tokens_per_s"] / ray1["tokens_per_s"]
    assert r["scaling_efficiency"] == pytest.approx(scaling / r["effective_cores"], abs=2e-3)
    assert r["meets_target"] == (min(r["efficiency"], r["scaling_efficiency"]) >= 0.85)
    m = r["driver_memory"]
    assert [p["copies"] for p in m["points"]] == [1, 2] and all(p["driver_peak_rss_mb"] > 100 for p in m["points"])
    big, small = m["points"][-1], m["points"][0]
    assert m["driver_rss_mb_per_100mb_corpus"] == pytest.approx(
        100 * (big["driver_peak_rss_mb"] - small["driver_peak_rss_mb"]) / (big["corpus_mb"] - small["corpus_mb"]), abs=0.01)
