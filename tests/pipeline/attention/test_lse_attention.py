"""The log-sum-exp merge of the plan's parts: in bf16 it stays within bf16's error of the fp32 dense reference;
without autograd it gives the same output; the model's own layout (transposed ``(B, T, H, D)`` tensors) gives
the same result as contiguous inputs."""

from __future__ import annotations

import torch

from pipeline.attention.masks import batch_dense_mask
from pipeline.attention.registry import DenseMaskAttention
from pipeline.attention.sink_kernel import SinkAttention
from pipeline.bench.attention import conversation_batch
from tests.pipeline.attention.test_sink_kernel import PARAMS, qkv
from tests.pipeline.batches import random_packed_batch


def test_bf16_matches_the_fp32_dense_reference_within_bf16_error():
    batch = conversation_batch([4, 11, 2, 7, 19], 600)
    q, k, v = qkv(1, 600, H=4, Hkv=2, D=16)
    grad = torch.randn(1, 4, 600, 16, generator=torch.Generator().manual_seed(9))
    ref = DenseMaskAttention(batch_dense_mask(batch, PARAMS))(q, k, v, 0.25)
    g_ref = torch.autograd.grad(ref, (q, k, v), grad)
    lo = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    out = SinkAttention(batch, PARAMS, chunk=32, shared=128)(*lo, 0.25)
    assert out.dtype == torch.bfloat16
    g_out = torch.autograd.grad(out, lo, grad.bfloat16())
    assert (out.float() - ref).abs().max() < 3e-2
    for name, a, b in zip("qkv", g_out, g_ref):
        assert (a.float() - b).abs().max() < 5e-2 * max(1.0, float(b.abs().max())), f"d{name}"


def test_no_grad_and_the_models_layout_give_the_same_output():
    batch = random_packed_batch(2, 230, ["dialogue", "lmr"], seed=4)
    attn = SinkAttention(batch, PARAMS, chunk=32, shared=64)
    q, k, v = qkv(2, 230)
    out = attn(q, k, v, 0.25)
    with torch.no_grad():
        assert torch.equal(attn(q, k, v, 0.25), out)
    as_model = [t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v)]  # (B, T, H, D) memory
    out2 = attn(*as_model, 0.25)
    assert torch.allclose(out2, out, atol=1e-6)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(out2, as_model, g)):
        assert torch.allclose(a, b, atol=1e-6)


def test_shared_backward_split_for_idle_threads_gives_the_ops_own_gradients():
    """A shared part's backward split into query pieces (3 key heads on 2 or 4 threads) gives exactly what one
    call of the fused op gives, on the model's strided layout and with grouped queries folded in."""
    from pipeline.attention.lse_attention import _attn, _attn_backward, _shared_backward

    g = torch.Generator().manual_seed(3)
    hkv, M, n, D = 3, 1024, 70, 16
    q, do = (torch.randn(1, M, hkv, D, generator=g).transpose(1, 2) for _ in range(2))  # (1, Hkv, M, D), strided
    k, v = (torch.randn(1, hkv, n, D, generator=g) for _ in range(2))
    out, lse = _attn(q, k, v, scale=0.25)
    whole = _attn_backward(do, q, k, v, out, lse, 0.0, False, scale=0.25)
    for threads in (2, 4):
        split = _shared_backward(do, q, k, v, out, lse, 0.25, threads=threads)
        for name, a, b in zip("qkv", split, whole):
            assert a.shape == b.shape, name
            assert torch.allclose(a, b, atol=1e-5), f"d{name} on {threads} threads"
