"""Data preparation as a Ray job (the same pipeline and output as `convsink prep`):

    ray job submit --working-dir . -- python -m ray_jobs.prep INPUT... --out DIR [--config FILE] [--overwrite] [data.key=value ...]

INPUTs are paths, glob patterns (expanded here, quoted or not) or URIs pyarrow reads. Inside a job RAY_ADDRESS is
set and the pipeline runs on that cluster; run directly, it starts an embedded local Ray. ``--out`` is written
by the driver (the job's entrypoint process). Exit 0 on success, 2 on bad input (one line: FILE:LINE: reason).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import split_overrides


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.prep", description=__doc__.splitlines()[0])
    p.add_argument("items", nargs="+", help="input files / globs / URIs, then optional data.key=value overrides")
    p.add_argument("--out", required=True, help="output shard folder")
    p.add_argument("--config", help="YAML recipe (its data: section is used)")
    p.add_argument("--format", choices=["auto", "canonical", "personachat", "msc", "messages"])
    p.add_argument("--engine", choices=["ray", "local"], default="ray")
    p.add_argument("--workers", type=int)
    p.add_argument("--overwrite", action="store_true", help="replace an --out that holds shards of another fingerprint")
    args = p.parse_intermixed_args(argv)  # inputs and overrides may come before or after the options
    args.inputs, args.overrides = split_overrides(args.items)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        from data_prep.prep import prepare
        from pipeline.config import load_config

        overrides = list(args.overrides) + [f"data.engine={args.engine}"]
        if args.format:
            overrides.append(f"data.format={args.format}")
        if args.workers:
            overrides.append(f"data.workers={args.workers}")
        cfg = load_config(args.config, overrides).data
        manifest = prepare(args.inputs, args.out, cfg, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # DataError and ConfigError are ValueErrors
        print(f"ray_jobs.prep: error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
              file=sys.stderr)
        return 2
    c = manifest["counts"]
    print(f"prep: {c['records']} records ({c['rejected']} rejected), {c['tokens_out']} tokens in {c['sequences']} "
          f"sequences, packing efficiency {c['packing_efficiency']:.2%}, fingerprint {manifest['fingerprint']} -> {args.out}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
