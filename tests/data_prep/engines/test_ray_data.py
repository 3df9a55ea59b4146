"""The Ray Data engine writes exactly the bytes of the single-process reference engine, with any worker count."""

from __future__ import annotations

import json

import pytest

from data_prep.config import DataConfig
from data_prep.prep import prepare

SEQ_LEN = 1024


@pytest.mark.slow
def test_ray_output_is_byte_identical_with_1_and_2_workers_and_local(all_inputs, tmp_path):
    kw = dict(seq_len=SEQ_LEN, smr={"samples": 40}, lmr={"samples": 40}, chunk_records=32, memory_chunk=16, shard_rows=128)
    outs = {}
    for name, cfg in (("w1", DataConfig(engine="ray", workers=1, **kw)), ("w2", DataConfig(engine="ray", workers=2, **kw)),
                      ("local", DataConfig(engine="local", **kw))):
        outs[name] = tmp_path / name
        prepare(all_inputs, str(outs[name]), cfg, progress=False)
    assert json.loads((outs["w2"] / "run.json").read_text())["workers"] == 2
    files = sorted(p.name for p in outs["w1"].iterdir() if p.is_file() and p.name != "run.json")
    assert "manifest.json" in files and "smr-00000.parquet" in files and "lmr-00000.parquet" in files
    assert len([f for f in files if f.startswith("dialogue-")]) > 2
    for name in files:
        assert (outs["w1"] / name).read_bytes() == (outs["w2"] / name).read_bytes() == (outs["local"] / name).read_bytes(), name
