"""`convsink bench attention` runs for real (small sizes) and writes what it says."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.repo import REPO


def test_bench_attention_writes_json(tmp_path, shared_data):
    out = tmp_path / "attn.json"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "attention", "--out", str(out), "--seq-lens", "512",
                           "1024", "--repeats", "3", "--rounds", "2", "--min-seconds", "0", "--heads", "2", "--kv-heads", "1", "--head-dim", "8"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert (result["setting"]["heads"], result["setting"]["kv_heads"]) == (2, 1)  # grouped-query attention, as SmolLM2
    assert not any("error" in r for r in result["rows"])
    assert [r["T"] for r in result["summary"]] == [512, 1024]  # above the 128-query chunk
    for r in result["summary"]:
        assert r["sink_s"] > 0 and r["dense_mask_s"] > 0 and r["causal_s"] > 0
        assert 0 < r["key_fraction_computed"] < 1
        rows = {m: next(x for x in result["rows"] if (x["method"], x["T"]) == (m, r["T"])) for m in ("sink", "causal")}
        assert [len(x["all_seconds"]) for x in rows.values()] == [6, 6] and all(x["rounds"] == 2 for x in rows.values())
        for x in rows.values():  # two rounds of three runs: each round's first run is a cold start
            assert x["warm_seconds"] == x["all_seconds"][1:3] + x["all_seconds"][4:6]
            assert x["seconds"] == min(x["all_seconds"])
        median = {m: sorted(x["warm_seconds"])[1] / 2 + sorted(x["warm_seconds"])[2] / 2 for m, x in rows.items()}
        assert abs(r["speedup_vs_causal_median"] - median["causal"] / median["sink"]) < 1e-9  # runs after the cold ones
    assert result["summary"][1]["key_fraction_computed"] < result["summary"][0]["key_fraction_computed"]
    assert all(r["peak_reset"] for r in result["rows"])  # the work's own peak, not the import-time high-water mark
    assert "speedup" in proc.stdout or "x vs dense-mask" in proc.stdout


def test_min_seconds_adds_runs_until_the_runs_add_up_to_it(shared_data, monkeypatch):
    """A fast method runs until its timed runs add up to ``min_seconds`` (the sink samples the machine as long as
    causal SDPA does), at most ``MAX_RUNS`` times; with 0, exactly ``repeats`` runs; the minimum is over all of them."""
    import pipeline.bench.attention as bench
    from pipeline.bench.attention import measure, msc_episode_lengths

    episodes = msc_episode_lengths(str(shared_data), limit=200)
    for method in ("sink", "causal"):
        exact = measure(method, 256, 2, 8, episodes, repeats=2, min_seconds=0.0)
        assert len(exact["all_seconds"]) == 2
        more = measure(method, 256, 2, 8, episodes, repeats=2, min_seconds=1.0)  # a run takes milliseconds (a cold one more)
        runs = more["all_seconds"]
        assert len(runs) > 2 and more["seconds"] == min(runs)
        if len(runs) < bench.MAX_RUNS:  # (a machine where 1,000 runs take under 1 s stops at the cap, tested below)
            assert sum(runs) >= 1.0 and sum(runs[:-1]) < 1.0  # it stops at the first run that reaches it
    monkeypatch.setattr(bench, "MAX_RUNS", 4)
    assert len(measure("causal", 256, 2, 8, episodes, repeats=2, min_seconds=30)["all_seconds"]) == 4  # without the cap: 30 s of runs


def test_packed_layout_keeps_episodes_apart_and_bounds_the_work(shared_data):
    """The packed layout: episodes back to back with their own doc ids and positions; the dialogue mask of that
    layout equals the per-episode masks, and the sink attention computes a fraction of pairs that does not fall
    with T the way one growing conversation's does (bounded work per token)."""
    import torch

    from pipeline.attention.masks import dense_mask
    from pipeline.attention.sink_kernel import SinkAttention
    from pipeline.bench.attention import msc_episode_lengths, packed_batch

    episodes = msc_episode_lengths(str(shared_data), limit=600)
    assert len(episodes) > 3 and all(len(ep) > 0 for ep in episodes)
    b = packed_batch(episodes, 2048)
    doc, pos = b["doc_ids"][0], b["position_ids"][0]
    starts = torch.nonzero(torch.cat([torch.tensor([True]), doc[1:] != doc[:-1]])).flatten()
    assert (pos[starts] == 0).all() and (b["utt_ids"][0][starts] == 0).all()  # each episode opens with its BOS
    first = int(starts[1])
    assert first == 1 + sum(episodes[0]) + len(episodes[0])  # BOS + utterances + one EoU each
    m = dense_mask("dialogue", b)[0]
    assert not m[first:, :first].any()  # no query sees an earlier episode
    fractions = []
    for T in (1024, 4096):
        attn = SinkAttention(packed_batch(episodes, T))
        fractions.append(attn.keys_computed / attn.keys_dense * T)  # computed keys per query
    assert fractions[1] < 1.5 * fractions[0], fractions


def test_work_peak_rss_is_reset_before_the_timed_work():
    import numpy as np

    from pipeline.bench.attention import _peak_rss_gb, _reset_peak_rss, _rss_gb

    big = np.ones(200 * 2**20 // 8)  # a high-water mark of +200 MB ...
    del big  # (the allocator may keep these pages resident and hand them to `work` below)
    assert _reset_peak_rss()
    before = _rss_gb()
    assert _peak_rss_gb() - before < 0.05  # ... forgotten after the reset: the peak is today's RSS
    work = np.ones(400 * 2**20 // 8)  # 400 MB: at least 200 MB of new pages even if all of big's are reused
    assert _peak_rss_gb() >= _rss_gb() - 0.01  # the peak follows the timed work
    assert 0.15 < _peak_rss_gb() - before < 0.45
    del work
