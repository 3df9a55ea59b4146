"""The sink attention's plan: its shared parts and chunks compute every pair the mask allows exactly once (and a
pair it forbids only masked), for every kind, mixed batches and scrambled metadata; on a long conversation the
shared parts carry most of the work; the bucket widths hold every chunk."""

from __future__ import annotations

import pytest
import torch

from pipeline.attention.masks import MaskParams, batch_dense_mask
from pipeline.attention.sink_plan import SinkPlan, batch_meta, bucket_widths, row_meta, row_parts
from pipeline.bench.attention import conversation_batch
from tests.pipeline.attention.test_masks import packed_memory_batch
from tests.pipeline.attention.test_sink_kernel import KINDS, PARAMS
from tests.pipeline.batches import random_packed_batch


def computed_pairs(plan: SinkPlan, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T, T)`` counts of how often the plan computes each (query, key) pair unmasked, and masked (padding
    included: a padded key column repeats a chunk's first key, masked)."""
    seen = torch.zeros(B * plan.P, B * T, dtype=torch.long)
    masked = torch.zeros_like(seen)
    for q0, q1, keys, _ in plan.shared:
        seen[q0:q1, keys] += 1
    for ids, keys, m in plan.buckets:
        n, C, w = m.shape
        q = (ids[:, None] * C + torch.arange(C)).view(n, C, 1).expand(n, C, w)
        k = keys.view(n, 1, w).expand(n, C, w)
        seen.index_put_((q[m], k[m]), torch.ones(int(m.sum()), dtype=torch.long), accumulate=True)
        masked.index_put_((q[~m], k[~m]), torch.ones(int((~m).sum()), dtype=torch.long), accumulate=True)
    rows = [seen.view(B, plan.P, B, T)[b, :T, b] for b in range(B)], [masked.view(B, plan.P, B, T)[b, :T, b] for b in range(B)]
    assert int(seen.sum()) == sum(int(r.sum()) for r in rows[0]) + B * (plan.P - T), "a key of another row"
    return torch.stack(rows[0]), torch.stack(rows[1])


def scrambled_batch() -> dict:
    g = torch.Generator().manual_seed(4)
    B, T = len(KINDS), 150
    return {"doc_ids": torch.randint(-1, 3, (B, T), generator=g).sort(1).values.flip(1),
            "utt_ids": torch.randint(0, 6, (B, T), generator=g), "blk": torch.randint(0, 4, (B, T), generator=g),
            "eou": torch.rand(B, T, generator=g) < 0.1, "position_ids": torch.randint(0, 5, (B, T), generator=g),
            "mask_kind": list(KINDS)}


@pytest.mark.parametrize("make", [lambda: random_packed_batch(len(KINDS), 300, KINDS, seed=3, max_utt_len=15),
                                  lambda: packed_memory_batch(T=170, seed=1), scrambled_batch,
                                  lambda: conversation_batch([3, 9, 1, 14, 6], 700)],
                         ids=["every-kind", "smr+lmr", "scrambled", "conversation"])
@pytest.mark.parametrize("chunk,shared", [(16, 64), (32, 32), (24, 100)])
def test_every_allowed_pair_is_computed_exactly_once(make, chunk, shared):
    batch = make()
    B, T = batch["doc_ids"].shape
    dense = batch_dense_mask(batch, PARAMS)
    plan = SinkPlan(batch, PARAMS, chunk=chunk, shared=shared)
    seen, masked = computed_pairs(plan, B, T)
    assert torch.equal(seen, dense.long()), "an allowed pair missed or computed twice, or a forbidden one unmasked"
    assert plan.pairs_allowed == int(dense.sum())
    assert plan.keys_computed >= plan.pairs_allowed


def test_shared_parts_carry_most_of_a_long_conversation():
    """4,096 tokens of one conversation (utterances of 5-40 tokens): queries see ~100 EoU sinks on average, and
    the unmasked shared parts compute most of the allowed pairs."""
    batch = conversation_batch([12, 31, 5, 22, 40, 17, 9, 26], 4096)
    plan = SinkPlan(batch, MaskParams(), chunk=64, shared=1024)
    shared = sum((q1 - q0) * keys.numel() for q0, q1, keys, _ in plan.shared)
    assert len(plan.shared) == 3  # the first block's queries have no sink before their chunks' bands
    assert shared > 0.5 * plan.pairs_allowed, (shared, plan.pairs_allowed)
    assert plan.keys_computed < 2 * plan.pairs_allowed < 0.2 * plan.keys_dense


def test_bucket_widths_hold_every_chunk_with_little_padding():
    counts = torch.tensor([90, 95, 100, 100, 101, 140, 150, 151, 300] * 20)
    widths = bucket_widths(counts, max_buckets=4, call_cost=100)
    assert widths == sorted(widths) and len(widths) <= 4 and widths[-1] == 300
    padded = sum(widths[int(torch.searchsorted(torch.tensor(widths), c))] for c in counts.tolist())
    assert padded < 1.05 * int(counts.sum()) < 300 * len(counts)
    assert bucket_widths(torch.tensor([7, 7, 7])) == [7]
    assert bucket_widths(counts, max_buckets=1) == [300]


@pytest.mark.parametrize("dtype,group", [(torch.float32, 1), (torch.bfloat16, 3)])
def test_additive_mask_is_zero_where_allowed_and_minus_inf_elsewhere(dtype, group):
    plan = SinkPlan(random_packed_batch(len(KINDS), 300, KINDS, seed=3, max_utt_len=15), PARAMS, chunk=16, shared=64)
    for j, (ids, _, m) in enumerate(plan.buckets):
        add = plan.additive_mask(j, dtype, group)  # (n, 1, group·chunk, w)
        assert add.dtype == dtype and add.shape == (m.shape[0], 1, group * m.shape[1], m.shape[2])
        want = m.repeat(1, group, 1)[:, None]  # the chunk's rows once per query head of the group
        assert torch.equal(add == 0, want) and torch.equal(add == float("-inf"), ~want)


def test_default_buckets_pad_a_conversations_chunks_little():
    """With the default bucket count and call cost, one conversation's chunks are padded by under 10% (4 buckets at a
    call cost of 4,096, the earlier defaults, chose one bucket here and padded by 44%)."""
    batch = conversation_batch([12, 31, 5, 22, 40, 17, 9, 26], 4096)
    _, _, counts = row_parts("dialogue", row_meta(batch_meta(batch, MaskParams()), 0), MaskParams(), 64, 1024)
    widths = bucket_widths(counts)
    padded = sum(widths[int(torch.searchsorted(torch.tensor(widths), c))] for c in counts.tolist())
    assert 1 < len(widths) <= 8 and padded < 1.1 * int(counts.sum()), (widths, padded, int(counts.sum()))
