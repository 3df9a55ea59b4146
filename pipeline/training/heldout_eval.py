"""Held-apart evaluation during training: every ``train.eval_every`` steps, loss, perplexity and greedy token
accuracy per task on the first ``train.eval_rows`` rows of ``train.eval_data`` (a shard folder from
``convsink prep`` of dialogues kept out of training), logged as ``eval/...``.

Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively): rank r of the
data-parallel group takes batches ``b * dp_size + r``; a rank past the end runs a row whose targets are all
ignored. Sums and counts are all-reduced, so the figures are exact token means over the eval rows.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from pipeline.contract import MASK_KIND, TASKS, batch_from_rows
from pipeline.training.shard_loader import ShardData


def eval_batches(data: ShardData, rows: int, micro_size: int, dp_rank: int, dp_size: int) -> list[dict]:
    """This rank's eval batches over the first ``rows`` rows; the same count on every rank."""
    n = min(rows, len(data))
    per_round = micro_size * dp_size
    batches = []
    for b in range(math.ceil(n / per_round)):
        idx = [(b * dp_size + dp_rank) * micro_size + i for i in range(micro_size)]
        real = [i < n for i in idx]
        idx = [i if ok else 0 for i, ok in zip(idx, real)]
        batches.append(batch_from_rows(data.arrays, data.mask_kind, idx, real=real))  # padding rows count nothing
    return batches


@torch.no_grad()
def evaluate(stats, batches: list[dict], device) -> dict:
    """``stats(batch) -> (nll, valid, hits)``, each ``(B, T_local)`` for the rank's sequence slice (sequence
    parallel; ``pipeline.training.tiled_loss.batch_token_stats``, tiled or not). Returns ``eval/loss``,
    ``eval/ppl`` and per task ``eval/loss/<task>``, ``eval/accuracy/<task>``."""
    buf = torch.zeros(len(TASKS), 3, dtype=torch.float64)  # (task, [nll sum, tokens, greedy hits])
    for b in batches:
        b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
        nll, valid, hits = stats(b)  # (B, T_local) each
        for i, task in enumerate(TASKS):
            rows = torch.tensor([k == task for k in b[MASK_KIND]], device=nll.device)
            buf[i] += torch.tensor([float(nll[rows].sum()), float(valid[rows].sum()), float(hits[rows].sum())],
                                   dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(buf)
    out, tot = {}, buf.sum(0)
    for i, task in enumerate(TASKS):
        s, n, h = buf[i].tolist()
        if n > 0:
            out[f"eval/loss/{task}"] = s / n
            out[f"eval/accuracy/{task}"] = h / n
    if tot[1] > 0:
        out["eval/loss"] = float(tot[0] / tot[1])
        out["eval/ppl"] = math.exp(out["eval/loss"])
        out["eval/tokens"] = float(tot[1])
    return out
