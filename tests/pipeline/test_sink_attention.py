"""The sink attention equals dense-mask SDPA (outputs and input gradients) for every mask kind, mixed batches
included, and a tiny Llama gives the same logits and parameter gradients with it."""

from __future__ import annotations

import pytest
import torch

from pipeline.attention import DenseMaskAttention
from pipeline.masks import batch_dense_mask
from pipeline.sink_attention import SinkAttention

from .batches import random_packed_batch

PARAMS = dict(local_window=16, sink_tokens=2, sink_window=16, bigbird_global=1, bigbird_window=16, bigbird_random=3, bigbird_seed=1)
KINDS = ["causal", "dialogue", "smr", "lmr", "local", "streamingllm", "bigbird"]


def compare(kinds, T, chunk=64, H=4, Hkv=2, D=16, seed=0, max_utt_len=12):
    torch.manual_seed(seed)
    batch = random_packed_batch(len(kinds), T, kinds, seed=seed, max_utt_len=max_utt_len)
    q = torch.randn(len(kinds), H, T, D, requires_grad=True)
    k = torch.randn(len(kinds), Hkv, T, D, requires_grad=True)
    v = torch.randn(len(kinds), Hkv, T, D, requires_grad=True)
    ref = DenseMaskAttention(batch_dense_mask(batch, **PARAMS))(q, k, v, D ** -0.5)
    sink = SinkAttention(batch, chunk=chunk, **PARAMS)
    out = sink(q, k, v, D ** -0.5)
    grad = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, (q, k, v), grad)
    g_out = torch.autograd.grad(out, (q, k, v), grad)
    assert (out - ref).abs().max() <= 1e-5
    for a, b in zip(g_out, g_ref):
        assert (a - b).abs().max() <= 1e-5
    return sink.keys_computed / sink.keys_dense


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_matches_dense(kind):
    frac = compare([kind, kind], T=512)
    if kind != "causal":
        assert frac < 0.5, f"{kind}: computed {frac:.2%} of the T×T keys"


def test_mixed_kinds_in_one_batch():
    compare(["smr", "lmr", "dialogue", "bigbird"], T=384, seed=5)


@pytest.mark.slow
@pytest.mark.parametrize("T", [2048, 4096])
def test_long_rows_match_dense(T):
    frac = compare(["dialogue", "lmr"], T=T, chunk=256, H=2, Hkv=1, D=8, max_utt_len=30)
    assert frac < 0.25


def test_tiny_llama_logits_and_grads_equal_dense(tokenizer):
    from data_prep.tokenizer import prepare_tokenizer
    from pipeline.config import ModelConfig
    from pipeline.model import build_model, forward_batch

    torch.manual_seed(0)
    ids = prepare_tokenizer(tokenizer)
    model = build_model(ModelConfig(hidden_size=32, intermediate_size=64), 512, ids)
    batch = random_packed_batch(2, 256, ["dialogue", "smr"], seed=2)
    batch["input_ids"] = torch.randint(0, 512, (2, 256))
    grads = {}
    for impl in ("dense", "sink"):
        model.zero_grad()
        logits = forward_batch(model, batch, ModelConfig(), impl=impl)
        logits.square().mean().backward()
        grads[impl] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(grads["sink"][0], grads["dense"][0], atol=1e-5, rtol=0)
    for n, g in grads["dense"][1].items():
        torch.testing.assert_close(grads["sink"][1][n], g, atol=1e-5, rtol=1e-4, msg=n)


def test_flex_forward_on_cpu_equals_dense():
    from pipeline.sink_attention import FlexSinkAttention

    batch = random_packed_batch(2, 256, ["dialogue", "lmr"], seed=4)
    q, k, v = torch.randn(2, 4, 256, 16), torch.randn(2, 2, 256, 16), torch.randn(2, 2, 256, 16)
    ref = DenseMaskAttention(batch_dense_mask(batch, **PARAMS))(q, k, v, 0.25)
    out = FlexSinkAttention(batch, **PARAMS)(q, k, v, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
