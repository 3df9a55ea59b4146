"""Experiment tracking: W&B on world rank 0 only, a progress bar, and a reader for offline W&B runs.

The W&B API key is read by wandb itself from the environment (WANDB_API_KEY); convsink never logs or writes it.
The run config is the recipe as stored (``dump_config``: ``${VAR}`` values as written, never expanded).
"""

from __future__ import annotations

import glob
import json
import os
import struct
import uuid

from pipeline.config import RunConfig, dump_config


def init_wandb(cfg: RunConfig, out_dir: str, rank: int, resume: bool):
    """Start (or resume) the W&B run on world rank 0; every other rank gets None. Returns the run."""
    if rank != 0 or cfg.wandb.mode == "disabled":
        return None
    import wandb

    os.makedirs(out_dir, exist_ok=True)
    id_file = os.path.join(out_dir, "wandb_run_id")
    run_id = open(id_file).read().strip() if resume and os.path.isfile(id_file) else uuid.uuid4().hex[:8]
    with open(id_file, "w") as f:
        f.write(run_id)
    return wandb.init(
        project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.name or os.path.basename(os.path.abspath(out_dir)),
        group=cfg.wandb.group, tags=cfg.wandb.tags or None, mode=cfg.wandb.mode, dir=out_dir, id=run_id,
        resume="allow", config=dump_config(cfg), settings=wandb.Settings(console="off", x_disable_stats=True),
    )


def progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, mininterval=1.0, dynamic_ncols=True)


# --- offline run reader ------------------------------------------------------------------------------------
# A .wandb file is a LevelDB-style log: a 7-byte file header (":W&B", magic 0xBEE1, version), then 32 KiB
# blocks of records, each with a 7-byte header (crc32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)
# whose payload (possibly split across blocks) is one serialized wandb_internal_pb2.Record.

_BLOCK = 32768
_HEADER = 7


def _records(path: str):
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a W&B run file")
    pos, parts = _HEADER, []
    while pos + _HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _HEADER:
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0 and length == 0:
            pos += room  # zero padding to the end of the block
            continue
        payload = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        parts.append(payload)
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            parts = []
            yield rec


def read_offline_run(run_dir: str) -> dict:
    """Read an offline W&B run folder (``.../wandb/offline-run-*``) into ``{"history": [...], "config": {...},
    "summary": {...}}``; history rows map keys to decoded JSON values."""
    files = glob.glob(os.path.join(run_dir, "*.wandb"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no .wandb file")
    history, config, summary = [], {}, {}
    for rec in _records(files[0]):
        which = rec.WhichOneof("record_type")
        if which == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            history.append(row)
        elif which in ("config", "run"):
            for item in (rec.config if which == "config" else rec.run.config).update:
                key = item.key or "/".join(item.nested_key)
                config[key] = json.loads(item.value_json)
        elif which == "summary":
            for item in rec.summary.update:
                key = item.key or "/".join(item.nested_key)
                summary[key] = json.loads(item.value_json)
    return {"history": history, "config": config, "summary": summary}


def find_offline_runs(out_dir: str) -> list[str]:
    """Offline run folders under a training output folder, oldest first."""
    return sorted(glob.glob(os.path.join(out_dir, "wandb", "offline-run-*")))
