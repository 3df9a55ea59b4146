"""Ulysses over 2 gloo processes equals the single-process sink attention (outputs and input gradients, 1e-5), and
the comparison would catch a mask silently replaced by a causal one; ``forward_batch`` with a ``SequenceParallel``
gives each rank its slice of the single-process logits."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.attention.masks import batch_dense_mask
from pipeline.attention.registry import DenseMaskAttention
from pipeline.attention.sink_kernel import SinkAttention
from pipeline.attention.ulysses import (
    SequenceParallel,
    check_sp_size,
    heads_to_seq,
    seq_to_heads,
    shard_sequence,
    ulysses_attention,
)
from pipeline.config import ModelConfig
from pipeline.modeling.forward import forward_batch
from tests.pipeline.batches import random_packed_batch

B, H, HKV, T, D, P = 2, 4, 2, 256, 8, 2
KINDS = ["dialogue", "dialogue"]


def inputs():
    g = torch.Generator().manual_seed(0)
    batch = random_packed_batch(B, T, KINDS, seed=9)
    q, k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, HKV, T, D, generator=g), torch.randn(B, HKV, T, D, generator=g)
    grad = torch.randn(B, H, T, D, generator=g)
    return batch, q, k, v, grad


def _sp_run(attn, rank, q, k, v, grad):
    """This rank's shard through Ulysses: (output shard, gradient shards of q, k, v)."""
    n = T // P
    local = [t[:, :, rank * n:(rank + 1) * n].clone().requires_grad_() for t in (q, k, v)]
    out = ulysses_attention(attn, dist.group.WORLD)(*local, D ** -0.5)  # (B, H, T/P, D)
    out.backward(grad[:, :, rank * n:(rank + 1) * n])
    return out.detach(), [t.grad for t in local]


def model_and_batch():
    """A 2-layer random-init Llama (H query, HKV key/value heads) and a token batch over the mask test metadata."""
    from data_prep.tokenizer_loading import SpecialIds
    from pipeline.modeling.loader import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=32, intermediate_size=64, num_heads=H, num_kv_heads=HKV), 64,
                        SpecialIds(1, 2, 0)).eval()
    batch, *_ = inputs()
    batch["input_ids"] = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(1))
    return model, batch


def _worker(rank, store, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=P)
    try:
        batch, q, k, v, grad = inputs()
        x = torch.arange(2 * H * T * 3, dtype=torch.float32).view(2, H, T, 3)
        n = T // P
        heads = seq_to_heads(x[:, :, rank * n:(rank + 1) * n], dist.group.WORLD)
        results = {"heads": heads, "back": heads_to_seq(heads, dist.group.WORLD),
                   "sink": _sp_run(SinkAttention(batch, chunk=64), rank, q, k, v, grad),
                   # what a framework that silently drops the mask would compute
                   "causal": _sp_run(DenseMaskAttention(batch_dense_mask(dict(batch, mask_kind=["causal"] * B))), rank, q, k, v, grad)}
        model, tokens = model_and_batch()
        with torch.no_grad():
            results["logits"] = forward_batch(model, tokens, ModelConfig(attention="sink"),
                                              sp=SequenceParallel(P, dist.group.WORLD, rank))  # (B, T/P, V)
        torch.save(results, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sp_result(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    # fork: no second interpreter start-up per rank; the store is a file, so no TCP port can clash
    mp.start_processes(_worker, args=(str(d / "store"), str(d / "res")), nprocs=P, join=True, start_method="fork")
    parts = [torch.load(f"{d / 'res'}.{r}", weights_only=True) for r in range(P)]
    out = {}
    for name in ("sink", "causal"):
        out[name] = (torch.cat([p[name][0] for p in parts], dim=2), [torch.cat([p[name][1][i] for p in parts], dim=2) for i in range(3)])
    out["heads"] = [p["heads"] for p in parts]
    out["back"] = torch.cat([p["back"] for p in parts], dim=2)
    out["logits"] = torch.cat([p["logits"] for p in parts], dim=1)
    return out


def single_process(kinds):
    batch, q, k, v, grad = inputs()
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = DenseMaskAttention(batch_dense_mask(dict(batch, mask_kind=kinds)))(q, k, v, D ** -0.5)
    out.backward(grad)
    return out.detach(), [q.grad, k.grad, v.grad]


def max_diff(a, b) -> float:
    out_a, grads_a = a
    out_b, grads_b = b
    return max([float((out_a - out_b).abs().max())] + [float((x - y).abs().max()) for x, y in zip(grads_a, grads_b)])


def test_seq_to_heads_layout(sp_result):
    x = torch.arange(2 * H * T * 3, dtype=torch.float32).view(2, H, T, 3)
    for r, heads in enumerate(sp_result["heads"]):
        assert torch.equal(heads, x[:, r * H // P:(r + 1) * H // P])  # full sequence, this rank's heads
    assert torch.equal(sp_result["back"], x)  # and back to sequence shards


def test_ulysses_equals_single_process(sp_result):
    assert max_diff(sp_result["sink"], single_process(KINDS)) <= 1e-5


def test_would_catch_a_causal_substitution(sp_result):
    sink_ref, causal_ref = single_process(KINDS), single_process(["causal"] * B)
    assert max_diff(sink_ref, causal_ref) > 1e-2  # the sink mask really changes the result on these inputs
    assert max_diff(sp_result["causal"], causal_ref) <= 1e-5  # Ulysses carries whatever mask it is given ...
    assert max_diff(sp_result["causal"], sink_ref) > 1e-2  # ... so a causal substitution fails the equality test
    assert max_diff(sp_result["sink"], sink_ref) <= 1e-5


def test_forward_batch_with_sequence_parallel_equals_single_process(sp_result):
    model, tokens = model_and_batch()
    with torch.no_grad():
        single = forward_batch(model, tokens, ModelConfig(attention="sink"))  # (B, T, V)
    assert sp_result["logits"].shape == single.shape
    torch.testing.assert_close(sp_result["logits"], single, atol=1e-5, rtol=0)


def test_shard_sequence_keeps_metadata_full_length():
    batch = random_packed_batch(1, 64, ["dialogue"])
    batch["input_ids"] = torch.arange(64)[None]
    batch["targets"] = torch.arange(100, 164)[None]
    local = shard_sequence(batch, 1, 2)
    assert torch.equal(local["input_ids"], torch.arange(32, 64)[None])
    assert torch.equal(local["targets"], torch.arange(132, 164)[None])
    assert torch.equal(local["position_ids"], batch["position_ids"][:, 32:])
    for c in ("doc_ids", "utt_ids", "eou", "blk"):
        assert local[c] is batch[c]
    assert local["mask_kind"] == ["dialogue"]
    with pytest.raises(ValueError, match="not divisible"):
        shard_sequence(batch, 0, 3)
    with pytest.raises(ValueError, match="full"):  # masks must be built from the full-length metadata
        SinkAttention(local)


def test_sp_size_must_divide_heads():
    check_sp_size(8, 4, 2)
    check_sp_size(9, 3, 3)
    with pytest.raises(ValueError, match=r"sequence_parallel_size=4 .*num_heads=8 and num_kv_heads=2"):
        check_sp_size(8, 2, 4)
    with pytest.raises(ValueError, match="num_heads=9"):
        check_sp_size(9, 3, 2)
