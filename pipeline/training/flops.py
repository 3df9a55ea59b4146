"""Throughput accounting: model FLOPs per token with attention counted as actually computed under the mask.

Per token, forward + backward ≈ 6·N (N = non-embedding parameters) + 12·L·d·k̄, where k̄ is the mean number
of keys a query attends to under its mask (all earlier keys for causal; about i + 1.5·L_utt for the dialogue mask).
"""

from __future__ import annotations

import torch

from pipeline.attention.masks import MaskParams, check_params, mask_mod
from pipeline.contract import BLK, DOC_IDS, EOU, POSITION_IDS, UTT_IDS

KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def non_embedding_params(model) -> int:
    emb = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    total = 0
    for p in model.parameters():
        if id(p) in emb:
            continue
        total += getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions report their full size in ds_numel
    return total


def mask_stats(batch: dict, kinds: list[str], params: MaskParams, chunk: int = 1024) -> tuple[float, float]:
    """(attended key positions, real query tokens) of a batch under mask ``kinds`` (one per row) and the mask
    parameters ``params``, counted in query chunks to bound memory."""
    check_params(params)
    attended, queries = 0.0, 0.0
    T = batch[DOC_IDS].shape[1]
    for b, kind in enumerate(kinds):
        row = {c: batch[c][b:b + 1] for c in (DOC_IDS, UTT_IDS, EOU, BLK, POSITION_IDS) if c in batch}
        real = row[DOC_IDS][0] >= 0
        queries += float(real.sum())
        for q0 in range(0, T, chunk):
            m = _rows(kind, row, params, q0, chunk)  # (chunk, T)
            attended += float((m & real[q0:q0 + chunk, None]).sum())
    return attended, queries


def _rows(kind, row, params, q0, chunk):
    T = row[DOC_IDS].shape[1]
    q = torch.arange(q0, min(T, q0 + chunk)).view(-1, 1)
    k = torch.arange(T).view(1, -1)
    return mask_mod(kind, row, params)(torch.zeros(1, 1, dtype=torch.long), None, q, k)


def flops_per_token(model_config, non_emb_params: int, keys_per_query: float) -> float:
    layers = model_config.num_hidden_layers
    width = model_config.num_attention_heads * getattr(model_config, "head_dim", model_config.hidden_size // model_config.num_attention_heads)
    return 6.0 * non_emb_params + 12.0 * layers * width * keys_per_query


def peak_tflops(configured: float | None, device: torch.device) -> float | None:
    if configured is not None:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
