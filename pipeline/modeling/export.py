"""ZeRO-3 checkpoint → merged Hugging Face folder that plain ``transformers`` loads.

    OUT/config.json  model.safetensors  tokenizer files  generation_config.json  convsink.json

``convsink.json`` names the EoU token and the mask and cache settings the model was trained for. The folder is
written under a temporary name and renamed when complete; it replaces only an earlier export (``check_export_out``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import torch

from data_prep.paths import folder_written_atomically
from pipeline.config import RunConfig
from pipeline.contract import EXPORT_INFO_FILE, CacheSettings, ExportInfo
from pipeline.modeling.zero3_consolidate import consolidate_zero3
from pipeline.training import checkpoint


def _run_dir_of(path: str) -> str:
    root = checkpoint.checkpoint_root(path)
    return os.path.dirname(os.path.normpath(root)) if os.path.basename(os.path.normpath(root)) == "checkpoints" else path


def check_export_out(out: str, run_dir: str) -> None:
    """Export replaces ``out`` whole, so ``out`` must neither be nor lie inside nor contain the run folder, and an
    existing ``out`` must be an earlier export (it holds convsink.json); anything else is refused, never deleted."""
    o, r = os.path.realpath(out), os.path.realpath(run_dir)
    if os.path.commonpath([o, r]) == r:
        raise ValueError(f"{out}: --out is inside the run folder {run_dir} (exporting there would replace the run's files); "
                         "choose a folder outside it")
    if os.path.commonpath([o, r]) == o:
        raise ValueError(f"{out}: --out contains the run folder {run_dir} (exporting there would delete the run); "
                         "choose a folder outside it")
    if os.path.lexists(out) and not os.path.isfile(os.path.join(out, EXPORT_INFO_FILE)):
        raise FileExistsError(f"{out}: exists and is not an exported model folder (no {EXPORT_INFO_FILE}); "
                              "choose a new --out, or remove it yourself")


def check_complete(tag_dir: str) -> None:
    """``--tag``'s folder must be a complete checkpoint: its ``convsink_state.json`` and, for every rank of the
    world size it records, that rank's ZeRO files (consolidating fewer would build wrong weights)."""
    if not os.path.isdir(tag_dir):
        raise FileNotFoundError(f"{tag_dir}: no such checkpoint folder")
    missing = checkpoint.incomplete_reason(tag_dir)
    if missing:
        raise ValueError(f"{tag_dir}: {missing}; not exported")


def export_checkpoint(checkpoint_dir: str, out: str, tag: str | None = None) -> str:
    """Consolidate the newest (or ``tag``) checkpoint of a `convsink train` run into ``out``."""
    from transformers import AutoTokenizer

    from pipeline.modeling.loader import build_model

    root = checkpoint.checkpoint_root(checkpoint_dir)
    tag = tag or checkpoint.latest_tag(root)
    if tag is None:
        raise FileNotFoundError(f"{checkpoint_dir}: no complete checkpoint to export")
    check_complete(os.path.join(root, tag))
    run_dir = _run_dir_of(checkpoint_dir)
    check_export_out(out, run_dir)
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
            source={"checkpoint": os.path.abspath(os.path.join(root, tag)), "stage": cfg.train.stage},
            layout=layout_of(cfg.data)).write(tmp)
        if tokenizer.chat_template and not os.path.isfile(os.path.join(tmp, "chat_template.jinja")):
            raise ValueError(f"{tmp}: the tokenizer's chat template was not saved (chat_template.jinja missing)")
    return out


def layout_of(data_cfg) -> dict:
    """The ``layout`` section of convsink.json: how training rendered dialogues (chat and eval follow it)."""
    return {"template": data_cfg.template, "train_on": data_cfg.train_on,
            "pin_system": data_cfg.pin_system is not False if data_cfg.template == "chat" else False}


def load_exported(model_dir: str, dtype: torch.dtype = torch.float32):
    """Load an exported folder with plain transformers (what users do)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
