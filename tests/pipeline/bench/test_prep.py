"""`bench_prep` runs end to end on a small copy of the data and reports what it says."""

from __future__ import annotations

import json

import pytest

from tests.shipped_data import tiny_shipped_data


@pytest.mark.slow
def test_bench_prep_small(shared_data, tmp_path):
    from pipeline.bench.prep import bench_prep

    data = tiny_shipped_data(shared_data, tmp_path / "data")
    out = tmp_path / "b.json"
    r = bench_prep(str(out), data_dir=str(data), workers=2, repeats=1)
    assert json.loads(out.read_text()) == r
    assert set(r["engines"]) == {"local", "ray_1_worker", "ray_2_workers"} and r["identical_output_across_engines"]
    assert all(e["tokens"] == r["engines"]["local"]["tokens"] > 0 for e in r["engines"].values())
    assert set(r["packing"]) == {"2048", "8192"} and all(0.5 < p["packing_efficiency"] <= 1 for p in r["packing"].values())
    assert r["ray_speedup_vs_single_process"] > 0 and len(r["effective_cores_probes"]) == 1
