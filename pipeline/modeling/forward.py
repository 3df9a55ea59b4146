"""One sink-masked forward of a transformers causal LM over a packed batch: the one forward used by training
(with Ulysses sequence parallelism), held-out eval, the memory probe, perplexity and the tests.
"""

from __future__ import annotations

import torch

from pipeline.attention.registry import prepare_attention, resolve_impl
from pipeline.attention.ulysses import SequenceParallel
from pipeline.config import ModelConfig
from pipeline.contract import DIALOGUE, INPUT_IDS, MASK_KIND, POSITION_IDS


def attention_impl(cfg: ModelConfig, device: torch.device) -> str:
    return resolve_impl(cfg.attention, device)


def row_kinds(batch: dict, cfg: ModelConfig) -> list[str]:
    """Mask kind per row: 'dialogue' rows use ``cfg.mask.dialogue_kind`` (a baseline mask in comparison runs)."""
    return [cfg.mask.dialogue_kind if k == DIALOGUE else k for k in batch[MASK_KIND]]


def forward_batch(model, batch: dict, cfg: ModelConfig, impl: str | None = None,
                  sp: SequenceParallel | None = None) -> torch.Tensor:
    """Sink-masked forward of a packed batch (full-length ``(B, T)`` columns); returns logits ``(B, T, V)``, or
    ``(B, T/P, V)`` for this rank's token slice under sequence parallelism ``sp`` of size P. ``model``: a causal
    LM loaded with ``attn_implementation="convsink"``, or a DeepSpeed engine wrapping one. The attention callable
    is built once per batch from the full-length metadata, then wrapped by ``sp``."""
    impl = impl or attention_impl(cfg, batch[INPUT_IDS].device)
    meta = dict(batch, mask_kind=row_kinds(batch, cfg))
    attn = prepare_attention(meta, impl, cfg.mask.params())
    if sp is not None:
        attn, batch = sp.wrap(attn), sp.local(batch)  # input_ids, position_ids (B, T/P)
    out = model(input_ids=batch[INPUT_IDS], position_ids=batch[POSITION_IDS], convsink_attn=attn, use_cache=False)
    return out.logits
