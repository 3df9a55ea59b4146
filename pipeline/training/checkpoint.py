"""Atomic, complete checkpoints: written under a temporary name, renamed when every rank has finished and the
folder holds every rank's ZeRO files, and only then named in ``latest`` (itself replaced atomically). An
interrupted save never becomes the resume point; what it leaves (``.tmp-*``) is removed at the next run's start
and by rotation.

    OUT/checkpoints/step000010/      (DeepSpeed files of every rank + convsink_state.json)
    OUT/checkpoints/latest           ("step000010")

Complete means: ``convsink_state.json`` is there and the folder holds a ``zero_pp_rank_<r>_*optim_states.pt`` for
every rank r below the world size it records (a rank writes its model-states file before its optimizer-states
file, so the optimizer file marks a rank's finished shards). A run folder that is not shared across nodes fails
this at the first save, on rank 0, instead of leaving checkpoints that hold one node's ranks.
"""

from __future__ import annotations

import glob
import json
import os
import re
import resource
import shutil
import signal
import threading
import time

import torch.distributed as dist

from data_prep.paths import write_text_atomic

LATEST = "latest"
STATE_FILE = "convsink_state.json"
PARTIAL = ".tmp-"  # prefix of what an unfinished save leaves in OUT/checkpoints
COMPLETE_WAIT_S = 60.0  # how long rank 0 waits for every rank's files to be listed before a save is refused
FAULT_ENV = "CONVSINK_FAULT"  # test-only fault injection (``_fault``)
_TAG = re.compile(r"^step(\d{6,})$")
_OPTIM_SHARD = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def tag_for(step: int) -> str:
    return f"step{step:06d}"


def checkpoint_root(out_dir: str) -> str:
    """``OUT/checkpoints`` (accepts the checkpoints folder itself too)."""
    if os.path.isfile(os.path.join(out_dir, LATEST)) or os.path.basename(os.path.normpath(out_dir)) == "checkpoints":
        return out_dir
    return os.path.join(out_dir, "checkpoints")


def shard_ranks(tag_dir: str) -> list[int]:
    """The ranks whose ZeRO optimizer-state file is in ``tag_dir``."""
    return sorted({int(m.group(1)) for m in map(_OPTIM_SHARD.search, os.listdir(tag_dir)) if m})


def incomplete_reason(tag_dir: str) -> str | None:
    """None when ``tag_dir`` is a complete checkpoint, else what is missing (one line, without the folder's name)."""
    from pipeline.training.resume_guard import WORLD_SIZE

    try:
        with open(os.path.join(tag_dir, STATE_FILE)) as f:
            world = json.load(f).get(WORLD_SIZE)
    except (OSError, ValueError, AttributeError):
        return f"no readable {STATE_FILE} (its save did not finish)"
    ranks = shard_ranks(tag_dir)
    if world is None:  # saved before convsink recorded the world size: ranks 0..max must all be there
        world = ranks[-1] + 1 if ranks else 1
    missing = [r for r in range(world) if r not in ranks]
    if not missing:
        return None
    return (f"holds ZeRO files of {_rank_list(ranks) or 'no rank'} of {world}: {_rank_list(missing)} missing "
            "(run folder not shared across nodes?)")


def _rank_list(ranks: list[int]) -> str:
    """``rank 1`` / ``ranks 0-3, 5``; empty for no ranks."""
    spans, start = [], None
    for i, r in enumerate(ranks):
        start = r if start is None else start
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            spans.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(spans)}" if ranks else ""


