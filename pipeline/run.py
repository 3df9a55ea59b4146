"""``convsink run CONFIG``: prep → train → export → one chat reply, from one recipe."""

from __future__ import annotations

import os

from .config import RunConfig


def run_recipe(cfg: RunConfig) -> dict:
    """Run every stage into ``cfg.out_dir`` (data/, train/, export/); stages already complete are reused."""
    from data_prep.prep import prepare

    from .chat import run_chat
    from .checkpoint import checkpoint_root, latest_tag
    from .export import export_checkpoint
    from .launch import launch_training

    if not cfg.inputs:
        raise ValueError("the recipe has no inputs: list dialogue files under 'inputs:'")
    out = cfg.out_dir
    data_dir, train_dir, export_dir = (os.path.join(out, d) for d in ("data", "train", "export"))
    print(f"[1/4] prep {len(cfg.inputs)} file(s) -> {data_dir}", flush=True)
    manifest = prepare(cfg.inputs, data_dir, cfg.data)
    c = manifest["counts"]
    print(f"      {c['dialogues']} dialogues, {c['tokens_out']} tokens, {c['sequences']} sequences", flush=True)

    tag = latest_tag(checkpoint_root(train_dir))
    resume = tag is not None
    print(f"[2/4] train {cfg.train.max_steps} steps on {cfg.train.nproc} process(es)"
          + (f" (resuming from {tag})" if resume else "") + f" -> {train_dir}", flush=True)
    result = launch_training(cfg, data_dir, train_dir, resume=resume)

    print(f"[3/4] export -> {export_dir}", flush=True)
    export_checkpoint(train_dir, export_dir)

    print(f"[4/4] chat ({cfg.chat.cache} cache)\nuser: {cfg.chat_prompt}", flush=True)
    replies = run_chat(export_dir, [cfg.chat_prompt], cfg.chat)
    print(f"\ndone. exported model: {os.path.abspath(export_dir)}")
    if result.get("wandb_dir"):
        print(f"      W&B run ({cfg.wandb.mode}): {result['wandb_dir']}")
    return {"data": data_dir, "train": train_dir, "export": export_dir, "wandb_dir": result.get("wandb_dir"), "replies": replies}
