"""`convsink bench gpu` on CPU (the CPU sink kernel in place of FlexAttention, fp32, the tiny model): every phase
writes what it measured, the time budget leaves points out as "not run" (never dropped), and the pair count behind
the MFU is the dense mask's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from data_prep.layout import layout_dialogue
from data_prep.tokenizer_loading import SpecialIds
from pipeline.attention.masks import dense_mask
from pipeline.bench.gpu import CAUSAL, SINK_FLEX, allowed_pairs, build_model, matmul_params, step_point
from pipeline.bench.memory import conversation_source, row_from_source
from pipeline.contract import BLK, DIALOGUE, DOC_IDS, EOU, MASK_KIND, UTT_IDS
from tests.repo import REPO


def _bench(tmp_path, *args: str) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "gpu", "--device", "cpu", "--model", "tiny",
                           "--out", str(out), "--loss-chunk", "64", "--conversation", str(tmp_path / "conv.json"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_every_phase_reports_and_the_sink_alone_doubles_past_the_compared_lengths(tmp_path, shared_data):
    r = _bench(tmp_path, "--attention-lens", "256", "512", "--compare-lens", "128", "256", "--max-len", "1024")
    assert r["errors"] == [] and (tmp_path / "gpu.png").stat().st_size > 0
    assert r["setting"]["activation_checkpointing"] is True
    assert json.loads((tmp_path / "conv.json").read_text())["utterances"]  # cached for a machine without the data
    assert max(r["check"]["max_abs_diff_float32"].values()) < 1e-4  # the sink attention equals the dense reference
    assert [(a["method"], a["T"]) for a in r["attention"]] == [(m, T) for T in (256, 512) for m in (SINK_FLEX, CAUSAL)]
    for a in r["attention"]:
        assert len(a["all_seconds"]) == 5 and a["seconds"] == sorted(a["all_seconds"])[2]
    assert all(a["plan_seconds"] > 0 and a["forward_seconds"] > 0 for a in r["attention"] if a["method"] == SINK_FLEX)
    steps = [(p["method"], p["T"]) for p in r["steps"]]
    assert steps == [(SINK_FLEX, 128), (CAUSAL, 128), (SINK_FLEX, 256), (CAUSAL, 256), (SINK_FLEX, 512), (SINK_FLEX, 1024)]
    for p in r["steps"]:
        assert p["fits"] and len(p["all_step_seconds"]) == 2 and p["step_seconds"] == p["all_step_seconds"][1]
        assert 5 < p["loss"] < 20 and 0 < p["mfu"] < 1
        # the MFU's inputs are this run's model and row (the model's shape from the JSON, the pairs counted above)
        c = r["setting"]["model_config"]
        flops = 6 * r["setting"]["matmul_parameters"] * p["T"] + 12 * c["num_hidden_layers"] * c["num_attention_heads"] \
            * (c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]) * p["allowed_pairs"]
        assert p["model_tflops_per_step"] * 1e12 == pytest.approx(flops, rel=1e-12)
        assert p["mfu"] == pytest.approx(flops / p["step_seconds"] / (r["setting"]["peak_tflops"] * 1e12), rel=1e-12)
        causal_pairs = p["T"] * (p["T"] + 1) // 2
        assert (p["allowed_pairs"] == causal_pairs) == (p["method"] == CAUSAL)
    assert r["summary"]["longest_T_fit"] == {SINK_FLEX: 1024, CAUSAL: 256}
    assert r["summary"]["first_T_not_fit"] == {SINK_FLEX: None, CAUSAL: None}  # every point planned ran and fit
    assert [x["T"] for x in r["summary"]["step_ratios"]] == [128, 256]


def test_points_past_the_time_budget_are_listed_as_not_run(tmp_path, shared_data):
    r = _bench(tmp_path, "--attention-lens", "128", "--compare-lens", "128", "--max-len", "256", "--time-budget", "0")
    assert r["check"] is not None and len(r["attention"]) == 2
    assert [(p["method"], p["T"], p["fits"], p["reason"]) for p in r["steps"]] == [
        (SINK_FLEX, 128, None, "not run: time budget"), (CAUSAL, 128, None, "not run: time budget"),
        (SINK_FLEX, 256, None, "not run: time budget")]
    assert r["summary"]["longest_T_fit"] == {SINK_FLEX: None, CAUSAL: None}
    assert r["summary"]["first_T_not_fit"] == {m: {"T": 128, "reason": "not run: time budget"} for m in (SINK_FLEX, CAUSAL)}


def test_mlp_chunk_tiles_the_steps_mlps_without_changing_their_losses(tmp_path, shared_data):
    args = ("--attention-lens", "--compare-lens", "128", "--max-len", "256")
    plain = _bench(tmp_path / "plain", *args)
    tiled = _bench(tmp_path / "tiled", *args, "--mlp-chunk", "50")  # 3 chunks of 128 tokens, 6 of 256
    assert plain["setting"]["mlp_chunk"] is None and tiled["setting"]["mlp_chunk"] == 50
    layers = tiled["setting"]["model_config"]["num_hidden_layers"]
    assert plain["setting"]["tiled_mlp_layers"] == 0 and tiled["setting"]["tiled_mlp_layers"] == layers  # read off the model
    assert "tiled MLP (mlp_chunk 50)" in tiled["setting"]["step"] and plain["attention"] == tiled["attention"] == []
    assert [(p["method"], p["T"]) for p in tiled["steps"]] == [(SINK_FLEX, 128), (CAUSAL, 128), (SINK_FLEX, 256)]
    assert tiled["errors"] == [] and len(plain["steps"]) == 3
    for a, b in zip(plain["steps"], tiled["steps"]):  # the loss after one AdamW step: same model, same row
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and a["loss"] > 5


def _count_dense(batch: dict) -> int:
    return int(dense_mask(DIALOGUE, batch).sum())


@pytest.mark.parametrize("T", [64, 700])
def test_allowed_pairs_is_the_dense_masks_count(T, shared_data):
    batch = row_from_source(conversation_source(n_utterances=200), T)
    assert allowed_pairs(batch) == _count_dense(batch)


def test_allowed_pairs_counts_a_pinned_system_prompt_as_sinks():
    ids = SpecialIds(bos=1, eou=2, pad=0)
    row = layout_dialogue("d", [[5] * 7, [6] * 3, [7] * 11, [8] * 2], ids, system=[9] * 6)
    T = len(row.input_ids)
    batch = {UTT_IDS: torch.tensor([row.utt_ids]), EOU: torch.tensor([row.eou]), BLK: torch.tensor([row.blk]),
             DOC_IDS: torch.zeros(1, T, dtype=torch.long), MASK_KIND: [DIALOGUE]}
    assert allowed_pairs(batch) == _count_dense(batch)
    with pytest.raises(ValueError, match="one dialogue-mask conversation"):
        allowed_pairs({**batch, MASK_KIND: ["causal"]})


def test_matmul_params_counts_every_matrix_product_once():
    model = build_model("tiny", torch.device("cpu"), torch.float32)
    c = model.config
    D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_layer = (c.hidden_size * D * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
                 + 3 * c.hidden_size * c.intermediate_size)
    assert matmul_params(model) == c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size


def test_an_out_of_memory_step_is_a_point_that_does_not_fit(shared_data):
    class OutOfMemoryModel(torch.nn.Module):  # raises what CUDA raises when an allocation fails
        def forward(self, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.91 GiB.")

    model = OutOfMemoryModel()
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    row = row_from_source(conversation_source(n_utterances=50), 128)
    p = step_point(model, opt, row, SINK_FLEX, 64, torch.device("cpu"), "sink", 60.0)
    assert p == {"method": SINK_FLEX, "T": 128, "fits": False, "reason": "out of memory: CUDA out of memory. Tried to allocate 3.91 GiB."}
