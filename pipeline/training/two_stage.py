"""``convsink run CONFIG``: prep → [memory stage →] dialogue stage → export → one chat reply, from one recipe.

When the recipe asks for SMR/LMR samples (``data.smr.samples`` / ``data.lmr.samples``), the memory stage trains on
them first and the dialogue stage starts from its exported weights (method.md §2, the reference schedule).
"""

from __future__ import annotations

import os

from pipeline.config import RunConfig
from pipeline.contract import DIALOGUE_STAGE, MEMORY_STAGE


def _train_stage(cfg: RunConfig, data_dir: str, train_dir: str, export_dir: str, label: str) -> dict:
    from pipeline.modeling.export import export_checkpoint
    from pipeline.training.checkpoint import checkpoint_root, latest_tag
    from pipeline.training.launch import launch_training

    tag = latest_tag(checkpoint_root(train_dir))
    resume = tag is not None
    print(f"[{label}] train {cfg.train.stage} stage: {cfg.train.max_steps} steps on {cfg.train.nproc} process(es)"
          + (f", resuming from {tag}" if resume else "") + f" -> {train_dir}", flush=True)
    result = launch_training(cfg, data_dir, train_dir, resume=resume)
    print(f"[{label}] export -> {export_dir}", flush=True)
    export_checkpoint(train_dir, export_dir)
    return result


def run_recipe(cfg: RunConfig) -> dict:
    """Run every stage into ``cfg.out_dir``; a stage already complete is reused (prep by fingerprint, training
    by resuming from its newest checkpoint)."""
    from data_prep.prep import prepare
    from pipeline.inference.chat import run_chat

    if not cfg.inputs:
        raise ValueError("the recipe has no inputs: list dialogue files under 'inputs:'")
    out = cfg.out_dir
    data_dir = os.path.join(out, "data")
    print(f"[prep] {len(cfg.inputs)} file(s) -> {data_dir}", flush=True)
    manifest = prepare(cfg.inputs, data_dir, cfg.data)
    c = manifest["counts"]
    print(f"[prep] {c['dialogues']} dialogues, {c['tokens_out']} tokens, {c['sequences']} sequences", flush=True)

    dialogue_cfg = cfg
    if cfg.data.smr.samples or cfg.data.lmr.samples:
        memory_cfg = cfg.model_copy(deep=True)
        memory_cfg.train.stage = MEMORY_STAGE
        memory_cfg.train.max_steps = cfg.train.memory_steps or cfg.train.max_steps
        memory_cfg.wandb.name = f"{cfg.wandb.name or os.path.basename(os.path.abspath(out))}-memory"
        memory_export = os.path.join(out, "export-memory")
        _train_stage(memory_cfg, data_dir, os.path.join(out, "train-memory"), memory_export, MEMORY_STAGE)
        dialogue_cfg = cfg.model_copy(deep=True)
        dialogue_cfg.train.init_from = memory_export

    dialogue_cfg.train.stage = DIALOGUE_STAGE
    export_dir = os.path.join(out, "export")
    result = _train_stage(dialogue_cfg, data_dir, os.path.join(out, "train"), export_dir, DIALOGUE_STAGE)

    print(f"[chat] {cfg.chat.cache} cache\nuser: {cfg.chat_prompt}", flush=True)
    replies = run_chat(export_dir, [cfg.chat_prompt], cfg.chat)
    print(f"\ndone. exported model: {os.path.abspath(export_dir)}")
    if result.get("wandb_dir"):
        print(f"      W&B run ({cfg.wandb.mode}): {result['wandb_dir']}")
    return {"data": data_dir, "export": export_dir, "wandb_dir": result.get("wandb_dir"), "replies": replies}
