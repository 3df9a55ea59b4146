"""Attention masks as composable predicates over per-token metadata (method.md §2).

A predicate has FlexAttention's ``mask_mod`` signature ``(b, h, q_idx, kv_idx) -> bool tensor`` and closes over
the batch's ``(B, T)`` metadata, so the same predicate builds the dense reference here and a BlockMask on GPU.
Every mask is ANDed with causal ``k <= q`` and same-dialogue ``doc(k) == doc(q)``.

``dense_mask(kind, batch)`` returns ``(B, T, T)`` booleans, True = query row may attend to key column.
"""

from __future__ import annotations

from typing import Callable

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
META_COLUMNS = ("doc_ids", "utt_ids", "eou", "blk", "position_ids")


def and_masks(*mods: MaskMod) -> MaskMod:
    def mod(b, h, q, k):
        out = mods[0](b, h, q, k)
        for m in mods[1:]:
            out = out & m(b, h, q, k)
        return out
    return mod


def or_masks(*mods: MaskMod) -> MaskMod:
    def mod(b, h, q, k):
        out = mods[0](b, h, q, k)
        for m in mods[1:]:
            out = out | m(b, h, q, k)
        return out
    return mod


def causal_same_doc(meta: dict) -> MaskMod:
    """``k <= q AND doc(k) == doc(q)``: the frame every kind is ANDed with."""
    doc = meta["doc_ids"]
    return lambda b, h, q, k: (k <= q) & (doc[b, k] == doc[b, q])


def dialogue_mask(meta: dict, **_) -> MaskMod:
    """Dialogue mask: BOS, every EoU, the previous utterance and the current one so far.

    ``[BOS] a a EoU b b EoU c c`` (utt 0 1 1 1 2 2 2 3 3)::

             B a a E b b E c c
        B    1
        a    1 1
        a    1 1 1
        E    1 1 1 1
        b    1 1 1 1 1
        b    1 1 1 1 1 1
        E    1 1 1 1 1 1 1
        c    1 0 0 1 1 1 1 1
        c    1 0 0 1 1 1 1 1 1
    """
    utt, eou = meta["utt_ids"], meta["eou"]
    kind = lambda b, h, q, k: ((utt[b, k] == 0) | eou[b, k] | (utt[b, k] == utt[b, q]) | (utt[b, k] == utt[b, q] - 1))
    return and_masks(causal_same_doc(meta), kind)


def causal_mask(meta: dict, **_) -> MaskMod:
    """Dense causal attention inside each dialogue of a pack (the 'dense' baseline).

             B a a E b
        B    1
        a    1 1
        a    1 1 1
        E    1 1 1 1
        b    1 1 1 1 1
    """
    return causal_same_doc(meta)


MASK_BUILDERS: dict[str, Callable[..., MaskMod]] = {
    "dialogue": dialogue_mask,
    "causal": causal_mask,
}


def mask_mod(kind: str, meta: dict, **params) -> MaskMod:
    """The predicate of ``kind`` over the batch metadata ``meta`` (``(B, T)`` tensors). ``params`` are the
    fields of ``pipeline.config.MaskConfig``; each builder takes the ones it needs and ignores the rest."""
    if kind not in MASK_BUILDERS:
        raise ValueError(f"unknown mask kind {kind!r}; known: {', '.join(MASK_BUILDERS)}")
    return MASK_BUILDERS[kind](meta, **params)


def dense_mask(kind: str, batch: dict, **params) -> torch.Tensor:
    """``(B, T, T)`` bool, True = may attend, for mask ``kind`` over the batch's metadata columns."""
    doc = batch["doc_ids"]
    B, T = doc.shape
    b = torch.arange(B, device=doc.device).view(B, 1, 1)
    q = torch.arange(T, device=doc.device).view(1, T, 1)
    k = torch.arange(T, device=doc.device).view(1, 1, T)
    return mask_mod(kind, batch, **params)(b, None, q, k).expand(B, T, T)


def batch_dense_mask(batch: dict, kinds: list[str] | None = None, **params) -> torch.Tensor:
    """``(B, T, T)`` mask where row b uses its own ``mask_kind`` (batches may mix SMR and LMR samples)."""
    kinds = kinds if kinds is not None else list(batch["mask_kind"])
    out = torch.empty(batch["doc_ids"].shape + batch["doc_ids"].shape[-1:], dtype=torch.bool, device=batch["doc_ids"].device)
    for kind in sorted(set(kinds)):
        rows = [i for i, kk in enumerate(kinds) if kk == kind]
        sub = {c: batch[c][rows] for c in META_COLUMNS if c in batch}
        out[rows] = dense_mask(kind, sub, **params)
    return out
