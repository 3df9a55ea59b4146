"""`convsink bench memory` runs for real on the tiny model: every configuration reports its figures per point, an
over-cap point is reported as not fitting (never dropped), and the sweep stops there."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.bench.memory import DEFAULT_CONFIGS, fitted_exponent
from tests.repo import REPO


def _bench(tmp_path, name: str, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / name
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "memory", "--model", "tiny", "--out", str(out),
                           "--loss-chunk", "64", "--threads", "1", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads(out.read_text())


def test_every_configuration_reports_each_point(tmp_path, shared_data):
    proc, result = _bench(tmp_path, "mem.json", "--seq-lens", "128", "256")
    assert (tmp_path / "mem.png").stat().st_size > 0
    points = {(p["config"], p["T"]): p for p in result["points"]}
    assert set(points) == {(c, T) for c in DEFAULT_CONFIGS for T in (128, 256)}
    for p in points.values():
        assert p["fits"] and 0 < p["max_rss_seen_gb"] <= p["cap_gb"]
        assert p["peak_rss_gb"] > p["rss_before_step_gb"] > 0
        assert p["step_seconds"] > 0 and p["step_cpu_seconds"] > 0 and abs(p["tokens_per_s"] - p["T"] / p["step_seconds"]) < 1e-6 * p["tokens_per_s"]
        assert 5 < p["loss"] < 20  # random init over a ~49k vocabulary: about ln(49152) = 10.8
    # the same row and model: the sink attention and the dense mask give the same loss; causal SDPA another one
    for T in (128, 256):
        assert abs(points[("sink", T)]["loss"] - points[("dense_mask", T)]["loss"]) < 1e-4
        assert abs(points[("sink", T)]["loss"] - points[("sink_ckpt_tiled", T)]["loss"]) < 1e-4
        assert abs(points[("sink", T)]["loss"] - points[("causal_ckpt_tiled", T)]["loss"]) > 1e-4
    assert {c: s["longest_T_fit"] for c, s in result["summary"].items()} == {c: 256 for c in DEFAULT_CONFIGS}
    assert [r["T"] for r in result["throughput"]] == [128, 256]
    assert all(r["sink_over_causal_cpu_time"] > 0 for r in result["throughput"])
    assert "| sink / causal (wall) |" in proc.stdout


def test_over_cap_point_does_not_fit_and_ends_the_sweep(tmp_path, shared_data):
    _, result = _bench(tmp_path, "capped.json", "--seq-lens", "128", "256", "--configs", "sink_ckpt_tiled",
                       "--cap-gb", "0.05")
    assert len(result["points"]) == 1  # 256 is not tried once 128 did not fit
    (p,) = result["points"]
    assert p["T"] == 128 and p["fits"] is False and "cap" in p["reason"]
    assert result["summary"]["sink_ckpt_tiled"] == {"longest_T_fit": None, "first_T_not_fit": 128,
                                                     "peak_exponent": None, "step_memory_exponent": None}


def test_the_tiled_mlp_configuration_runs_when_named_and_changes_no_loss(tmp_path, shared_data):
    _, result = _bench(tmp_path, "mlp.json", "--seq-lens", "256", "--configs", "sink_ckpt_tiled", "sink_ckpt_tiled_mlp")
    (plain, tiled) = result["points"]  # --loss-chunk 64: four MLP chunks of the 256-token row
    assert (plain["config"], tiled["config"]) == ("sink_ckpt_tiled", "sink_ckpt_tiled_mlp") and tiled["fits"]
    assert result["setting"]["configs"]["sink_ckpt_tiled_mlp"]["tiled_mlp"] is True
    layers = result["setting"]["model_config"]["num_hidden_layers"]
    assert (plain["tiled_mlp_layers"], tiled["tiled_mlp_layers"]) == (0, layers)  # read off the point's model
    assert abs(plain["loss"] - tiled["loss"]) < 1e-5


def test_fitted_exponent_reads_the_growth():
    assert abs(fitted_exponent([1, 2, 4, 8], [3, 6, 12, 24]) - 1) < 1e-12
    assert abs(fitted_exponent([1, 2, 4], [1, 4, 16]) - 2) < 1e-12
    assert fitted_exponent([8], [1]) is None


FREED_RSS = """
import sys, torch
from pipeline.bench.memory import _vm_rss_gb, release_freed_memory
import os
allocator = release_freed_memory() if sys.argv[1] == "release" else "default"
big = torch.ones(16 * 2**18)  # 16 MiB freed: glibc then raises its mmap threshold to 16 MiB
del big
before = _vm_rss_gb(os.getpid())
blocks, kept = [], []
for _ in range(150):  # 150 blocks of 2 MiB (300 MiB), as a layer's activations, between small tensors that live on
    blocks.append(torch.ones(2 * 2**18))
    kept.append(torch.ones(8 * 2**10))
del blocks
print(allocator, round((_vm_rss_gb(os.getpid()) - before) * 1024))
"""


def test_release_freed_memory_returns_a_steps_freed_activations_to_the_os():
    """The glibc behaviour that inflated the CPU memory bench: after a large block is freed, mid-sized blocks come from
    the heap and stay resident once freed; with ``release_freed_memory`` they go back to the OS."""
    kept = {}
    for mode in ("default", "release"):
        proc = subprocess.run([sys.executable, "-c", FREED_RSS, mode], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        allocator, mib = proc.stdout.strip().rsplit(" ", 1)
        kept[mode] = (allocator, int(mib))
    assert kept["default"][1] > 200, kept  # 300 MiB freed, still resident
    assert kept["release"][0].startswith("glibc mallopt") and kept["release"][1] < 20, kept


def test_resume_refuses_points_measured_with_the_other_allocator_setting(tmp_path):
    from pipeline.bench.memory import bench_memory

    out = tmp_path / "mem.json"
    out.write_text(json.dumps({"setting": {"release_freed_memory": False},
                               "points": [{"config": "sink", "T": 128, "fits": True}]}))
    with pytest.raises(ValueError, match="release_freed_memory=False; resume with the same allocator setting"):
        bench_memory("tiny", str(out), seq_lens=[128], configs=("sink",), resume=True)
    assert json.loads(out.read_text())["points"] == [{"config": "sink", "T": 128, "fits": True}]  # left as it was
