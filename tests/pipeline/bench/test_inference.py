"""``bench_inference`` runs for real (small sizes) and writes what it says: rows per policy and checkpoint, the
cache sizes each policy defines, ratios, skipped points with their reason, and the PNG."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only cost here


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pipeline.modeling.loader import export_random_model

    return export_random_model(str(tmp_path_factory.mktemp("bench") / "tiny"))


def test_bench_inference_writes_rows_ratios_and_plot(tiny, tmp_path, shared_data, tokenizer):
    from pipeline.bench.inference import bench_inference, long_conversation

    out = tmp_path / "inf.json"
    r = bench_inference(tiny, str(out), utterances=(12, 6), decode_tokens=3, repeats=2, window=40, sink_tokens=4,
                        utterance_samples=2, data_dir=str(shared_data))
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert (tmp_path / "inf.png").stat().st_size > 10_000
    assert r["skipped"] == []
    by = {(x["policy"], x["utterances"]): x for x in r["rows"]}
    assert set(by) == {(p, n) for p in ("dense", "recompute", "streamingllm", "streamingdialogue") for n in (6, 12)}
    convo = long_conversation(tokenizer, str(shared_data), 12)
    for n in (6, 12):
        tokens = 1 + sum(len(u) + 1 for u in convo[:n])
        assert by[("dense", n)]["cached_positions"] == by[("dense", n)]["conversation_tokens"] == tokens
        assert by[("streamingdialogue", n)]["cached_positions"] == 1 + n + len(convo[n - 1]) + len(convo[n - 2])
        assert by[("streamingllm", n)]["cached_positions"] == min(tokens, 44)
        # recompute: the last 40 tokens before the final utterance, re-encoded, plus that utterance
        assert by[("recompute", n)]["cached_positions"] == min(40, tokens - len(convo[n - 1]) - 1) + len(convo[n - 1]) + 1
        for p in ("dense", "recompute", "streamingllm", "streamingdialogue"):
            row = by[(p, n)]
            assert row["kv_bytes"] == row["cached_positions"] * 2 * 2 * 2 * 16 * 4  # 2 layers x K,V x 2 heads x 16 x f32
            assert row["ms_per_token"] > 0 and len(row["ms_per_token_repeats"]) == 2 and row["utterance_ms"] > 0
    ratio = r["ratios"]["12"]
    assert ratio["memory_dense_over_streamingdialogue"] == pytest.approx(
        by[("dense", 12)]["kv_bytes"] / by[("streamingdialogue", 12)]["kv_bytes"])
    assert "latency_recompute_over_streamingdialogue" in ratio and "streamingdialogue" in r["summary"]


def test_recompute_window_is_set_apart_from_streamingllms(tiny, tmp_path, shared_data, tokenizer):
    from pipeline.bench.inference import bench_inference, long_conversation

    r = bench_inference(tiny, str(tmp_path / "w.json"), utterances=(12,), policies=("recompute", "streamingllm", "streamingdialogue"),
                        decode_tokens=2, repeats=1, window=20, recompute_window=60, utterance_samples=1, data_dir=str(shared_data))
    convo = long_conversation(tokenizer, str(shared_data), 12)
    tokens = 1 + sum(len(u) + 1 for u in convo)
    by = {x["policy"]: x for x in r["rows"]}
    assert by["recompute"]["cached_positions"] == min(60, tokens - len(convo[-1]) - 1) + len(convo[-1]) + 1
    assert by["streamingllm"]["cached_positions"] == min(tokens, 4 + 20)
    assert r["setting"]["recompute_window"] == 60 and r["setting"]["window"] == 20


def test_time_budget_skips_are_recorded(tiny, tmp_path, shared_data):
    from pipeline.bench.inference import bench_inference

    r = bench_inference(tiny, str(tmp_path / "b.json"), utterances=(3, 5, 7), policies=("streamingdialogue", "dense"),
                        decode_tokens=2, repeats=1, utterance_samples=1, data_dir=str(shared_data), time_budget_s=0.0)
    assert [(x["policy"], x["utterances"]) for x in r["rows"]] == [("streamingdialogue", 3), ("dense", 3)]
    assert [(s["policy"], s["utterances"]) for s in r["skipped"]] == [
        ("streamingdialogue", 5), ("dense", 5), ("streamingdialogue", 7), ("dense", 7)]
    assert all("time budget" in s["reason"] for s in r["skipped"])
