"""Ulysses sequence parallelism under ZeRO-3: 2 processes with sequence_parallel_size=2 train exactly like 1 process
over the same packed data (same losses, same parameters after 10 steps): dialogue rows under dense-mask SDPA, and
memory-stage rows (SMR and LMR mixed in every micro-batch) under the sink attention."""

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
        "model.num_heads=4", "model.num_kv_heads=2", "train.micro_batch_size=1", "train.grad_accum=2", "train.lr=5e-3",
        "train.warmup_steps=2", "train.max_steps=10", "train.save_every=10", "wandb.mode=disabled"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shared_data):
    from data_prep.prep import prepare

    out = tmp_path_factory.mktemp("sp") / "shards"
    prepare([str(shared_data / "msc" / "session_3_valid.jsonl")], str(out),
            load_config(None, ["data.seq_len=128", "data.max_dialogues=20", "data.engine=local", "data.smr.samples=24",
                               "data.smr.utterances_per_sample=3", "data.lmr.samples=24", "data.lmr.pairs_per_sample=2"]).data,
            progress=False)
    from pipeline.training.shard_loader import load_shards

    for stage in ("dialogue", "memory"):  # packed: some rows hold several dialogues / samples
        assert (load_shards(str(out), stage).arrays["doc_ids"].max(1) >= 1).any(), stage
    return str(out)


def _run(shards, out, overrides):
    launch_training(load_config(None, BASE + overrides), shards, out)
    history = json.load(open(os.path.join(out, "history-rank0-from0.json")))
    root = checkpoint_root(out)
    return [r["loss"] for r in history], consolidate_zero3(os.path.join(root, latest_tag(root)))


@pytest.mark.parametrize("attention,stage", [("dense", "dialogue"), ("sink", "memory")])
def test_sequence_parallel_matches_single_process(shards, tmp_path, attention, stage):
    common = [f"model.attention={attention}", f"train.stage={stage}"]
    single_loss, single_params = _run(shards, str(tmp_path / "single"), common + ["train.nproc=1"])
    sp_loss, sp_params = _run(shards, str(tmp_path / "sp2"), common + ["train.nproc=2", "train.sequence_parallel_size=2"])
    print("single", single_loss, "\nsp=2  ", sp_loss)
    assert len(single_loss) == len(sp_loss) == 10
    for a, b in zip(single_loss, sp_loss):
        assert abs(a - b) <= 1e-5
    assert single_loss[-1] < single_loss[0]
    for name, p in single_params.items():
        torch.testing.assert_close(sp_params[name], p, atol=1e-4, rtol=0, msg=name)


def test_sequence_parallel_size_must_divide_heads():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="sequence_parallel_size"):
        load_config(None, BASE + ["train.nproc=3", "train.sequence_parallel_size=3"])


def test_sequence_parallel_size_is_checked_against_a_model_folder_before_launch(shards, tmp_path):
    """A pretrained folder's head counts (9 query / 3 key-value heads, as SmolLM2-135M) are checked before any rank
    starts, and so is the shards' seq_len."""
    from transformers import LlamaConfig

    folder = tmp_path / "model"
    folder.mkdir()
    LlamaConfig(hidden_size=72, num_attention_heads=9, num_key_value_heads=3).to_json_file(str(folder / "config.json"))
    cfg = load_config(None, BASE + ["train.nproc=2", "train.sequence_parallel_size=2", f"model.path={folder}"])
    with pytest.raises(ValueError, match=r"model: train.sequence_parallel_size=2 must divide num_heads=9 and num_kv_heads=3"):
        launch_training(cfg, shards, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
