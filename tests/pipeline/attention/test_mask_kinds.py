"""Every mask kind of method.md §2 against a per-element reference written directly from its definition."""

from __future__ import annotations

import pytest
import torch

from pipeline.attention.masks import MaskParams, batch_dense_mask, bigbird_random_keys, dense_mask
from tests.pipeline.batches import random_packed_batch

PARAMS = MaskParams(local_window=5, sink_tokens=2, sink_window=4, bigbird_global=1, bigbird_window=3, bigbird_random=2, bigbird_seed=7)


def reference(kind: str, row: dict, rand=None) -> torch.Tensor:
    doc, utt, eou, blk, pos = (row[c].tolist() for c in ("doc_ids", "utt_ids", "eou", "blk", "position_ids"))
    T = len(doc)
    first = {}
    for i in range(T):
        first.setdefault(doc[i], i)
    m = torch.zeros(T, T, dtype=torch.bool)
    for q in range(T):
        for k in range(q + 1):
            if doc[k] != doc[q]:
                continue
            if kind == "causal":
                ok = True
            elif kind == "dialogue":
                ok = k == first[doc[q]] or eou[k] or utt[k] == utt[q] or utt[k] == utt[q] - 1
            elif kind == "smr":
                copy_q = blk[q] > 0 and blk[q] % 2 == 0
                ok = k == first[doc[q]] or blk[k] == blk[q] or (copy_q and eou[k] and blk[k] == blk[q] - 1)
            elif kind == "lmr":
                response_q = utt[q] > 0 and utt[q] % 2 == 0
                query_of_q = response_q and blk[k] == blk[q] and utt[k] == utt[q] - 1
                ok = k == first[doc[q]] or eou[k] or utt[k] == utt[q] or query_of_q
            elif kind == "local":
                ok = q - k < PARAMS.local_window
            elif kind == "streamingllm":
                ok = pos[k] < PARAMS.sink_tokens or q - k < PARAMS.sink_window
            elif kind == "bigbird":
                ok = pos[k] < PARAMS.bigbird_global or q - k < PARAMS.bigbird_window or k in rand[q]
            m[q, k] = ok
    return m


@pytest.mark.parametrize("kind", ["causal", "dialogue", "smr", "lmr", "local", "streamingllm", "bigbird"])
def test_dense_mask_equals_reference(kind):
    batch = random_packed_batch(2, 96, [kind, kind], seed=3)
    mask = dense_mask(kind, batch, PARAMS)
    rand = bigbird_random_keys(batch, PARAMS.bigbird_random, PARAMS.bigbird_seed)
    for b in range(2):
        row = {c: batch[c][b] for c in ("doc_ids", "utt_ids", "eou", "blk", "position_ids")}
        assert torch.equal(mask[b], reference(kind, row, rand[b].tolist())), (kind, b)
        d = batch["doc_ids"][b]
        assert not (mask[b] & (d[:, None] != d[None, :])).any()


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
