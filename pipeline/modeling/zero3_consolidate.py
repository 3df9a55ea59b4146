"""Read DeepSpeed ZeRO-3 checkpoints without unpickling arbitrary objects.

DeepSpeed's own readers call ``torch.load(..., weights_only=False)``. Here every file is opened with
``safe_checkpoint.safe_load``: ``weights_only=True`` and the one allow-list of the DeepSpeed types a checkpoint
holds (the same reader ``--resume`` uses).

ZeRO-3 layout: rank r's optimizer file holds one flat fp32 tensor per parameter group; each parameter of that
group (in ``param_shapes`` order) owns ``ceil(numel / world)`` consecutive elements of every rank's flat tensor
(the last rank's slice zero-padded). A parameter is the concatenation over ranks of its slices, trimmed to numel.
Frozen parameters (no optimizer state) are fragments of the same size in each rank's model-states file.
"""

from __future__ import annotations

import glob
import math
import os
import re

import torch

from pipeline.training.safe_checkpoint import safe_load


def _rank_of(path: str) -> int:
    return int(re.search(r"zero_pp_rank_(\d+)_", os.path.basename(path)).group(1))


def consolidate_zero3(tag_dir: str) -> dict[str, torch.Tensor]:
    """fp32 ``state_dict`` (tied weights included under every name) from a ZeRO-3 checkpoint folder."""
    optim_files = sorted(glob.glob(os.path.join(tag_dir, "*_optim_states.pt")), key=_rank_of)
    model_files = sorted(glob.glob(os.path.join(tag_dir, "*_model_states.pt")), key=_rank_of)
    if not optim_files or not model_files:
        raise FileNotFoundError(f"{tag_dir}: no ZeRO checkpoint files (*_optim_states.pt / *_model_states.pt)")
    meta = safe_load(model_files[0])
    stage = int(meta["ds_config"]["zero_optimization"]["stage"]) if isinstance(meta.get("ds_config"), dict) else 3
    if stage != 3:
        raise ValueError(f"{tag_dir}: ZeRO stage {stage} checkpoint; only stage 3 is supported by export")
    world = len(optim_files)
    flats = [safe_load(f)["optimizer_state_dict"]["fp32_flat_groups"] for f in optim_files]  # [rank][group]
    state: dict[str, torch.Tensor] = {}
    for g, shapes in enumerate(meta["param_shapes"]):
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            pieces = [flats[r][g].narrow(0, offset, part) for r in range(world)]
            state[name] = torch.cat(pieces)[:numel].view(shape).clone()
            offset += part
    frozen_shapes = meta.get("frozen_param_shapes") or {}
    if frozen_shapes:  # frozen (e.g. LoRA base) weights: each rank's model file holds its fragment
        frags = [safe_load(f)["frozen_param_fragments"] for f in model_files]
        for name, shape in frozen_shapes.items():
            numel = math.prod(shape)
            state[name] = torch.cat([frags[r][name].flatten() for r in range(world)])[:numel].view(shape).clone()
    for alias, target in (meta.get("shared_params") or {}).items():
        state[alias] = state[target]
    buffers = meta.get("module") or {}
    for name in meta.get("buffer_names") or []:
        if name in buffers:
            state[name] = buffers[name]
    return state
