"""Sink attention: exactly the masked attention of ``pipeline.attention.masks``, without a T×T mask and without computing
keys no query of a chunk may see (method.md §5). Rows of one batch may use different mask kinds.

Which keys can a query see? Two kinds of keys, per mask kind:

    kind            sink keys (few, anywhere before q)          band (contiguous, ends at q)
    dialogue        BOS, every EoU                              previous utterance + own utterance
    smr             BOS, every EoU (a copy sees one of them)    own block
    lmr             BOS, every EoU                              own utterance, own pair (response → its query)
    local           -                                           last w tokens
    streamingllm    first s tokens of the dialogue              last w tokens
    bigbird         first g tokens, r seeded random keys / q    last w tokens
    causal          -                                           the whole dialogue so far

CPU path (``SinkAttention``): for each row and each chunk of C queries, the keys the chunk can reach are gathered
into one short list ``[sinks before the band | band]`` and the exact predicate is evaluated on that (C × K) set
only. Attention is permutation-invariant over keys when the mask is permuted with them, so the result equals the
dense reference. A query in utterance i of a dialogue with utterances of L tokens computes about
``i + C + L`` keys instead of ``i·L``. Plain gather + SDPA per chunk, so autograd gives every gradient
(FlexAttention has no CPU backward in this torch).

    dialogue mask, chunk = the two d queries     natural key order              gathered [sinks | band]
                                                   B a a E b b E c c E d d        B E E | c c E d d
                                              d    1 0 0 1 0 0 1 1 1 1 1          1 1 1   1 1 1 1
                                              d    1 0 0 1 0 0 1 1 1 1 1 1        1 1 1   1 1 1 1 1

CUDA path (``FlexSinkAttention``): FlexAttention with a BlockMask built once per batch from the same predicates.
Keys are permuted per row so the sinks form one contiguous run at the front (``[sinks | the rest]``): the scattered
EoU columns become a few dense blocks and the rest of the mask is banded, so most 128×128 blocks are skipped. The
BlockMask is built block-row by block-row (never a T×T tensor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.attention.masks import META_COLUMNS, MaskParams, bigbird_random_keys, check_meta, check_params, mask_mod
from pipeline.contract import (
    BIGBIRD,
    BLK,
    DIALOGUE,
    DOC_IDS,
    EOU,
    FLEX,
    LMR,
    LOCAL,
    MASK_KIND,
    POSITION_IDS,
    SINK,
    SMR,
    STREAMINGLLM,
    UTT_IDS,
)

CHUNK = 128
SINK_KINDS = (DIALOGUE, SMR, LMR)  # sinks: BOS + every EoU
WINDOW_PARAM = {LOCAL: "local_window", STREAMINGLLM: "sink_window", BIGBIRD: "bigbird_window"}


def batch_meta(batch: dict, params: MaskParams) -> dict:
    """The ``(B, T)`` metadata columns of ``batch``, plus the BigBird random draws ``(B, T, r)`` if a row needs them."""
    check_params(params)
    meta = {c: batch[c] for c in META_COLUMNS if c in batch}
    check_meta(meta)
    if len(batch[MASK_KIND]) != meta[DOC_IDS].shape[0]:
        raise ValueError(f"{len(batch[MASK_KIND])} mask kinds for {meta[DOC_IDS].shape[0]} rows")
    if BIGBIRD in batch[MASK_KIND]:
        meta["bigbird_random_keys"] = batch.get("bigbird_random_keys")
        if meta["bigbird_random_keys"] is None:
            meta["bigbird_random_keys"] = bigbird_random_keys(meta, params.bigbird_random, params.bigbird_seed)
    return meta


def _row(meta: dict, b: int) -> dict:
    return {c: v[b:b + 1] for c, v in meta.items()}


class _FirstIndex:
    """First position of every value of a ``(T,)`` integer code; ``lookup`` answers ``default`` for absent codes."""

    def __init__(self, code: torch.Tensor):
        T = code.shape[0]
        self.values, inverse = torch.unique(code, sorted=True, return_inverse=True)
        self.first = torch.full_like(self.values, T).scatter_reduce(0, inverse, torch.arange(T, device=code.device), "amin")

    def lookup(self, code: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
        i = torch.searchsorted(self.values, code).clamp(max=self.values.numel() - 1)
        return torch.where(self.values[i] == code, self.first[i], default)


def _doc_code(doc: torch.Tensor, x: torch.Tensor, span: int) -> torch.Tensor:
    return (doc + 1) * span + (x + 2)  # unique per (doc, x) for doc >= -1, -2 <= x < span - 2


def band_start(kind: str, row: dict, params: MaskParams) -> torch.Tensor:
    """``(T,)`` earliest key each query may see outside the sink keys (every other visible key lies in
    ``[band_start(q), q]``). Exact for any metadata: it looks up first occurrences, it assumes no ordering."""
    check_params(params)
    doc = row[DOC_IDS][0]
    T = doc.shape[0]
    ar = torch.arange(T, device=doc.device)
    doc_start = _FirstIndex(doc).lookup(doc, ar)
    if kind in SINK_KINDS:
        utt = row[UTT_IDS][0]
        span = int(utt.max()) + 4
        first_utt = _FirstIndex(_doc_code(doc, utt, span))
        own = first_utt.lookup(_doc_code(doc, utt, span), ar)
        if kind == DIALOGUE:
            return torch.minimum(own, first_utt.lookup(_doc_code(doc, utt - 1, span), ar))
        blk = row[BLK][0]
        span = int(blk.max()) + 4
        own_blk = _FirstIndex(_doc_code(doc, blk, span)).lookup(_doc_code(doc, blk, span), ar)
        return own_blk if kind == SMR else torch.minimum(own, own_blk)
    if kind in WINDOW_PARAM:
        w = getattr(params, WINDOW_PARAM[kind])
        return torch.maximum(ar - w + 1, doc_start)
    return doc_start  # causal: the whole dialogue


def sink_keys(kind: str, row: dict, params: MaskParams) -> torch.Tensor:
    """``(T,)`` bool: keys a query may see outside its band (BigBird's random draws are per query, added later)."""
    check_params(params)
    doc = row[DOC_IDS][0]
    if kind in SINK_KINDS:
        return (row[UTT_IDS][0] == 0) | row[EOU][0]
    if kind == STREAMINGLLM:
        return row[POSITION_IDS][0] < params.sink_tokens
    if kind == BIGBIRD:
        return row[POSITION_IDS][0] < params.bigbird_global
    return torch.zeros_like(doc, dtype=torch.bool)


def row_plan(kind: str, row: dict, params: MaskParams, chunk: int = CHUNK) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """For one row (metadata ``(1, T)``): ``[(q0, q1, keys (K,), mask (q1-q0, K))]`` per chunk of queries.

    ``keys`` = the sink keys before the chunk's band (only of dialogues present in the chunk; BigBird's draws of
    the chunk's queries) followed by the band ``[min band_start, q1)``; key columns no query of the chunk may see
    are dropped. ``mask`` is the exact predicate on those keys."""
    doc = row[DOC_IDS][0]
    T = doc.shape[0]
    device = doc.device
    start = band_start(kind, row, params)
    sinks = sink_keys(kind, row, params).nonzero().squeeze(1)  # (S,) sorted
    rand = row.get("bigbird_random_keys") if kind == BIGBIRD else None
    pred = mask_mod(kind, row, params)
    zero = torch.zeros(1, 1, dtype=torch.long, device=device)
    plan = []
    for q0 in range(0, T, chunk):
        q1 = min(T, q0 + chunk)
        lo = int(start[q0:q1].min())
        extra = sinks[:int(torch.searchsorted(sinks, lo))]
        d = doc[q0:q1]
        one_doc = bool((d == d[0]).all())  # the usual chunk: a compare instead of isin's sort
        extra = extra[doc[extra] == d[0]] if one_doc else extra[torch.isin(doc[extra], d)]
        if rand is not None:
            r = rand[0, q0:q1].flatten()
            extra = torch.unique(torch.cat([extra, r[(r >= 0) & (r < lo)]]))
        keys = torch.cat([extra, torch.arange(lo, q1, device=device)])  # (K,)
        m = pred(zero, None, torch.arange(q0, q1, device=device).view(-1, 1), keys.view(1, -1))  # (C, K)
        used = m.any(0)
        if not bool(used.all()):
            keys, m = keys[used], m[:, used]
        plan.append((q0, q1, keys, m))
    return plan


class SinkAttention:
    """CPU path: a per-batch plan of gathered keys and small masks (built once); ``__call__`` runs it for every
    layer. ``keys_computed / keys_dense`` is the fraction of the T×T (query, key) pairs actually computed.

    Per row, the keys of all chunks are gathered with ONE index_select and queries are cut with ``split``, so
    the backward pass scatters into each input once (slicing per chunk would allocate a full-size zero gradient
    per chunk: quadratic in T). SDPA gets 4-D inputs so PyTorch's fused CPU kernel runs, with the mask as 0 / -inf
    (converted once per batch and dtype, not by SDPA on every layer's call)."""

    def __init__(self, batch: dict, params: MaskParams = MaskParams(), chunk: int = CHUNK):
        meta = batch_meta(batch, params)
        self.plans = [row_plan(kind, _row(meta, b), params, chunk) for b, kind in enumerate(batch[MASK_KIND])]
        self.gather = [torch.cat([keys for _, _, keys, _ in plan]) for plan in self.plans]  # (sum K,) per row
        self.q_sizes = [[q1 - q0 for q0, q1, _, _ in plan] for plan in self.plans]
        self.k_sizes = [[keys.numel() for _, _, keys, _ in plan] for plan in self.plans]
        self.masks = [[m[None, None] for *_, m in plan] for plan in self.plans]  # (1, 1, C, K) each
        self._additive: dict[torch.dtype, list[list[torch.Tensor]]] = {}
        T = meta[DOC_IDS].shape[1]
        self.keys_computed = sum(int(m.numel()) for plan in self.plans for *_, m in plan)
        self.keys_dense = len(self.plans) * T * T

    def additive_masks(self, dtype: torch.dtype) -> list[list[torch.Tensor]]:
        """The masks as ``0 / -inf`` of ``dtype``, built once per batch and dtype: SDPA would otherwise convert the
        bool mask on every call (every layer, and again in each checkpointed layer's recompute)."""
        if dtype not in self._additive:
            self._additive[dtype] = [[torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, float("-inf"))
                                      for m in row] for row in self.masks]
        return self._additive[dtype]

    def __call__(self, query, key, value, scaling):
        # query (B, H, T, D); key/value (B, Hkv, T, D) → (B, H, T, D)
        gqa = key.shape[1] != query.shape[1]
        masks = self.additive_masks(query.dtype)
        rows = []
        for b, (qb, kb, vb) in enumerate(zip(query.unbind(0), key.unbind(0), value.unbind(0))):
            k_all = kb.index_select(1, self.gather[b])  # (Hkv, sum K, D)
            v_all = vb.index_select(1, self.gather[b])
            outs = [F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=m, scale=scaling, enable_gqa=gqa).squeeze(0)
                    for q, k, v, m in zip(qb.split(self.q_sizes[b], 1), k_all.split(self.k_sizes[b], 1),
                                          v_all.split(self.k_sizes[b], 1), masks[b])]  # (H, C, D) each
            rows.append(torch.cat(outs, dim=1))  # (H, T, D)
        return torch.stack(rows)  # (B, H, T, D)


