"""Attention masks as composable predicates over per-token metadata (method.md §2).

A predicate has FlexAttention's ``mask_mod`` signature ``(b, h, q_idx, kv_idx) -> bool tensor`` and closes over
the batch's ``(B, T)`` metadata, so the same predicate builds the dense reference here and a BlockMask on GPU.
Every mask is ANDed with causal ``k <= q`` and same-dialogue ``doc(k) == doc(q)``.

``dense_mask(kind, batch, params)`` returns ``(B, T, T)`` booleans, True = query row may attend to key column.
The mask parameters (windows, sink and global token counts, BigBird's random keys) travel as one ``MaskParams``
(``pipeline.config.MaskConfig.params()``); every builder rejects anything else, so a misspelled name is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from pipeline.contract import (
    BIGBIRD,
    BLK,
    CAUSAL,
    DIALOGUE,
    DOC_IDS,
    EOU,
    LMR,
    LOCAL,
    MASK_KIND,
    META_COLUMNS,
    POSITION_IDS,
    SMR,
    STREAMINGLLM,
    UTT_IDS,
)

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MaskParams:
    """The parameters of the baseline masks (the dialogue, causal, SMR and LMR masks have none). Validated and
    documented as ``pipeline.config.MaskConfig`` (the recipe's ``model.mask``), whose ``params()`` builds this."""

    local_window: int = 64  # w of 'local'
    sink_tokens: int = 1  # s of 'streamingllm'
    sink_window: int = 64  # w of 'streamingllm'
    bigbird_global: int = 1  # g of 'bigbird'
    bigbird_window: int = 64  # w of 'bigbird'
    bigbird_random: int = 8  # r of 'bigbird'
    bigbird_seed: int = 0  # seed of bigbird's random keys


def check_params(params) -> MaskParams:
    """``params`` itself, if it is a ``MaskParams``; a dict (e.g. ``MaskConfig.model_dump()``) is a TypeError."""
    if not isinstance(params, MaskParams):
        raise TypeError(f"mask parameters must be a pipeline.attention.masks.MaskParams (MaskConfig.params()), "
                        f"not {type(params).__name__}")
    return params


def check_meta(meta: dict) -> None:
    """Every metadata column must be ``(B, T)`` like ``doc_ids``: masks always need the FULL sequence (with
    sequence parallelism, build the attention before ``shard_sequence`` slices ``position_ids``)."""
    shape = tuple(meta[DOC_IDS].shape)
    for c in META_COLUMNS:
        if c in meta and tuple(meta[c].shape) != shape:
            raise ValueError(f"mask metadata {c} has shape {tuple(meta[c].shape)}, doc_ids {shape}: masks need the full "
                             "sequence (build the attention before shard_sequence)")


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
    doc = meta[DOC_IDS]
    return lambda b, h, q, k: (k <= q) & (doc[b, k] == doc[b, q])


def dialogue_mask(meta: dict, params: MaskParams) -> MaskMod:
    """Dialogue mask: every utt-0 key (BOS, and a pinned system turn), every EoU, the previous utterance and the
    current one so far: ``utt(k) == 0  OR  eou(k)  OR  utt(q) - 1 <= utt(k) <= utt(q)``.

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

    A pinned system prompt (``data.pin_system``) shares utt 0 with BOS, so every later token sees all of it.
    ``[BOS] s s EoU a EoU b EoU c`` (utt 0 0 0 0 1 1 2 2 3)::

             B s s E a E b E c
        B    1
        s    1 1
        s    1 1 1
        E    1 1 1 1
        a    1 1 1 1 1
        E    1 1 1 1 1 1
        b    1 1 1 1 1 1 1
        E    1 1 1 1 1 1 1 1
        c    1 1 1 1 0 1 1 1 1
    """
    check_params(params)
    utt, eou = meta[UTT_IDS], meta[EOU]
    kind = lambda b, h, q, k: ((utt[b, k] == 0) | eou[b, k] | (utt[b, k] == utt[b, q]) | (utt[b, k] == utt[b, q] - 1))
    return and_masks(causal_same_doc(meta), kind)


def causal_mask(meta: dict, params: MaskParams) -> MaskMod:
    """Dense causal attention inside each dialogue of a pack (the 'dense' baseline).

             B a a E b
        B    1
        a    1 1
        a    1 1 1
        E    1 1 1 1
        b    1 1 1 1 1
    """
    check_params(params)
    return causal_same_doc(meta)


def smr_mask(meta: dict, params: MaskParams) -> MaskMod:
    """Short-memory reconstruction: ``[BOS] (u_j EoU u_j' EoU)*``; blk = utt; odd blk = original, even = copy.
    A token sees BOS (utt 0: the only utt-0 token of an SMR sample) and its own block; a copy also sees its
    original's EoU, so it must be rebuilt from it::

        utt(k) == 0  OR  blk(k) == blk(q)  OR  (copy(q) AND eou(k) AND blk(k) == blk(q) - 1)

    ``[BOS] a E a' E' b E`` (blk 0 1 1 2 2 3 3)::

             B a E a'E'b E
        B    1
        a    1 1
        E    1 1 1
        a'   1 0 1 1
        E'   1 0 1 1 1
        b    1 0 0 0 0 1
        E    1 0 0 0 0 1 1
    """
    check_params(params)
    utt, blk, eou = meta[UTT_IDS], meta[BLK], meta[EOU]

    def kind(b, h, q, k):
        copy_q = (blk[b, q] > 0) & (blk[b, q] % 2 == 0)
        prev_eou = eou[b, k] & (blk[b, k] == blk[b, q] - 1)
        return (utt[b, k] == 0) | (blk[b, k] == blk[b, q]) | (copy_q & prev_eou)
    return and_masks(causal_same_doc(meta), kind)


def lmr_mask(meta: dict, params: MaskParams) -> MaskMod:
    """Long-memory reactivation: ``[BOS] (query EoU response EoU)* + a repeated pair``; blk = pair index::

        utt(k) == 0  OR  eou(k)  OR  utt(k) == utt(q)  OR  (response(q) AND k in its pair's query)

    ``utt(k) == 0`` is BOS, plus a pinned system turn where the layout gives one utterance index 0.

    "k in its pair's query" is ``blk(k) == blk(q)``: inside a pair the query comes first, so with causality a
    query token already sees only its own utterance through it. The repeated pair sees only BOS, the history's
    EoUs and itself.

    ``[BOS] q E r E q' E r' E`` (utt 0 1 1 2 2 3 3 4 4, blk 0 1 1 1 1 2 2 2 2)::

             B q E r E q'E r'E
        B    1
        q    1 1
        E    1 1 1
        r    1 1 1 1
        E    1 1 1 1 1
        q'   1 0 1 0 1 1
        E    1 0 1 0 1 1 1
        r'   1 0 1 0 1 1 1 1
        E    1 0 1 0 1 1 1 1 1
    """
    check_params(params)
    utt, eou, blk = meta[UTT_IDS], meta[EOU], meta[BLK]

    def kind(b, h, q, k):
        return (utt[b, k] == 0) | eou[b, k] | (utt[b, k] == utt[b, q]) | ((blk[b, k] == blk[b, q]) & (blk[b, q] > 0))
    return and_masks(causal_same_doc(meta), kind)


def local_mask(meta: dict, params: MaskParams) -> MaskMod:
    """Sliding window: the last ``w`` (``params.local_window``) tokens, itself included. w = 2::

             B a a E b
        B    1
        a    1 1
        a    0 1 1
        E    0 0 1 1
        b    0 0 0 1 1
    """
    check_params(params)
    w = params.local_window
    return and_masks(causal_same_doc(meta), lambda b, h, q, k: q - k < w)


def streamingllm_mask(meta: dict, params: MaskParams) -> MaskMod:
    """StreamingLLM: the first ``s`` (``params.sink_tokens``) tokens of the dialogue (attention sinks) plus the last
    ``w`` (``params.sink_window``). s = 1, w = 2::

             B a a E b
        B    1
        a    1 1
        a    1 1 1
        E    1 0 1 1
        b    1 0 0 1 1
    """
    check_params(params)
    pos, s, w = meta[POSITION_IDS], params.sink_tokens, params.sink_window
    return and_masks(causal_same_doc(meta), lambda b, h, q, k: (pos[b, k] < s) | (q - k < w))


def bigbird_random_keys(meta: dict, n_random: int, seed: int) -> torch.Tensor:
    """``(B, T, r)`` positions of ``r`` earlier keys per query, drawn uniformly (with replacement) from a generator
    seeded by (seed, row), so the draw is the same on every device; -1 where a query has no earlier key. Keys drawn
    from another dialogue of the row are dropped by the same-dialogue rule."""
    doc = meta[DOC_IDS]
    B, T = doc.shape
    out = torch.full((B, T, max(n_random, 1)), -1, dtype=torch.long)
    for b in range(B):
        g = torch.Generator().manual_seed(seed * 1_000_003 + b)
        u = torch.rand(T, max(n_random, 1), generator=g)
        q = torch.arange(T).unsqueeze(1)
        draw = (u * q).long()  # uniform in [0, q)
        out[b] = torch.where(q > 0, draw, torch.full_like(draw, -1))
    if n_random == 0:
        out.fill_(-1)
    return out.to(doc.device)


def bigbird_mask(meta: dict, params: MaskParams) -> MaskMod:
    """BigBird (causal): the first ``g`` tokens of the dialogue, a window of ``w``, and ``r`` random earlier keys per
    query (``params.bigbird_global``, ``bigbird_window``, ``bigbird_random``, seeded by ``bigbird_seed``).
    g = 1, w = 2, r = 1 (one possible draw)::

             B a a E b
        B    1
        a    1 1
        a    1 1 1
        E    1 1 1 1
        b    1 0 1 1 1
    """
    check_params(params)
    pos, g, w = meta[POSITION_IDS], params.bigbird_global, params.bigbird_window
    rand = meta.get("bigbird_random_keys")
    if rand is None:
        rand = bigbird_random_keys(meta, params.bigbird_random, params.bigbird_seed)

    def kind(b, h, q, k):
        out = (pos[b, k] < g) | (q - k < w)
        for i in range(rand.shape[-1]):  # pointwise only (a FlexAttention mask_mod may not reduce)
            out = out | (rand[b, q, i] == k)
        return out
    return and_masks(causal_same_doc(meta), kind)


MASK_BUILDERS: dict[str, Callable[[dict, MaskParams], MaskMod]] = {
    DIALOGUE: dialogue_mask,
    CAUSAL: causal_mask,
    SMR: smr_mask,
    LMR: lmr_mask,
    LOCAL: local_mask,
    STREAMINGLLM: streamingllm_mask,
    BIGBIRD: bigbird_mask,
}


def mask_mod(kind: str, meta: dict, params: MaskParams = MaskParams()) -> MaskMod:
    """The predicate of ``kind`` over the batch metadata ``meta`` (``(B, T)`` tensors) with the mask parameters
    ``params`` (each kind reads the fields it needs; every builder rejects anything but a ``MaskParams``)."""
    if kind not in MASK_BUILDERS:
        raise ValueError(f"unknown mask kind {kind!r}; known: {', '.join(MASK_BUILDERS)}")
    return MASK_BUILDERS[kind](meta, params)


def dense_mask(kind: str, batch: dict, params: MaskParams = MaskParams()) -> torch.Tensor:
    """``(B, T, T)`` bool, True = may attend, for mask ``kind`` over the batch's metadata columns."""
    doc = batch[DOC_IDS]
    B, T = doc.shape
    b = torch.arange(B, device=doc.device).view(B, 1, 1)
    q = torch.arange(T, device=doc.device).view(1, T, 1)
    k = torch.arange(T, device=doc.device).view(1, 1, T)
    return mask_mod(kind, batch, params)(b, None, q, k).expand(B, T, T)


def batch_dense_mask(batch: dict, params: MaskParams = MaskParams(), kinds: list[str] | None = None) -> torch.Tensor:
    """``(B, T, T)`` mask where row b uses its own ``mask_kind`` (batches may mix SMR and LMR samples)."""
    check_params(params)
    kinds = kinds if kinds is not None else list(batch[MASK_KIND])
    check_meta(batch)
    out = torch.empty(batch[DOC_IDS].shape + batch[DOC_IDS].shape[-1:], dtype=torch.bool, device=batch[DOC_IDS].device)
    full = {c: batch[c] for c in META_COLUMNS if c in batch}
    if BIGBIRD in kinds and "bigbird_random_keys" not in batch:  # drawn per batch row, whatever the other rows
        full["bigbird_random_keys"] = bigbird_random_keys(full, params.bigbird_random, params.bigbird_seed)
    for kind in sorted(set(kinds)):
        rows = [i for i, kk in enumerate(kinds) if kk == kind]
        sub = {c: v[rows] for c, v in full.items()}
        out[rows] = dense_mask(kind, sub, params)
    return out
