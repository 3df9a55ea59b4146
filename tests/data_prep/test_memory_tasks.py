"""SMR and LMR samples: the layout, labels and masks of method.md §2, read back from the shards."""

from __future__ import annotations

import pytest
import torch

from data_prep.config import DataConfig
from data_prep.prep import prepare
from pipeline.data import load_shards
from pipeline.masks import dense_mask


@pytest.fixture(scope="module")
def memory(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mem") / "shards"
    prepare([str(shared_data / "msc" / "session_2_valid.jsonl")], str(out),
            DataConfig(seq_len=1024, engine="local", max_dialogues=60, smr={"samples": 6, "utterances_per_sample": 8},
                       lmr={"samples": 6, "pairs_per_sample": 5}), progress=False)
    return load_shards(str(out), "memory")


def _samples(data, kind):
    for r, k in enumerate(data.mask_kind):
        if k != kind:
            continue
        doc = data.arrays["doc_ids"][r]
        for d in sorted(set(doc.tolist()) - {-1}):
            idx = (doc == d).nonzero()[0]
            yield {c: torch.from_numpy(data.arrays[c][r][idx].copy()) for c in ("input_ids", "labels", "utt_ids", "blk", "eou")}


def test_smr_layout_labels_and_mask(memory):
    n = 0
    for s in _samples(memory, "smr"):
        n += 1
        blk, ids, labels, eou = s["blk"], s["input_ids"], s["labels"], s["eou"]
        assert blk[0] == 0 and torch.equal(blk, s["utt_ids"])
        for j in range(1, int(blk.max()) // 2 + 1):
            orig, copy = ids[blk == 2 * j - 1], ids[blk == 2 * j]
            assert torch.equal(orig, copy), "the copy is verbatim, EoU included"
            assert (labels[blk == 2 * j - 1] == -100).all()
            assert torch.equal(labels[blk == 2 * j], copy), "loss on the copy and its EoU"
        meta = {"doc_ids": torch.zeros(1, len(ids), dtype=torch.long), "utt_ids": blk[None], "blk": blk[None], "eou": eou[None]}
        m = dense_mask("smr", meta)[0]
        first_copy = int((blk == 2).nonzero()[0])
        orig_eou = int(((blk == 1) & eou).nonzero()[0])
        assert set(m[first_copy].nonzero().squeeze(1).tolist()) == {0, orig_eou, first_copy}
    assert n == 6


def test_lmr_layout_labels_and_mask(memory):
    n = 0
    for s in _samples(memory, "lmr"):
        n += 1
        utt, blk, labels, ids, eou = s["utt_ids"], s["blk"], s["labels"], s["input_ids"], s["eou"]
        pairs = int(blk.max()) - 1
        assert pairs >= 2
        rep_q, rep_r = 2 * pairs + 1, 2 * pairs + 2
        assert set(blk[utt == rep_q].tolist()) == set(blk[utt == rep_r].tolist()) == {pairs + 1}
        # the repeat is a verbatim copy of one earlier pair
        repeated = ids[blk == pairs + 1]
        assert any(torch.equal(repeated, ids[blk == p]) for p in range(1, pairs + 1))
        history = (blk >= 1) & (blk <= pairs)
        assert torch.equal(labels[history], ids[history])
        assert torch.equal(labels[utt == rep_q], ids[utt == rep_q])
        assert (labels[utt == rep_r] == -100).all(), "reference default: the repeated response is not supervised"
        meta = {"doc_ids": torch.zeros(1, len(ids), dtype=torch.long), "utt_ids": utt[None], "blk": blk[None], "eou": eou[None]}
        m = dense_mask("lmr", meta)[0]
        q = int((utt == rep_q).nonzero()[0])
        history_eous = set((eou & history).nonzero().squeeze(1).tolist())
        assert set(m[q].nonzero().squeeze(1).tolist()) == {0} | history_eous | {q}
    assert n == 6
