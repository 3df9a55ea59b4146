"""Next-token loss per task (dialogue / smr / lmr) with token-count reduction.

The batch carries ``targets`` aligned with the logits (``targets[t] = labels[t + 1]``, -100 = no loss; see
``pipeline.contract.targets_from_labels``). Every dialogue starts with BOS whose label is -100, so no prediction
crosses from one packed dialogue into the next. Losses are sums; the trainer divides by the token count of the
whole global batch (all ranks, all micro-steps), so the gradient is a true per-token mean, not a mean of means.
The same sums computed chunk by chunk from hidden states (no full logits): ``pipeline.training.tiled_loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.contract import IGNORE


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood (``targets``' shape; 0 where ignored) and the validity mask; ``logits``
    has ``targets``' shape plus the vocabulary dimension, any float dtype (the NLL is computed in fp32)."""
    valid = targets != IGNORE  # (B, T)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=IGNORE, reduction="none").view_as(targets)
    return nll * valid, valid


def token_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``token_nll`` plus greedy hits (argmax = target, on valid tokens only): the held-out eval's per-token figures."""
    nll, valid = token_nll(logits, targets)
    return nll, valid, (logits.argmax(-1) == targets) & valid


def sums_by_task(nll: torch.Tensor, valid: torch.Tensor, kinds: list[str]) -> dict[str, tuple[torch.Tensor, int]]:
    """``{task: (nll sum, token count)}`` over the rows ``(B, T)`` of each mask kind; the sums keep their graph."""
    out = {}
    for task in sorted(set(kinds)):
        rows = torch.tensor([k == task for k in kinds], device=nll.device)
        out[task] = (nll[rows].sum(), int(valid[rows].sum()))
    return out


def task_sums(logits: torch.Tensor, targets: torch.Tensor, kinds: list[str]) -> dict[str, tuple[torch.Tensor, int]]:
    """``{task: (nll sum, token count)}`` over the rows of each mask kind; the sums keep their graph."""
    return sums_by_task(*token_nll(logits, targets), kinds)
