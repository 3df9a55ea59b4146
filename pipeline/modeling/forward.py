"""One sink-masked forward of a transformers causal LM over a packed batch.
"""

from __future__ import annotations

import torch

from pipeline.attention.registry import prepare_attention, resolve_impl
from pipeline.config import ModelConfig


def attention_impl(cfg: ModelConfig, device: torch.device) -> str:
    return resolve_impl(cfg.attention, device)


def row_kinds(batch: dict, cfg: ModelConfig) -> list[str]:
    """Mask kind per row: 'dialogue' rows use ``cfg.mask.dialogue_kind`` (a baseline mask in comparison runs)."""
    return [cfg.mask.dialogue_kind if k == "dialogue" else k for k in batch["mask_kind"]]


def forward_batch(model, batch: dict, cfg: ModelConfig, impl: str | None = None) -> torch.Tensor:
    """Sink-masked forward of a packed batch; returns logits ``(B, T, V)``."""
    impl = impl or attention_impl(cfg, batch["input_ids"].device)
    meta = dict(batch, mask_kind=row_kinds(batch, cfg))
    attn = prepare_attention(meta, impl, cfg.mask.model_dump())
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], convsink_attn=attn, use_cache=False)
    return out.logits