def latest_tag(root: str) -> str | None:
    """The tag ``latest`` names when that folder is a complete checkpoint (``incomplete_reason``), else None."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return tag if _TAG.match(tag) and incomplete_reason(os.path.join(root, tag)) is None else None


def remove_partial_saves(root: str) -> list[str]:
    """Delete what unfinished saves left in ``root`` (``.tmp-*`` folders and files); returns their names. Only
    safe while no save is running: at a run's start (one writer per run folder) and in a save's rotation."""
    if not os.path.isdir(root):
        return []
    gone = [n for n in os.listdir(root) if n.startswith(PARTIAL) or f"{LATEST}{PARTIAL}" in n]
    for name in gone:
        path = os.path.join(root, name)
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    return gone


def save(engine, root: str, step: int, state: dict, keep_last: int) -> str:
    """Collective: every rank writes its ZeRO shards under a temporary tag; rank 0 checks that every rank's files
    are there, renames, points latest and rotates. An incomplete folder stops the run (``ValueError``)."""
    tag = tag_for(step)
    tmp_tag = PARTIAL + tag
    tmp = os.path.join(root, tmp_tag)
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    _fault("shards", step, tmp)
    try:
        engine.save_checkpoint(root, tag=tmp_tag, client_state={"convsink": state}, save_latest=False)
        _fault_written()
    except (OSError, RuntimeError) as e:  # a full disk, a lost peer: the previous checkpoint stays the resume point
        raise RuntimeError(f"{tmp}: rank {rank}'s save failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}; "
                           f"{shutil.disk_usage(root).free >> 20} MiB free there); the resume point stays "
                           f"{latest_tag(root)}") from e
    _fault("barrier", step, tmp)
    dist.barrier()
    _fault("rename", step, tmp)  # on rank 0 before the rename; on the others while rank 0 renames
    if rank == 0:
        write_text_atomic(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=2))
        missing = _wait_complete(tmp)
        if missing:
            raise ValueError(f"{tmp}: {missing}; not made a checkpoint (the resume point stays {latest_tag(root)})")
        final = os.path.join(root, tag)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    _fault("latest", step, tmp)
    if rank == 0:
        write_text_atomic(os.path.join(root, LATEST), tag)
        rotate(root, keep_last)
    dist.barrier()
    return tag


def _wait_complete(tmp: str) -> str | None:
    """``incomplete_reason(tmp)``, asked again for up to ``COMPLETE_WAIT_S`` while it is not None: a shared file
    system (NFS) may list another node's new files late."""
    deadline = time.time() + COMPLETE_WAIT_S
    while (missing := incomplete_reason(tmp)) and time.time() < deadline:
        time.sleep(0.5)
    return missing


def _fault(point: str, step: int, tmp: str) -> None:
    """Test-only, a no-op unless ``$CONVSINK_FAULT`` is ``RANK:POINT:STEP[:BYTES]`` naming this rank and this point
    (shards, barrier, rename, latest) of the save of ``STEP``. Then this rank dies by SIGKILL there ("shards": once
    DeepSpeed has begun writing this rank's optimizer-state file, at the latest once it is written: ``_fault_written``),
    or, with BYTES, from there on every file it writes fails past BYTES bytes (``RLIMIT_FSIZE``: the kernel fails the
    write with EFBIG, as a full disk fails it)."""
    spec = os.environ.get(FAULT_ENV, "").split(":")
    if spec[1:3] != [point, str(step)] or int(spec[0]) != dist.get_rank():
        return
    if len(spec) > 3:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (Python's default) an error, not a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(spec[3]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    elif point == "shards":
        optim_file = os.path.join(tmp, f"*zero_pp_rank_{spec[0]}_*optim_states.pt")

        def kill_once_written():
            while not any(os.path.getsize(f) for f in glob.glob(optim_file)):
                time.sleep(0.001)
            os.kill(os.getpid(), signal.SIGKILL)
        _KILLERS.append(threading.Thread(target=kill_once_written, daemon=True))
        _KILLERS[-1].start()
    else:
        os.kill(os.getpid(), signal.SIGKILL)


_KILLERS: list[threading.Thread] = []  # the armed "shards" fault of this rank, if any


def _fault_written() -> None:
    """Test-only: a rank with an armed "shards" fault dies here at the latest, before the barrier. Its watcher
    thread may not get the GIL while ``torch.save`` writes; then it kills the rank only now, once the file is
    written (never after the barrier, where rank 0 could already have named this save in ``latest``)."""
    for killer in _KILLERS:
        killer.join()


def rotate(root: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the one ``latest`` names) and whatever
    unfinished saves left."""
    current = latest_tag(root)
    tags = sorted((t for t in os.listdir(root) if _TAG.match(t)), key=lambda t: int(_TAG.match(t).group(1)))
    for t in tags[:-keep_last]:
        if t != current:
            shutil.rmtree(os.path.join(root, t), ignore_errors=True)
    remove_partial_saves(root)


def read_state(root: str, tag: str) -> dict:
    with open(os.path.join(root, tag, STATE_FILE)) as f:
        return json.load(f)
