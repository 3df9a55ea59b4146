"""The whole recipe as one Ray job: prep on Ray Data, the memory stage, the dialogue stage (both on Ray Train), export and
one chat reply; the same ``run_recipe`` as `convsink run`:

    ray job submit --working-dir . --runtime-env-json '{"excludes": [".venv", ".git", "runs"]}' \
        -- python -m ray_jobs.run CONFIG --root $PWD [key=value ...]

Inside a job, RAY_ADDRESS is set and every stage runs on that cluster (one session); run directly, it starts an
embedded Ray once. Training always goes through Ray Train here (``train.launcher=ray``). A job runs in a temporary
copy of the working directory: ``--root`` names the folder the recipe's relative paths (CONFIG, inputs, out_dir) are
read from; it must be one the job's nodes see. Exit 0 on success, 2 on a bad recipe or input (one line), 1 when
training fails.
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.run", description="the whole recipe (prep, memory stage, "
                                "dialogue stage, export, chat) as one Ray job")
    p.add_argument("config", help="YAML recipe, e.g. configs/quickstart.yaml")
    p.add_argument("--root", help="folder the recipe's relative paths are read from (default: the working directory)")
    p.add_argument("overrides", nargs="*", help="config overrides as key=value, e.g. train.max_steps=4 out_dir=/data/run")
    return p


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import USER_ERRORS
    from pipeline.config import load_config, parse_args_with_overrides
    from pipeline.training.launch import TrainingFailed
    from pipeline.training.two_stage import run_recipe

    args = parse_args_with_overrides(build_parser(), argv)  # overrides may follow options
    try:
        if args.root:
            if not os.path.isdir(args.root):
                raise FileNotFoundError(f"{args.root}: --root is not a folder")
            os.chdir(args.root)
        cfg = load_config(args.config, list(args.overrides) + ["train.launcher=ray"])
        run_recipe(cfg)
    except USER_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"ray_jobs.run: error: {msg}", file=sys.stderr)
        return 2
    except TrainingFailed as e:
        print(f"ray_jobs.run: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
