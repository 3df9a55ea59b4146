"""Next-token loss per task (dialogue / smr / lmr) with token-count reduction.

Shard ``labels`` hold the token to predict at its own position (-100 = no loss), like transformers' ``labels``:
the logit at t-1 predicts label t. Every dialogue starts with BOS whose label is -100, so no prediction crosses
from one packed dialogue into the next.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
TASKS = ("dialogue", "smr", "lmr")


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood ``(B, T-1)`` (0 where ignored) and the validity mask."""
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    valid = shift_labels != IGNORE
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                          ignore_index=IGNORE, reduction="none").view_as(shift_labels)
    return nll * valid, valid


def task_sums(logits: torch.Tensor, labels: torch.Tensor, kinds: list[str]) -> dict[str, tuple[torch.Tensor, int]]:
    """``{task: (nll sum, token count)}`` over the rows of each mask kind; the sums keep their graph."""
    nll, valid = token_nll(logits, labels)
    out = {}
    for task in sorted(set(kinds)):
        rows = torch.tensor([k == task for k in kinds], device=nll.device)
        out[task] = (nll[rows].sum(), int(valid[rows].sum()))
    return out
