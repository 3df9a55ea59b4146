"""Activation checkpointing + the tiled loss + the tiled MLP under the real launcher: ZeRO-3 on 2 ranks (tied
embeddings, whose partitioned lm_head weight is gathered per chunk, partitioned MLP weights gathered per MLP chunk and
their gradients held back to the last chunk, and the held-out eval) and Ulysses SP=2 with LoRA train exactly like
the plain run: same per-step losses (1e-5) and the same parameters after the run (1e-5), on real SMR + LMR rows
under the sink attention."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pipeline.config import load_config
from pipeline.modeling.zero3_consolidate import consolidate_zero3
from pipeline.training.checkpoint import checkpoint_root, latest_tag
from pipeline.training.launch import launch_training

pytestmark = pytest.mark.slow
BASE = ["data.seq_len=128", "model.max_position_embeddings=512", "model.hidden_size=32", "model.intermediate_size=64",
        "model.num_heads=4", "model.num_kv_heads=2", "model.attention=sink", "train.stage=memory", "train.nproc=2",
        "train.micro_batch_size=2", "train.grad_accum=2", "train.lr=5e-3", "train.warmup_steps=1", "train.max_steps=4",
        "train.save_every=4", "wandb.mode=disabled"]
MEMORY_SAVING = ["train.activation_checkpointing=true", "train.loss_chunk=50",  # 50 divides no row: chunks straddle rows
                 "train.mlp_chunk=50"]  # 3 MLP chunks of a 128-token row (2 of a 64-token SP shard)


@pytest.fixture(scope="module")
def memory_shards(tmp_path_factory, shared_data):
    from data_prep.prep import prepare

    out = tmp_path_factory.mktemp("tiled3") / "shards"
    prepare([str(shared_data / "msc" / "session_3_valid.jsonl")], str(out),
            load_config(None, ["data.seq_len=128", "data.max_dialogues=12", "data.engine=local", "data.smr.samples=16",
                               "data.smr.utterances_per_sample=3", "data.lmr.samples=16",
                               "data.lmr.pairs_per_sample=2"]).data, progress=False)
    return str(out)


def _run(shards, out, overrides):
    launch_training(load_config(None, BASE + overrides), shards, out)
    history = json.load(open(os.path.join(out, "history-rank0-from0.json")))
    root = checkpoint_root(out)
    return history, consolidate_zero3(os.path.join(root, latest_tag(root)))


def _assert_same_training(shards, tmp_path, overrides, metrics):
    plain, plain_params = _run(shards, str(tmp_path / "plain"), overrides)
    saving, saving_params = _run(shards, str(tmp_path / "saving"), overrides + MEMORY_SAVING)
    print("plain ", [r["loss"] for r in plain], "\nsaving", [r["loss"] for r in saving])
    assert [r["step"] for r in plain] == [r["step"] for r in saving] == [1, 2, 3, 4]
    for a, b in zip(plain, saving):
        for key in metrics:
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
    assert sorted(saving_params) == sorted(plain_params) and plain_params
    for name, p in plain_params.items():
        torch.testing.assert_close(saving_params[name], p, atol=1e-5, rtol=0, msg=name)
    return plain


def test_zero3_two_ranks_with_checkpointing_and_tiled_loss_train_like_plain(memory_shards, tmp_path):
    """Full fine-tuning, tied embeddings, DP=2, eval every 2 steps on held rows (here: the training shards)."""
    evals = [f"train.eval_data={memory_shards}", "train.eval_every=2", "train.eval_rows=6"]
    plain = _assert_same_training(memory_shards, tmp_path, evals, ["loss", "loss/smr", "loss/lmr", "grad_norm"])
    assert plain[-1]["loss"] < plain[0]["loss"] - 0.1  # it trains
    history = json.load(open(os.path.join(tmp_path / "saving", "history-rank0-from0.json")))
    evaluated, plain_evals = [r for r in history if "eval/loss" in r], [r for r in plain if "eval/loss" in r]
    assert [r["step"] for r in evaluated] == [r["step"] for r in plain_evals] == [2, 4]
    for a, b in zip(plain_evals, evaluated):
        keys = sorted(k for k in a if k.startswith("eval/"))
        assert keys == sorted(k for k in b if k.startswith("eval/")) and "eval/accuracy/smr" in keys
        for key in keys:
            assert b[key] == pytest.approx(a[key], abs=1e-5, rel=1e-6), (a["step"], key)  # ppl = exp(loss)


def test_sequence_parallel_with_lora_checkpointing_and_tiled_loss_trains_like_plain(memory_shards, tmp_path):
    """The 7B recipe's shape: LoRA on q/v, Ulysses SP=2 over the 2 ranks, ZeRO-3."""
    sp_lora = ["train.sequence_parallel_size=2", "model.lora.enabled=true", "train.micro_batch_size=1"]
    _assert_same_training(memory_shards, tmp_path, sp_lora, ["loss", "loss/smr", "loss/lmr", "grad_norm"])
