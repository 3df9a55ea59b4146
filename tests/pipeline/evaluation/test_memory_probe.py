"""The SMR control cuts exactly the memory path: a copy no longer sees its original's EoU; nothing else changes."""

from __future__ import annotations

import torch

from pipeline.attention.masks import dense_mask
from pipeline.evaluation.memory_probe import cut_smr_memory, token_accuracy


def test_cut_smr_memory_removes_only_the_copy_to_original_eou_pairs():
    # [BOS] a a E a' a' E' b E b' E'   blk 0 1 1 1 2 2 2 3 3 4 4
    blk = torch.tensor([[0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4]])
    eou = torch.tensor([[0, 0, 0, 1, 0, 0, 1, 0, 1, 0, 1]]).bool()
    batch = {"doc_ids": torch.zeros_like(blk), "utt_ids": blk.clone(), "blk": blk, "eou": eou,
             "position_ids": torch.arange(11)[None], "mask_kind": ["smr"]}
    full = dense_mask("smr", batch)[0]
    cut = dense_mask("smr", dict(batch, blk=cut_smr_memory(blk)))[0]
    removed = (full & ~cut).nonzero().tolist()
    assert removed == [[4, 3], [5, 3], [6, 3], [9, 8], [10, 8]], removed  # copy tokens → their original's EoU
    assert not (cut & ~full).any()


def test_token_accuracy_counts_only_supervised_positions():
    logits = torch.zeros(1, 4, 5)
    logits[0, torch.arange(4), torch.tensor([1, 2, 3, 4])] = 1.0
    targets = torch.tensor([[1, -100, 0, 4]])
    assert token_accuracy(logits, targets) == (2, 3)
