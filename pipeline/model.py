"""Build or load a transformers causal LM, set the EoU token, and run a sink-masked forward over a batch."""

from __future__ import annotations

import copy

import torch

from data_prep.tokenizer import SpecialIds

from .attention import prepare_attention, register, resolve_impl
from .config import ModelConfig


def llama_config(cfg: ModelConfig, vocab_size: int, ids: SpecialIds):
    """A small Llama config for random init (the quickstart's model)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=ids.bos, eos_token_id=ids.eou, pad_token_id=ids.pad,
    )


def build_model(cfg: ModelConfig, vocab_size: int, ids: SpecialIds, dtype: torch.dtype = torch.float32, path: str | None = None):
    """Random init from ``cfg`` (or load ``path``/``cfg.path``) with the 'convsink' attention; resize embeddings
    when the tokenizer has more tokens than the model (a new EoU token)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    register()
    path = path or cfg.path
    if path is None:
        model = LlamaForCausalLM._from_config(copy.deepcopy(llama_config(cfg, vocab_size, ids)), attn_implementation="convsink", dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="convsink", dtype=dtype)
    if model.get_input_embeddings().weight.shape[0] < vocab_size:
        model.resize_token_embeddings(vocab_size)
    model.config.eos_token_id = ids.eou
    return model


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
