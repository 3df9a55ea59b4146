"""``convsink run CONFIG``: prep → [memory stage →] dialogue stage → export → one chat reply, from one recipe.

When the recipe asks for SMR/LMR samples (``data.smr.samples`` / ``data.lmr.samples``), the memory stage trains on
them first and the dialogue stage starts from its exported weights (method.md §2, the reference schedule).
Each stage trains through ``train.launcher`` (torchrun, deepspeed, or ray = Ray Train workers). When prep
(``data.engine=ray``) or training uses Ray, one Ray session serves them all: the embedded Ray started once, or the
cluster of ``RAY_ADDRESS`` inside ``ray job submit`` (``ray_jobs.run``). The run ends by printing where the shards,
checkpoints, W&B runs and export are, and one line per stage with its wall time.
"""

from __future__ import annotations

import contextlib
import os
import time

from pipeline.config import RunConfig
from pipeline.contract import DIALOGUE_STAGE, MEMORY_STAGE

PREP, EXPORT, CHAT = "prep", "export", "chat"  # stage names of the printout (the training stages: contract's)


@contextlib.contextmanager
def _timed(times: dict, stage: str):
    """Record the wall time of the block as ``times[stage]``."""
    t0 = time.perf_counter()
    yield
    times[stage] = time.perf_counter() - t0


def train_stage(cfg: RunConfig, data_dir: str, train_dir: str, label: str) -> dict:
    """Train one stage into ``train_dir`` (resuming its newest checkpoint); returns the launch result plus
    ``checkpoint`` (the final checkpoint folder)."""
    from pipeline.training.checkpoint import checkpoint_root, latest_tag
    from pipeline.training.launch import launch_training

    tag = latest_tag(checkpoint_root(train_dir))
    resume = tag is not None
    print(f"[{label}] train {cfg.train.stage} stage: {cfg.train.max_steps} steps on {cfg.train.nproc} process(es) "
          f"via {cfg.train.launcher}" + (f", resuming from {tag}" if resume else "") + f" -> {train_dir}", flush=True)
    result = dict(launch_training(cfg, data_dir, train_dir, resume=resume))
    root = checkpoint_root(train_dir)
    result["checkpoint"] = os.path.join(root, latest_tag(root))
    return result


def export_stage(train_dir: str, export_dir: str, label: str) -> None:
    """Export the newest checkpoint of ``train_dir`` to ``export_dir`` (a Hugging Face folder)."""
    from pipeline.modeling.export import export_checkpoint

    print(f"[{label}] export -> {export_dir}", flush=True)
    export_checkpoint(train_dir, export_dir)


def _start_ray(cfg: RunConfig) -> None:
    """One Ray session for prep and every training stage, when any of them runs on Ray (Ray start-up is 5-14 s)."""
    if cfg.data.engine == "ray" or cfg.train.launcher == "ray":
        from data_prep.ray_cluster import ensure_ray

        # each rank's lines as they come: Ray's de-duplication holds repeats up to 5 s, past the run's last lines
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        # worker output on (the training ranks' progress bars show); the dashboard only for Ray Train's state queries
        ensure_ray(num_cpus=cfg.data.workers or 0, dashboard=cfg.train.launcher == "ray")


def run_recipe(cfg: RunConfig) -> dict:
    """Run every stage into ``cfg.out_dir``; a stage already complete is reused (prep by fingerprint, training
    by resuming from its newest checkpoint). Returns the paths written, the chat replies and the stage times."""
    from data_prep.prep import prepare
    from pipeline.inference.chat import run_chat

    if not cfg.inputs:
        raise ValueError("the recipe has no inputs: list dialogue files under 'inputs:'")
    out = os.path.abspath(cfg.out_dir)
    data_dir, export_dir = os.path.join(out, "data"), os.path.join(out, "export")
    times: dict[str, float] = {}
    stages: dict[str, dict] = {}
    with _timed(times, PREP):
        print(f"[{PREP}] {len(cfg.inputs)} file(s) on the {cfg.data.engine} engine -> {data_dir}", flush=True)
        _start_ray(cfg)
        # absolute: Ray workers (a job's working-directory copy) resolve relative paths against their own folder
        inputs = [p if "://" in p else os.path.abspath(p) for p in cfg.inputs]
        manifest = prepare(inputs, data_dir, cfg.data)
        c = manifest["counts"]
        print(f"[{PREP}] {c['dialogues']} dialogues, {c['tokens_out']} tokens, {c['sequences']} sequences", flush=True)

    dialogue_cfg = cfg.model_copy(deep=True)
    if cfg.data.smr.samples or cfg.data.lmr.samples:
        with _timed(times, MEMORY_STAGE):
            memory_cfg = cfg.model_copy(deep=True)
            memory_cfg.train.stage = MEMORY_STAGE
            memory_cfg.train.max_steps = cfg.train.memory_steps or cfg.train.max_steps
            memory_cfg.wandb.name = f"{cfg.wandb.name or os.path.basename(out)}-memory"
            memory_export = os.path.join(out, "export-memory")
            stages[MEMORY_STAGE] = train_stage(memory_cfg, data_dir, os.path.join(out, "train-memory"), MEMORY_STAGE)
            export_stage(os.path.join(out, "train-memory"), memory_export, MEMORY_STAGE)
        dialogue_cfg.train.init_from = memory_export

    dialogue_cfg.train.stage = DIALOGUE_STAGE
    with _timed(times, DIALOGUE_STAGE):
        stages[DIALOGUE_STAGE] = train_stage(dialogue_cfg, data_dir, os.path.join(out, "train"), DIALOGUE_STAGE)
    with _timed(times, EXPORT):
        export_stage(os.path.join(out, "train"), export_dir, EXPORT)
    with _timed(times, CHAT):
        print(f"[{CHAT}] {cfg.chat.cache} cache\nuser: {cfg.chat_prompt}", flush=True)
        replies = run_chat(export_dir, [cfg.chat_prompt], cfg.chat)

    print_summary(cfg, data_dir, stages, export_dir, times)
    return {"data": data_dir, "export": export_dir, "wandb_dir": stages[DIALOGUE_STAGE].get("wandb_dir"),
            "stages": stages, "replies": replies, "times": times}


def print_summary(cfg: RunConfig, data_dir: str, stages: dict, export_dir: str, times: dict) -> None:
    """Where the shards, each stage's checkpoint and W&B run, and the export are; then one line per stage's time."""
    lines = ["", "done. where everything is:", f"  shards: {data_dir}"]
    for stage, result in stages.items():
        lines.append(f"  {stage} checkpoint: {result['checkpoint']}")
        wandb = result.get("wandb_dir")
        lines.append(f"  {stage} W&B run ({cfg.wandb.mode}): {wandb}" if wandb
                     else f"  {stage} W&B run: none (wandb.mode={cfg.wandb.mode})")
    lines += [f"  exported model: {export_dir}", "stage times:"]
    lines += [f"  {stage:<9} {seconds:7.1f} s" for stage, seconds in times.items()]
    print("\n".join(lines), flush=True)
