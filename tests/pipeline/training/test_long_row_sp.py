"""A 32k-token conversation in one row: 2 ranks with Ulysses SP=2 under ZeRO-3 (sink attention, activation
checkpointing, tiled loss) train it like one process (one optimizer step: the same loss, the same gradient norm, the
same parameters after the update), and one rank's memory stays small."""

from __future__ import annotations

import json
import os
import resource

import pytest
import torch

from pipeline.config import load_config
from tests.data_prep.test_long_dialogues import dialogue_lengths, long_conversation_file
from tests.pipeline.training.test_loop_sp import _run

pytestmark = pytest.mark.slow
EPISODES = 30  # MSC episodes chained: ~33.5k tokens with a 2048-token BPE vocabulary
SEQ_LEN = 36_864
LONG_ROW = [f"data.seq_len={SEQ_LEN}", f"model.max_position_embeddings={SEQ_LEN}", "model.hidden_size=64",
            "model.intermediate_size=128", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
            "model.attention=sink", "train.stage=dialogue", "train.grad_accum=1", "train.warmup_steps=1",
            "train.max_steps=1", "train.save_every=1", "train.activation_checkpointing=true", "train.loss_chunk=4096"]
RANK_RSS_LIMIT_GB = 6.0  # the largest process of a run (a rank), on a 24 GB machine shared with other jobs


@pytest.fixture(scope="module")
def long_row(tmp_path_factory, shared_data):
    from transformers import AutoTokenizer

    from data_prep.prep import prepare
    from data_prep.tokenizer_loading import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("longrow")
    msc = [str(shared_data / "msc" / f) for f in ("session_2_valid.jsonl", "session_3_valid.jsonl")]
    tok = train_bpe_tokenizer(msc, str(root / "bpe"), vocab_size=2048)
    chat = long_conversation_file(shared_data, root / "long_chat.jsonl", EPISODES, others=0)
    (length,) = dialogue_lengths(chat, AutoTokenizer.from_pretrained(tok))
    assert 32_768 <= length <= SEQ_LEN, length
    out = str(root / "shards")
    prepare([chat], out, load_config(None, LONG_ROW + [f"data.tokenizer={tok}", "data.engine=local"]).data,
            progress=False)
    from pipeline.training.shard_loader import load_shards

    docs = load_shards(out, "dialogue").arrays["doc_ids"]
    assert docs.shape == (1, SEQ_LEN) and int((docs == 0).sum()) == length, "one row, the whole chat one document"
    return out


def _peak_child_rss_gb() -> float:
    """Largest resident set of any finished child process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def _grad_norms(out: str) -> list[float]:
    with open(os.path.join(out, "history-rank0-from0.json")) as f:
        return [r["grad_norm"] for r in json.load(f)]


def test_a_32k_token_row_trains_the_same_on_two_sp_ranks_as_on_one_process(long_row, tmp_path):
    single, sp2 = str(tmp_path / "single"), str(tmp_path / "sp2")
    single_loss, single_params = _run(long_row, single, LONG_ROW + ["train.nproc=1"])
    sp_loss, sp_params = _run(long_row, sp2, LONG_ROW + ["train.nproc=2", "train.sequence_parallel_size=2"])
    peak = _peak_child_rss_gb()
    print("single", single_loss, _grad_norms(single), "\nsp=2  ", sp_loss, _grad_norms(sp2), f"\npeak rank RSS {peak:.2f} GB")
    assert len(single_loss) == len(sp_loss) == 1
    assert abs(single_loss[0] - sp_loss[0]) <= 1e-5
    # Adam's update hardly depends on the gradient's scale: the norm checks the gradients themselves
    (g_single,), (g_sp,) = _grad_norms(single), _grad_norms(sp2)
    assert g_single > 0 and abs(g_single - g_sp) <= 1e-4 * g_single, (g_single, g_sp)
    assert sorted(sp_params) == sorted(single_params) and single_params
    for name, p in single_params.items():
        torch.testing.assert_close(sp_params[name], p, atol=1e-4, rtol=0, msg=name)
    assert 0 < peak < RANK_RSS_LIMIT_GB, peak
