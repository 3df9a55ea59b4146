"""`bench_prep` runs end to end on a small copy of the data and reports what it says."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_bench_prep_small(shared_data, tmp_path):
    from pipeline.bench.prep import bench_prep

    data = tmp_path / "data"
    (data / "msc").mkdir(parents=True)
    (data / "personachat").mkdir()
    pc = json.loads((shared_data / "personachat" / "valid.json").read_text())
    (data / "personachat" / "valid.json").write_text(json.dumps(dict(list(pc.items())[:50]), indent=2))
    for name in ("session_2_test.jsonl", "session_3_test.jsonl"):
        lines = (shared_data / "msc" / name).read_text().splitlines()[:40]
        (data / "msc" / name).write_text("\n".join(lines) + "\n")
    out = tmp_path / "b.json"
    r = bench_prep(str(out), data_dir=str(data), workers=2, repeats=1)
    assert json.loads(out.read_text()) == r
    assert set(r["engines"]) == {"local", "ray_1_worker", "ray_2_workers"} and r["identical_output_across_engines"]
    assert all(e["tokens"] == r["engines"]["local"]["tokens"] > 0 for e in r["engines"].values())
    assert set(r["packing"]) == {"2048", "8192"} and all(0.5 < p["packing_efficiency"] <= 1 for p in r["packing"].values())
    assert r["ray_speedup_vs_single_process"] > 0 and len(r["effective_cores_probes"]) == 1
