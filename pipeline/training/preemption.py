"""Save and stop on request, resume after a requeue: how a run survives a Slurm time limit or pre-emption.

A batch script's ``SIGUSR1`` trap (``sbatch --signal=B:USR1@N``) creates the stop file named by ``CONVSINK_STOP_FILE``.
Every rank polls it at each step boundary (one all-reduce, so all ranks stop after the same step); the loop then
saves a checkpoint there and returns without writing ``result.json``, and the script requeues the job. The requeued
job resumes from that checkpoint (``RESUME=auto``, the scripts' default).
"""

from __future__ import annotations

import os

STOP_FILE_ENV = "CONVSINK_STOP_FILE"
RESUME_SETTINGS = ("auto", "0", "1")


class StopRequest:
    """The stop file of this run (``CONVSINK_STOP_FILE``), or none: then ``poll`` is free and never stops."""

    def __init__(self, path: str | None):
        self.path = path or None

    @classmethod
    def from_env(cls) -> "StopRequest":
        """The stop file named by ``CONVSINK_STOP_FILE`` (unset or empty: no stop file)."""
        return cls(os.environ.get(STOP_FILE_ENV))

    def poll(self) -> bool:
        """True on every rank when any rank sees the stop file (a collective call when a stop file is set)."""
        if self.path is None:
            return False
        import torch
        import torch.distributed as dist

        seen = torch.tensor([1.0 if os.path.exists(self.path) else 0.0])
        if dist.is_initialized():
            dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        return bool(seen.item() > 0)


def resume_wanted(setting: str, out_dir: str, restart_count: int) -> bool:
    """Whether a batch job passes ``--resume``: ``RESUME=1`` always, ``0`` never, ``auto`` when the job is a requeued
    one (Slurm's ``SLURM_RESTART_COUNT`` > 0) and ``out_dir`` holds a complete checkpoint."""
    from pipeline.training import checkpoint

    if setting not in RESUME_SETTINGS:
        raise ValueError(f"RESUME={setting!r}: expected one of {', '.join(RESUME_SETTINGS)}")
    if setting != "auto":
        return setting == "1"
    return restart_count > 0 and checkpoint.latest_tag(checkpoint.checkpoint_root(out_dir)) is not None
