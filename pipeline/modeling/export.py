"""ZeRO-3 checkpoint → merged Hugging Face folder that plain ``transformers`` loads.

    OUT/config.json  model.safetensors  tokenizer files  generation_config.json  convsink.json

``convsink.json`` names the EoU token and the mask and cache settings the model was trained for. The folder is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import torch

from data_prep.paths import folder_written_atomically
from pipeline.config import RunConfig
from pipeline.contract import CacheSettings, ExportInfo
from pipeline.modeling.zero3_consolidate import consolidate_zero3
from pipeline.training import checkpoint


def _run_dir_of(path: str) -> str:
    root = checkpoint.checkpoint_root(path)
    return os.path.dirname(os.path.normpath(root)) if os.path.basename(os.path.normpath(root)) == "checkpoints" else path


def export_checkpoint(checkpoint_dir: str, out: str, tag: str | None = None) -> str:
    """Consolidate the newest (or ``tag``) checkpoint of a `convsink train` run into ``out``."""
    from transformers import AutoTokenizer

    from pipeline.modeling.loader import build_model

    root = checkpoint.checkpoint_root(checkpoint_dir)
    tag = tag or checkpoint.latest_tag(root)
    if tag is None or not os.path.isdir(os.path.join(root, tag)):
        raise FileNotFoundError(f"{checkpoint_dir}: no complete checkpoint to export")
    run_dir = _run_dir_of(checkpoint_dir)
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{run_dir}: no config.json (is this a `convsink train` output folder?)")
    with open(cfg_path) as f:
        cfg = RunConfig.model_validate(json.load(f))
    with open(os.path.join(run_dir, "data.json")) as f:
        data_info = json.load(f)
    tok_meta = data_info["tokenizer"]
    ids = ExportInfo.from_manifest(tok_meta).special_ids
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(run_dir, "tokenizer"))

    state = consolidate_zero3(os.path.join(root, tag))
    model = build_model(cfg.model, tok_meta["vocab_size"], ids, path=cfg.train.init_from)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"{root}/{tag}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if cfg.model.lora.enabled:
        model = model.merge_and_unload()  # LoRA folded into the base weights: a plain transformers model
    model.config._attn_implementation = "sdpa"  # plain transformers needs no convsink to load it
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = ids.bos, ids.eou, ids.pad
    if model.generation_config is not None:
        model.generation_config.bos_token_id, model.generation_config.eos_token_id = ids.bos, ids.eou
        model.generation_config.pad_token_id = ids.pad

    with folder_written_atomically(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        ExportInfo.from_manifest(
            tok_meta, eou_token=tokenizer.convert_ids_to_tokens(ids.eou), mask=cfg.model.mask.model_dump(),
            cache=asdict(CacheSettings(cfg.chat.cache, cfg.chat.positions, cfg.chat.sink_tokens, cfg.chat.window)),
            source={"checkpoint": os.path.abspath(os.path.join(root, tag)), "stage": cfg.train.stage}).write(tmp)
    return out


def load_exported(model_dir: str, dtype: torch.dtype = torch.float32):
    """Load an exported folder with plain transformers (what users do)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
