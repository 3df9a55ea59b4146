"""Masked attention plugged into any transformers causal LM through its public ``AttentionInterface``.

``register()`` adds the ``"convsink"`` attention implementation. Per forward, the caller passes
``convsink_attn=<callable>`` (built once per batch by ``prepare_attention``); every layer then calls it with
``query (B, H, Tq, D)``, ``key``/``value (B, Hkv, Tk, D)``. No modeling code is forked, and transformers is told
not to build its own T×T mask (``AttentionMaskInterface`` returns None for "convsink").
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.attention.masks import MaskParams, batch_dense_mask
from pipeline.contract import AUTO, DENSE, FLEX, SINK

NAME = "convsink"
AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


class DenseMaskAttention:
    """Reference path: SDPA with an explicit boolean mask ``(B, 1, Tq, Tk)`` (True = attend)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask if mask.dim() == 4 else mask.unsqueeze(1)

    def __call__(self, query, key, value, scaling):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=self.mask, scale=scaling,
                                              enable_gqa=key.shape[1] != query.shape[1])


def convsink_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: returns ``(B, Tq, H, D)`` and no weights."""
    fn = kwargs.get("convsink_attn")
    if fn is None:
        raise RuntimeError("the 'convsink' attention needs convsink_attn=... in the forward call "
                           "(use pipeline.modeling.forward.forward_batch, or load the exported model with attn_implementation='sdpa')")
    if hasattr(fn, "layer_call"):  # stateful callables (the streaming KV cache) need the layer index
        out = fn.layer_call(module, query, key, value, scaling)
    else:
        out = fn(query, key, value, scaling)  # (B, H, Tq, D)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None


_registered = False


def register() -> str:
    """Register the 'convsink' attention and its (empty) mask builder with transformers; idempotent."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(NAME, convsink_attention)
        AttentionMaskInterface.register(NAME, _no_mask)
        _registered = True
    return NAME


def resolve_impl(impl: str, device: torch.device) -> str:
    """'auto' → 'flex' on CUDA, else the sink kernel on CPU when available, else dense."""
    if impl != AUTO:
        return impl
    if device.type == "cuda":
        return FLEX
    try:
        from pipeline.attention import sink_kernel  # noqa: F401  (issue: fast sink attention)
        return SINK
    except ImportError:
        return DENSE


def prepare_attention(batch: dict, impl: str = DENSE, params: MaskParams = MaskParams()) -> AttnFn:
    """Build the per-batch attention callable for ``batch`` (metadata ``(B, T)`` + ``mask_kind`` per row) under the
    mask parameters ``params`` (``pipeline.config.MaskConfig.params()``; a dict is a TypeError)."""
    if impl == DENSE:
        return DenseMaskAttention(batch_dense_mask(batch, params))
    if impl in (SINK, FLEX):
        from pipeline.attention.sink_kernel import prepare_sink_attention

        return prepare_sink_attention(batch, impl, params)
    raise ValueError(f"unknown attention implementation {impl!r}; expected auto, dense, sink or flex")
