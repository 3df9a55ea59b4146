"""One sink-masked forward of a transformers causal LM over a packed batch: the one forward used by training
(with Ulysses sequence parallelism), held-out eval, the memory probe, perplexity and the tests.

``forward_batch`` returns logits; ``forward_hidden`` returns the final hidden states (after the last norm) and the
output layer, for a loss computed chunk by chunk (``pipeline.training.tiled_loss``) so the ``(T, V)`` logits never
exist at once. Both run through ``model(...)`` itself, so a DeepSpeed engine's forward hooks run as usual.
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


def _model_output(model, batch: dict, cfg: ModelConfig, impl: str | None, sp: SequenceParallel | None, **extra):
    """The model's output for ``batch``; the attention callable is built ONCE here (decoder layers recomputed by
    activation checkpointing call the same callable again, they never rebuild its plan)."""
    impl = impl or attention_impl(cfg, batch[INPUT_IDS].device)
    meta = dict(batch, mask_kind=row_kinds(batch, cfg))
    attn = prepare_attention(meta, impl, cfg.mask.params())
    if sp is not None:
        attn, batch = sp.wrap(attn), sp.local(batch)  # input_ids, position_ids (B, T/P)
    return model(input_ids=batch[INPUT_IDS], position_ids=batch[POSITION_IDS], convsink_attn=attn, use_cache=False,
                 **extra)


def forward_batch(model, batch: dict, cfg: ModelConfig, impl: str | None = None,
                  sp: SequenceParallel | None = None) -> torch.Tensor:
    """Sink-masked forward of a packed batch (full-length ``(B, T)`` columns); returns logits ``(B, T, V)``, or
    ``(B, T/P, V)`` for this rank's token slice under sequence parallelism ``sp`` of size P. ``model``: a causal
    LM loaded with ``attn_implementation="convsink"``, or a DeepSpeed engine wrapping one. The attention callable
    is built once per batch from the full-length metadata, then wrapped by ``sp``."""
    return _model_output(model, batch, cfg, impl, sp).logits


def output_layer(model) -> torch.nn.Module:
    """The LM head module of a causal LM, a peft model or a DeepSpeed engine (``engine.module``)."""
    return getattr(model, "module", model).get_output_embeddings()


def forward_hidden(model, batch: dict, cfg: ModelConfig, impl: str | None = None,
                   sp: SequenceParallel | None = None) -> tuple[torch.Tensor, torch.nn.Module]:
    """Like ``forward_batch`` but returns the final hidden states ``(B, T_local, D)`` (after the last norm) and the
    LM head module, whose call gives the logits. The head runs on no position here (``logits_to_keep`` is an
    empty index), so no ``(T, V)`` tensor is made."""
    none = torch.zeros(0, dtype=torch.long, device=batch[INPUT_IDS].device)
    out = _model_output(model, batch, cfg, impl, sp, logits_to_keep=none, output_hidden_states=True)
    return out.hidden_states[-1], output_layer(model)


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (non-reentrant ``torch.utils.checkpoint``), through transformers'
    public switch; ``model`` is a causal LM or a peft model. Active in training mode only."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
