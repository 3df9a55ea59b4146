"""`convsink bench attention` runs for real (small sizes) and writes what it says."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_attention_writes_json(tmp_path, shared_data):
    out = tmp_path / "attn.json"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "attention", "--out", str(out), "--seq-lens", "512",
                           "1024", "--repeats", "1", "--heads", "1", "--head-dim", "8"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert [r["T"] for r in result["summary"]] == [512, 1024]  # above the 256-query chunk
    for r in result["summary"]:
        assert r["sink_s"] > 0 and r["dense_mask_s"] > 0 and r["causal_s"] > 0
        assert 0 < r["key_fraction_computed"] < 1
    assert result["summary"][1]["key_fraction_computed"] < result["summary"][0]["key_fraction_computed"]
    assert "speedup" in proc.stdout or "x vs dense-mask" in proc.stdout
