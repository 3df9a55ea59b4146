"""Throughput accounting: attended pairs counted exactly as the mask allows (chunked), FLOPs per token."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from pipeline.attention.masks import MaskParams, batch_dense_mask
from pipeline.training.flops import flops_per_token, mask_stats
from tests.pipeline.batches import random_packed_batch

PARAMS = MaskParams(local_window=16, sink_tokens=2, sink_window=16, bigbird_global=1, bigbird_window=16, bigbird_random=3,
                    bigbird_seed=1)


@pytest.mark.parametrize("kinds", [["dialogue", "dialogue"], ["smr", "lmr"], ["local", "streamingllm"]])
def test_mask_stats_counts_what_the_dense_mask_allows(kinds):
    batch = random_packed_batch(2, 300, kinds, seed=3)
    attended, queries = mask_stats(batch, kinds, PARAMS, chunk=64)  # chunks smaller than T, a partial last one
    real = batch["doc_ids"] >= 0
    dense = batch_dense_mask(dict(batch, mask_kind=kinds), PARAMS) & real[:, :, None]
    assert queries == float(real.sum())
    assert attended == float(dense.sum())
    causal, _ = mask_stats(batch, ["causal"] * 2, MaskParams())
    assert attended < causal, "a sparse mask attends to fewer pairs than causal"


def test_flops_per_token_counts_attention_as_computed():
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=3)
    assert flops_per_token(cfg, 1000, 0.0) == 6000.0
    assert flops_per_token(cfg, 1000, 10.0) - flops_per_token(cfg, 1000, 0.0) == 12 * 3 * 64 * 10
