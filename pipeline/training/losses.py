"""Next-token loss per task (dialogue / smr / lmr) with token-count reduction.

The batch carries ``targets`` aligned with the logits (``targets[t] = labels[t + 1]``, -100 = no loss; see
``pipeline.contract.targets_from_labels``). Every dialogue starts with BOS whose label is -100, so no prediction
crosses from one packed dialogue into the next. Losses are sums; the trainer divides by the token count of the
whole global batch (all ranks, all micro-steps), so the gradient is a true per-token mean, not a mean of means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.contract import IGNORE


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood ``(B, T)`` (0 where ignored) and the validity mask ``(B, T)``."""
    valid = targets != IGNORE  # (B, T)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=IGNORE, reduction="none").view_as(targets)
    return nll * valid, valid


def task_sums(logits: torch.Tensor, targets: torch.Tensor, kinds: list[str]) -> dict[str, tuple[torch.Tensor, int]]:
    """``{task: (nll sum, token count)}`` over the rows of each mask kind; the sums keep their graph."""
    nll, valid = token_nll(logits, targets)
    out = {}
    for task in sorted(set(kinds)):
        rows = torch.tensor([k == task for k in kinds], device=nll.device)
        out[task] = (nll[rows].sum(), int(valid[rows].sum()))
    return out