def sinks_first_permutation(batch: dict, params: MaskParams = MaskParams()) -> torch.Tensor:
    """``(B, T)``: per row, the positions of its sink keys (in order) then all other positions (in order)."""
    meta = batch_meta(batch, params)
    perms = []
    for b, kind in enumerate(batch[MASK_KIND]):
        row = _row(meta, b)
        sink = sink_keys(kind, row, params) & (row[DOC_IDS][0] >= 0)
        perms.append(torch.argsort((~sink).to(torch.int8), stable=True))
    return torch.stack(perms)


def mixed_mask_mod(batch: dict, params: MaskParams = MaskParams(), perm: torch.Tensor | None = None):
    """One FlexAttention ``mask_mod`` for a batch whose rows use different kinds; key index ``kv`` names the key
    at ``perm[b, kv]`` when a permutation is given. Indices are clamped so padded block tails stay in bounds."""
    meta = batch_meta(batch, params)
    T = meta[DOC_IDS].shape[1]
    kinds = sorted(set(batch[MASK_KIND]))
    kind_of_row = torch.tensor([kinds.index(k) for k in batch[MASK_KIND]], device=meta[DOC_IDS].device)
    mods = [mask_mod(k, meta, params) for k in kinds]

    def mod(b, h, q, kv):
        q = q.clamp(max=T - 1)
        kv = kv.clamp(max=T - 1)
        k = perm[b, kv] if perm is not None else kv
        out = mods[0](b, h, q, k)
        if len(mods) > 1:
            out = out & (kind_of_row[b] == 0)
            for i, m in enumerate(mods[1:], start=1):
                out = out | (m(b, h, q, k) & (kind_of_row[b] == i))
        return out

    def for_row(row: int):
        """The same predicate for one row, evaluating only that row's kind (used to build the BlockMask)."""
        m = mods[kinds.index(batch[MASK_KIND][row])]

        def row_mod(b, h, q, kv):
            q = q.clamp(max=T - 1)
            kv = kv.clamp(max=T - 1)
            return m(b, h, q, perm[b, kv] if perm is not None else kv)
        return row_mod

    mod.for_row = for_row
    return mod


