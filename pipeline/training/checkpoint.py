"""Atomic checkpoints: written under a temporary name, renamed when every rank has finished, and only then
named in ``latest`` (itself replaced atomically). An interrupted save never becomes the resume point.

    OUT/checkpoints/step000010/      (DeepSpeed files of every rank + convsink_state.json)
    OUT/checkpoints/latest           ("step000010")
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch.distributed as dist

from data_prep.paths import write_text_atomic

LATEST = "latest"
_TAG = re.compile(r"^step(\d{6,})$")


def tag_for(step: int) -> str:
    return f"step{step:06d}"


def checkpoint_root(out_dir: str) -> str:
    """``OUT/checkpoints`` (accepts the checkpoints folder itself too)."""
    if os.path.isfile(os.path.join(out_dir, LATEST)) or os.path.basename(os.path.normpath(out_dir)) == "checkpoints":
        return out_dir
    return os.path.join(out_dir, "checkpoints")


def latest_tag(root: str) -> str | None:
    """The newest complete checkpoint's tag, or None."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    return tag if tag and os.path.isfile(os.path.join(root, tag, "convsink_state.json")) else None



def save(engine, root: str, step: int, state: dict, keep_last: int) -> str:
    """Collective: every rank writes its ZeRO shards under a temporary tag; rank 0 renames and points latest."""
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(os.path.join(root, tmp_tag), ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(root, tag=tmp_tag, client_state={"convsink": state}, save_latest=False)
    dist.barrier()
    if rank == 0:
        with open(os.path.join(root, tmp_tag, "convsink_state.json"), "w") as f:
            json.dump(state, f, indent=2)
        final = os.path.join(root, tag)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(os.path.join(root, tmp_tag), final)
        write_text_atomic(os.path.join(root, LATEST), tag)
        rotate(root, keep_last)
    dist.barrier()
    return tag


def rotate(root: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the one ``latest`` names)."""
    current = latest_tag(root)
    tags = sorted((t for t in os.listdir(root) if _TAG.match(t)), key=lambda t: int(_TAG.match(t).group(1)))
    for t in tags[:-keep_last]:
        if t != current:
            shutil.rmtree(os.path.join(root, t), ignore_errors=True)


def read_state(root: str, tag: str) -> dict:
    with open(os.path.join(root, tag, "convsink_state.json")) as f:
        return json.load(f)
