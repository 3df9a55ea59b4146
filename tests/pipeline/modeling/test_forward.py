"""The dialogue mask on real packed PersonaChat and MSC rows: equals a per-element reference from method.md,
never crosses dialogues, and a masked forward over a packed row equals forwards of each dialogue alone."""

from __future__ import annotations

import pytest
import torch

from data_prep.config import DataConfig
from data_prep.prep import prepare
from pipeline.attention.masks import dense_mask
from pipeline.config import ModelConfig
from pipeline.modeling.forward import forward_batch
from pipeline.modeling.loader import build_model
from pipeline.training.shard_loader import load_shards
from tests.pipeline.mask_reference import COLUMNS, reference


@pytest.fixture(scope="module", params=["personachat", "msc"])
def packed(request, tmp_path_factory, shared_data):
    src = {"personachat": shared_data / "personachat" / "valid.json",
           "msc": shared_data / "msc" / "session_3_valid.jsonl"}[request.param]
    out = tmp_path_factory.mktemp(request.param) / "shards"
    prepare([str(src)], str(out), DataConfig(seq_len=384, max_dialogues=40, engine="local"), progress=False)
    return load_shards(str(out))


def most_packed_rows(data, n: int) -> dict:
    """A batch of the ``n`` rows that pack the most dialogues (windows of split MSC episodes included)."""
    import numpy as np

    docs = data.arrays["doc_ids"].max(axis=1)
    rows = [int(r) for r in np.argsort(-docs, kind="stable")[:n]]
    batch = {c: torch.from_numpy(data.arrays[c][rows]).long() for c in ("input_ids", "position_ids", "doc_ids", "utt_ids", "blk")}
    batch["eou"] = torch.from_numpy(data.arrays["eou"][rows]).bool()
    batch["mask_kind"] = ["dialogue"] * n
    return batch


def test_dialogue_mask_equals_reference_and_stays_inside_dialogues(packed):
    batch = most_packed_rows(packed, 2)
    mask = dense_mask("dialogue", batch)
    for b in range(2):
        row = {c: batch[c][b] for c in COLUMNS}
        assert len(set(d for d in row["doc_ids"].tolist() if d >= 0)) >= 2, "the row should pack several dialogues"
        assert torch.equal(mask[b], reference("dialogue", row))
        d = batch["doc_ids"][b]
        cross = mask[b] & (d[:, None] != d[None, :])
        assert not cross.any()


def test_packed_forward_equals_each_dialogue_alone(packed, tokenizer):
    torch.manual_seed(0)
    from data_prep.tokenizer_loading import SpecialIds

    model = build_model(ModelConfig(hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2),
                        len(tokenizer), SpecialIds(1, 2, 2)).eval()
    batch = most_packed_rows(packed, 1)
    assert int(batch["doc_ids"].max()) >= 1
    with torch.no_grad():
        packed_logits = forward_batch(model, batch, ModelConfig(attention="dense"), impl="dense")[0]
        doc = batch["doc_ids"][0]
        for d in sorted(set(doc.tolist()) - {-1}):
            idx = (doc == d).nonzero().squeeze(1)
            alone = {k: batch[k][:, idx] for k in ("input_ids", "position_ids", "doc_ids", "utt_ids", "eou", "blk")}
            alone["mask_kind"] = ["dialogue"]
            logits = forward_batch(model, alone, ModelConfig(attention="dense"), impl="dense")[0]
            torch.testing.assert_close(packed_logits[idx], logits, atol=1e-5, rtol=0)
