"""How much of an utterance its EoU holds: token accuracy of the SMR copies and LMR recalls of a model.

An SMR copy sees only BOS, its original's EoU and itself (method.md §2), so predicting the copy's tokens is
possible only through what the EoU stored. ``task_accuracy`` runs an exported model over shard rows of one mask
kind and counts greedy next-token hits on the supervised positions.
"""

from __future__ import annotations

import torch

from pipeline.config import ModelConfig
from pipeline.contract import (
    BLK,
    DENSE,
    DIALOGUE_STAGE,
    IGNORE,
    LMR,
    MASK_KIND,
    MEMORY_STAGE,
    SMR,
    TARGETS,
    batch_from_rows,
)
from pipeline.modeling.forward import forward_batch
from pipeline.training.shard_loader import load_shards


def token_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """(greedy hits, supervised positions) of ``(B, T, V)`` logits against aligned ``(B, T)`` targets."""
    valid = targets != IGNORE
    return int(((logits.argmax(-1) == targets) & valid).sum()), int(valid.sum())


def cut_smr_memory(blk: torch.Tensor) -> torch.Tensor:
    """The control: ``blk`` with every original block moved out of reach (odd blocks + 2·10⁶, parity kept), so
    under the SMR mask a copy sees only BOS and itself, not its original's EoU; originals still see themselves."""
    original = (blk > 0) & (blk % 2 == 1)
    return torch.where(original, blk + 2_000_000, blk)


@torch.no_grad()
def task_accuracy(model_dir: str, data_dir: str, kind: str = SMR, max_rows: int = 32, batch_size: int = 4,
                  through_eou: bool = True) -> dict:
    """Greedy token accuracy and mean NLL of an exported model on the first ``max_rows`` rows of ``kind``.
    ``through_eou=False`` (SMR only) is the control without the memory path (``cut_smr_memory``): the
    difference between the two is what the EoU carries."""
    from pipeline.modeling.loader import load_convsink_model
    from pipeline.training.losses import token_nll

    model = load_convsink_model(model_dir)
    data = load_shards(data_dir, MEMORY_STAGE if kind in (SMR, LMR) else DIALOGUE_STAGE)
    rows = [i for i, k in enumerate(data.mask_kind) if k == kind][:max_rows]
    if not rows:
        raise ValueError(f"{data_dir}: no '{kind}' rows")
    hits = total = 0
    nll_sum = 0.0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = batch_from_rows(data.arrays, data.mask_kind, chunk)
        if not through_eou:
            if kind != SMR:
                raise ValueError("through_eou=False is the SMR control; it has no meaning for other kinds")
            batch[BLK] = cut_smr_memory(batch[BLK])
        batch[MASK_KIND] = [kind] * len(chunk)
        targets = batch[TARGETS]
        logits = forward_batch(model, batch, ModelConfig(attention=DENSE), impl=DENSE)
        h, n = token_accuracy(logits, targets)
        hits, total = hits + h, total + n
        nll_sum += float(token_nll(logits, targets)[0].sum())
    return {"kind": kind, "rows": len(rows), "tokens": total, "accuracy": hits / max(total, 1), "nll": nll_sum / max(total, 1)}
