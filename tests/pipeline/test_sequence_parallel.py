"""Ulysses over 2 gloo processes equals the single-process sink attention (outputs and input gradients), and
would catch a mask silently replaced by a causal one."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.attention import DenseMaskAttention
from pipeline.masks import batch_dense_mask
from pipeline.sequence_parallel import check_sp_size, shard_sequence, ulysses_attention
from pipeline.sink_attention import SinkAttention

from .batches import random_packed_batch

B, H, HKV, T, D = 2, 4, 2, 256, 8


def inputs():
    torch.manual_seed(0)
    batch = random_packed_batch(B, T, ["dialogue", "lmr"], seed=9)
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, HKV, T, D), torch.randn(B, HKV, T, D)
    grad = torch.randn(B, H, T, D)
    return batch, q, k, v, grad


def _worker(rank, store, out_path):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    batch, q, k, v, grad = inputs()
    n = T // 2
    local = [t[:, :, rank * n:(rank + 1) * n].clone().requires_grad_() for t in (q, k, v)]
    attn = ulysses_attention(SinkAttention(batch, chunk=64), dist.group.WORLD)
    out = attn(*local, D ** -0.5)
    out.backward(grad[:, :, rank * n:(rank + 1) * n])
    torch.save({"out": out.detach(), "grads": [t.grad for t in local]}, f"{out_path}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sp_result(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    mp.spawn(_worker, args=(str(d / "store"), str(d / "res")), nprocs=2, join=True)
    parts = [torch.load(f"{d / 'res'}.{r}", weights_only=True) for r in range(2)]
    out = torch.cat([p["out"] for p in parts], dim=2)
    grads = [torch.cat([p["grads"][i] for p in parts], dim=2) for i in range(3)]
    return out, grads


def single_process(mask_batch):
    batch, q, k, v, grad = inputs()
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = DenseMaskAttention(batch_dense_mask(mask_batch))(q, k, v, D ** -0.5)
    out.backward(grad)
    return out.detach(), [q.grad, k.grad, v.grad]


def test_ulysses_equals_single_process(sp_result):
    batch, *_ = inputs()
    ref_out, ref_grads = single_process(batch)
    out, grads = sp_result
    assert (out - ref_out).abs().max() <= 1e-5
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max() <= 1e-5


def test_would_catch_a_causal_substitution(sp_result):
    batch, *_ = inputs()
    causal_out, _ = single_process(dict(batch, mask_kind=["causal", "causal"]))
    out, _ = sp_result
    assert (out - causal_out).abs().max() > 1e-2  # the sink mask really changes the result


def test_shard_sequence_keeps_metadata_full_length():
    batch = random_packed_batch(1, 64, ["dialogue"])
    batch["input_ids"] = torch.arange(64)[None]
    local = shard_sequence(batch, 1, 2)
    assert torch.equal(local["input_ids"], torch.arange(32, 64)[None])
    assert local["doc_ids"].shape == (1, 64)
    with pytest.raises(ValueError, match="not divisible"):
        shard_sequence(batch, 0, 3)


def test_sp_size_must_divide_heads():
    check_sp_size(8, 4, 2)
    with pytest.raises(ValueError, match="num_kv_heads=2"):
        check_sp_size(8, 2, 4)
