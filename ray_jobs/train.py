"""Training as a Ray job (the same arguments as `convsink train`; ranks are Ray Train workers):

    ray job submit --working-dir . --runtime-env-json '{"excludes": [".venv", ".git", "runs"]}' \
        -- python -m ray_jobs.train --config FILE --data DIR --out DIR [--resume [--allow-batch-change]] [key=value ...]

Inside a job, RAY_ADDRESS is set and the run joins that cluster; run directly, it starts an embedded Ray. Workers
that fail are restarted from the newest checkpoint (``--max-failures`` times). DATA and OUT must be paths every
node sees (absolute paths: a job's working directory is a temporary copy).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import add_allow_batch_change
from pipeline.contract import STAGES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.train", description="DeepSpeed ZeRO-3 training on Ray Train")
    p.add_argument("--config", required=True, help="YAML recipe")
    p.add_argument("--data", required=True, help="shard folder from `convsink prep`")
    p.add_argument("--out", required=True, help="run folder (checkpoints, W&B run)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--stage", choices=STAGES, help="memory = SMR+LMR samples, dialogue = dialogue fine-tuning (default: the recipe's train.stage)")
    add_allow_batch_change(p)
    p.add_argument("--num-workers", type=int, help="Ray Train workers (default: train.nproc x train.nnodes)")
    p.add_argument("--storage-path", help="Ray Train storage (default: OUT/ray); must be reachable from every node")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from the newest checkpoint (default 2)")
    p.add_argument("overrides", nargs="*", help="config overrides as key=value, e.g. train.lr=3e-4 data.seq_len=512")
    return p


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import USER_ERRORS, train_overrides
    from pipeline.config import load_config, parse_args_with_overrides
    from pipeline.training.launch import TrainingFailed
    from pipeline.training.ray_train import ray_train

    args = parse_args_with_overrides(build_parser(), argv)  # overrides may follow options
    try:
        cfg = load_config(args.config, train_overrides(args))
        result = ray_train(cfg, args.data, args.out, resume=args.resume, num_workers=args.num_workers,
                           storage_path=args.storage_path, max_failures=args.max_failures)
    except USER_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"ray_jobs.train: error: {msg}", file=sys.stderr)
        return 2
    except TrainingFailed as e:
        print(f"ray_jobs.train: error: {e}", file=sys.stderr)
        return 1
    print(f"train: checkpoint {result['checkpoint']} (Ray: {result['ray_checkpoint']})")
    if result["restores"]:
        print(f"train: resumed {len(result['restores'])} time(s) from " + ", ".join(r["tag"] for r in result["restores"]))
    if result.get("wandb_dir"):
        print(f"train: W&B run {result['wandb_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