def block_mask_from_mod(mod, B: int, T: int, device=None, block: int = 128, rows: int = 1024):
    """The BlockMask of ``mod`` (what ``create_block_mask(mod, B, None, T, T)`` builds), evaluated ``rows`` queries
    at a time, so memory stays O(rows × T) instead of O(T²). ``mod.for_row(b)``, when present, is the same
    predicate restricted to row b (cheaper: one mask kind per row)."""
    from torch.nn.attention.flex_attention import BlockMask

    nb = -(-T // block)
    kv = torch.arange(nb * block, device=device)
    kv_ok = kv < T
    partial = torch.zeros(B, 1, nb, nb, dtype=torch.bool, device=device)
    full = torch.zeros_like(partial)
    step = max(1, rows // block)
    for b in range(B):
        bt = torch.full((1, 1), b, dtype=torch.long, device=device)
        row_mod = mod.for_row(b) if hasattr(mod, "for_row") else mod
        for i0 in range(0, nb, step):
            i1 = min(nb, i0 + step)
            q = torch.arange(i0 * block, i1 * block, device=device)
            m = row_mod(bt, torch.zeros_like(bt), q.view(-1, 1), kv.view(1, -1)) & (q < T).view(-1, 1) & kv_ok.view(1, -1)
            m = m.view(i1 - i0, block, nb, block)  # (q blocks, block, kv blocks, block)
            any_ = m.any(3).any(1)
            all_ = m.all(3).all(1)
            full[b, 0, i0:i1] = all_
            partial[b, 0, i0:i1] = any_ & ~all_

    def ordered(dense):  # (B, 1, nq, nk) bool → counts (B, 1, nq), block indices (B, 1, nq, nk), listed first
        return dense.sum(-1).to(torch.int32), torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)

    n, idx = ordered(partial)
    fn, fidx = ordered(full)
    return BlockMask.from_kv_blocks(n, idx, fn, fidx, BLOCK_SIZE=block, mask_mod=mod, seq_lengths=(T, T))


_compiled_flex = None


def _flex(compiled: bool):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


class FlexSinkAttention:
    """CUDA path: FlexAttention over keys permuted to ``[sinks | rest]`` per row, with a BlockMask built once per
    batch from the mask predicates (rows may mix kinds). Forward also runs on CPU (eager, for tests)."""

    def __init__(self, batch: dict, params: MaskParams = MaskParams(), block: int = 128, compiled: bool | None = None,
                 permute: bool = True):
        doc = batch[DOC_IDS]
        B, T = doc.shape
        self.perm = sinks_first_permutation(batch, params) if permute else None  # (B, T)
        mod = mixed_mask_mod(batch, params, self.perm)
        self.block_mask = block_mask_from_mod(mod, B, T, doc.device, block=block)
        self.compiled = doc.device.type == "cuda" if compiled is None else compiled

    def __call__(self, query, key, value, scaling):
        # query (B, H, T, D); key/value (B, Hkv, T, D) → (B, H, T, D)
        if self.perm is not None:
            idx = self.perm[:, None, :, None].expand(key.shape)  # (B, Hkv, T, D)
            key, value = key.gather(2, idx), value.gather(2, idx)
        return _flex(self.compiled)(query, key, value, block_mask=self.block_mask, scale=scaling,
                                    enable_gqa=key.shape[1] != query.shape[1])


def prepare_sink_attention(batch: dict, impl: str = SINK, params: MaskParams = MaskParams()):
    """The per-batch attention callable ``(query (B,H,T,D), key, value (B,Hkv,T,D), scaling) -> (B,H,T,D)`` for
    ``impl`` 'sink' (chunked gather, any device, autograd) or 'flex' (FlexAttention; backward needs CUDA), under
    the mask parameters ``params`` (``MaskConfig.params()``)."""
    if impl == FLEX:
        return FlexSinkAttention(batch, params)
    if impl != SINK:
        raise ValueError(f"unknown sink attention implementation {impl!r}; expected sink or flex")
    return SinkAttention(batch, params)
