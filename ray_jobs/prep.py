"""Data preparation as a Ray job (the same pipeline as `convsink prep`):

    ray job submit --working-dir . -- python -m ray_jobs.prep INPUT... --out DIR [--config FILE] [key=value ...]

Inside a job, RAY_ADDRESS is set and the pipeline joins that cluster; run directly, it starts an embedded Ray.
"""

from __future__ import annotations

import glob
import sys


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    expanded = []
    for a in argv:  # globs are expanded here too (a job's shell may not)
        expanded += sorted(glob.glob(a)) if any(ch in a for ch in "*?[") and not a.startswith("-") else [a]
    return cli_main(["prep", *expanded])


if __name__ == "__main__":
    sys.exit(main())
