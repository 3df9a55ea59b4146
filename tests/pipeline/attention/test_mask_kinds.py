"""Mask-kind properties beyond the per-element reference (tests/pipeline/mask_reference.py, checked in test_masks.py):
BigBird draws per row, and the kinds that must see only what method.md §2 allows."""

from __future__ import annotations

import torch

from pipeline.attention.masks import MaskParams, batch_dense_mask, dense_mask
from tests.pipeline.batches import random_packed_batch

PARAMS = MaskParams(local_window=5, sink_tokens=2, sink_window=4, bigbird_global=1, bigbird_window=3, bigbird_random=2, bigbird_seed=7)


def test_bigbird_draw_depends_on_row_not_on_neighbours():
    a = random_packed_batch(2, 64, ["bigbird", "dialogue"], seed=1)
    mixed = batch_dense_mask(a, PARAMS)
    alone = dense_mask("bigbird", a, PARAMS)
    assert torch.equal(mixed[0], alone[0])


def test_lmr_repeated_pair_sees_only_bos_history_eous_and_itself():
    # [BOS] q1 E r1 E q2 E r2 E | repeat of pair 1: q1' E r1' E
    utt = torch.tensor([[0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]])
    blk = torch.tensor([[0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]])
    eou = torch.tensor([[0, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1]]).bool()
    meta = {"doc_ids": torch.zeros_like(utt), "utt_ids": utt, "blk": blk, "eou": eou}
    m = dense_mask("lmr", meta)[0]
    history_eous = {2, 4, 6, 8}
    for q in (9, 10):  # the repeated query
        assert set(m[q].nonzero().squeeze(1).tolist()) == {0} | history_eous | set(range(9, q + 1))
    for q in (11, 12):  # the repeated response also sees its own query
        assert set(m[q].nonzero().squeeze(1).tolist()) == {0} | history_eous | {10} | set(range(9, q + 1))


def test_smr_copy_sees_only_bos_its_original_eou_and_itself():
    # [BOS] a a E a' a' E' b E b' E'
    blk = torch.tensor([[0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4]])
    eou = torch.tensor([[0, 0, 0, 1, 0, 0, 1, 0, 1, 0, 1]]).bool()
    meta = {"doc_ids": torch.zeros_like(blk), "utt_ids": blk, "blk": blk, "eou": eou}
    m = dense_mask("smr", meta)[0]
    for q in (4, 5, 6):
        assert set(m[q].nonzero().squeeze(1).tolist()) == {0, 3} | set(range(4, q + 1))
    for q in (9, 10):
        assert set(m[q].nonzero().squeeze(1).tolist()) == {0, 8} | set(range(9, q + 1))
    assert set(m[7].nonzero().squeeze(1).tolist()) == {0, 7}  # a new original sees only BOS and itself
