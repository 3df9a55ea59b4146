"""The training step's per-task NLL sums and the held-out eval's per-token figures from one forward, with the
output layer applied either to the whole sequence (``loss_chunk=None``) or tiled: chunks of ``loss_chunk`` tokens
(batch rows flattened), so the ``(B·T, V)`` logits never exist at once.

In training each chunk ``lm_head -> fp32 -> cross-entropy`` runs under non-reentrant ``torch.utils.checkpoint``:
only the chunk's hidden states are kept and its logits are recomputed in backward. The head is called as a module,
so under ZeRO-3 DeepSpeed's module hooks gather its partitioned weight for every chunk (also in the recompute);
every rank runs the same number of chunks (no chunk is skipped, even one without loss tokens), because those
gathers are collective. Same sums as the untiled path, up to float summation order (tested at 1e-5 in fp32).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from pipeline.attention.ulysses import SequenceParallel
from pipeline.config import ModelConfig
from pipeline.contract import IGNORE, MASK_KIND, TARGETS
from pipeline.modeling.forward import forward_batch, forward_hidden
from pipeline.training.losses import sums_by_task, token_nll, token_stats

# torch compares what the recompute saved with what the forward saved. Under ZeRO-3 a FROZEN lm_head weight (LoRA) is
# gathered for the recompute and released again by DeepSpeed's post-forward hook before that comparison (it reads
# as shape [0]); the weight is gathered again by the head's pre-backward hook before its gradient is computed, so
# the values used are right (tested: ZeRO-3 + LoRA + SP=2 equals the untiled run) and only the comparison is off.
RECOMPUTE_CHECK = "none"


def over_chunks(fn: Callable, hidden: torch.Tensor, targets: torch.Tensor, chunk: int,
                recompute: bool) -> tuple[torch.Tensor, ...]:
    """Apply ``fn(hidden (n, D), targets (n,)) -> tensor(s) (n,)`` to consecutive chunks of ``chunk`` tokens of
    ``hidden (B, T, D)`` / ``targets (B, T)`` (rows flattened); returns the outputs joined back to ``(B, T)``.
    ``recompute``: run each chunk under checkpoint, so its intermediates are rebuilt in backward, not kept."""
    if chunk < 1:
        raise ValueError(f"loss_chunk={chunk} must be at least 1")
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    parts = []
    for i in range(0, t.numel(), chunk):
        args = (h[i:i + chunk], t[i:i + chunk])
        out = checkpoint(fn, *args, use_reentrant=False, determinism_check=RECOMPUTE_CHECK) if recompute else fn(*args)
        parts.append(out if isinstance(out, tuple) else (out,))
    return tuple(torch.cat(col).view_as(targets) for col in zip(*parts))


def tiled_token_nll(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                    chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_nll(head(hidden), targets)`` chunk by chunk, each chunk's logits recomputed in backward."""
    (nll,) = over_chunks(lambda h, t: token_nll(head(h), t)[0], hidden, targets, chunk, recompute=True)
    return nll, targets != IGNORE


def batch_task_sums(model, batch: dict, cfg: ModelConfig, impl: str | None, sp: SequenceParallel,
                    loss_chunk: int | None) -> dict[str, tuple[torch.Tensor, int]]:
    """``{task: (nll sum, token count)}`` of this rank's token slice of ``batch``: the training step's loss terms
    (``pipeline.training.losses.task_sums``), tiled when ``loss_chunk`` is set."""
    targets, kinds = sp.local(batch)[TARGETS], batch[MASK_KIND]
    if loss_chunk is None:
        return sums_by_task(*token_nll(forward_batch(model, batch, cfg, impl, sp), targets), kinds)
    hidden, head = forward_hidden(model, batch, cfg, impl, sp)
    return sums_by_task(*tiled_token_nll(head, hidden, targets, loss_chunk), kinds)


@torch.no_grad()
def batch_token_stats(model, batch: dict, cfg: ModelConfig, impl: str | None, sp: SequenceParallel,
                      loss_chunk: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (NLL, valid, greedy hit) ``(B, T_local)`` of this rank's slice: the held-out eval's figures, from
    chunks of ``loss_chunk`` tokens when set (no gradient, so nothing is recomputed)."""
    targets = sp.local(batch)[TARGETS]
    if loss_chunk is None:
        return token_stats(forward_batch(model, batch, cfg, impl, sp), targets)
    hidden, head = forward_hidden(model, batch, cfg, impl, sp)
    return over_chunks(lambda h, t: token_stats(head(h), t), hidden, targets, loss_chunk, recompute=False)
