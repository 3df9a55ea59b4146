"""Which keys the CPU sink attention computes for which queries: the per-batch plan (method.md §5), built once per
batch from the mask predicates of ``pipeline.attention.masks`` and shared by every layer.

A query q sees keys of two sorts: its band ``[band_start(q), q]`` (contiguous) and a few sink keys before it
(``sink_keys``: BOS and every EoU for the dialogue kinds). The plan cuts each row into

  shared parts  a block of ``shared`` consecutive queries of one dialogue, and the sink keys before the block's
                earliest band that EVERY query of the block sees (``universal_sink_keys``): no mask at all;
  chunks        ``chunk`` consecutive queries, and ``[the chunk's other sink keys | its band]``, with the exact
                predicate as the mask.

The two key sets of a query are disjoint and hold every key it may see, so attention over each part, merged by
log-sum-exp (``pipeline.attention.lse_attention``), is the dense masked attention. Dialogue mask, utterances of
1-2 tokens, shared blocks of 4 queries, chunks of 2 (``s`` shared key, ``c`` chunk key the mask allows, ``.`` chunk
key computed but masked, ``0`` not computed; rows 8-15 of 16)::

                          B a E b E c E d d E e e E f E g
    block 8-11     d      s 0 s 0 s c c c c
                   E      s 0 s 0 s c c c c c
                   e      s 0 s 0 s 0 c c c c c
                   e      s 0 s 0 s 0 c c c c c c
    block 12-15    E      s 0 s 0 s 0 s c c c c c c
                   f      s 0 s 0 s 0 s . . c c c c c
                   E      s 0 s 0 s 0 s 0 0 c c c c c c
                   g      s 0 s 0 s 0 s 0 0 c . . c c c c

Chunks are then grouped across rows into a few buckets of similar key counts, each bucket one batched call with
its keys padded to the bucket's widest chunk (``padded`` keys are masked out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.attention.masks import META_COLUMNS, MaskParams, bigbird_random_keys, check_meta, check_params, mask_mod
from pipeline.contract import BIGBIRD, BLK, DIALOGUE, DOC_IDS, EOU, LMR, LOCAL, MASK_KIND
from pipeline.contract import POSITION_IDS, SMR, STREAMINGLLM, UTT_IDS

CHUNK = 64  # queries per masked chunk: the band a chunk computes is about chunk + 2 utterances wide
SHARED = 1024  # queries per shared block: each chunk also computes the sinks between its block's start and its band
MAX_BUCKETS = 8  # more buckets pad less: 8 at a call cost of 128 ran ~10% faster at 16,384 than 4 at 4,096 (A/B)
CALL_COST = 128  # one more bucket (a fused-op call) costs as much as this many padded keys of one chunk
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


def row_meta(meta: dict, b: int) -> dict:
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


def universal_sink_keys(kind: str, row: dict, params: MaskParams) -> torch.Tensor:
    """``(T,)`` bool, a subset of ``sink_keys``: keys that every later query of the same dialogue sees, because the
    kind's predicate ORs them in unconditionally (``utt(k) == 0 OR eou(k)`` of the dialogue and LMR masks; only
    ``utt(k) == 0`` for SMR, whose EoU is seen by its copy alone; StreamingLLM's and BigBird's first tokens)."""
    if kind in (DIALOGUE, LMR, STREAMINGLLM, BIGBIRD):
        return sink_keys(kind, row, params)
    if kind == SMR:
        return row[UTT_IDS][0] == 0
    return torch.zeros_like(row[DOC_IDS][0], dtype=torch.bool)


def row_parts(kind: str, row: dict, params: MaskParams, chunk: int = CHUNK, shared: int = SHARED):
    """The plan of one row (metadata ``(1, T)``), in row positions.

    Returns ``(parts, keys, counts)``: ``parts`` = ``[(q0, q1, keys (n,))]``, the shared parts; ``keys`` = the keys of
    every chunk, concatenated in chunk order (chunk c = queries ``[c·chunk, (c+1)·chunk)``), each chunk's other
    sink keys then its band; ``counts`` = ``(n_chunks,)`` keys per chunk."""
    doc = row[DOC_IDS][0]
    T, device = doc.shape[0], doc.device
    per = max(1, shared // chunk)  # chunks per shared block
    nC = -(-T // chunk)
    nG = -(-nC // per)
    c_ar = torch.arange(nC, device=device)
    lo = F.pad(band_start(kind, row, params), (0, nC * chunk - T), value=T).view(nC, chunk).amin(1)  # (nC,)
    q1 = ((c_ar + 1) * chunk).clamp(max=T)
    docs = torch.cat([doc, doc[-1:].expand(nC * chunk - T)]).view(nC, chunk)  # (nC, chunk), tail repeats the last
    d0 = docs[:, 0]
    one_doc = (docs == d0[:, None]).all(1)  # (nC,)
    group = c_ar // per  # (nC,) shared block of each chunk
    lo_g = torch.full((nG,), T, device=device).scatter_reduce(0, group, lo, "amin")  # (nG,)
    d_g = d0[::per]
    one_doc_g = torch.ones(nG, dtype=torch.long, device=device).scatter_reduce(
        0, group, (one_doc & (d0 == d_g[group])).long(), "amin").bool()

    # shared keys of block g: universal sinks of its one dialogue before its earliest band
    sink = sink_keys(kind, row, params)
    s_pos = sink.nonzero().squeeze(1)  # (S,)
    s_doc = doc[s_pos]
    s_univ = universal_sink_keys(kind, row, params)[s_pos]
    shared_of = s_univ[None] & (s_pos[None] < lo_g[:, None]) & (s_doc[None] == d_g[:, None]) & one_doc_g[:, None]  # (nG, S)
    n_shared = shared_of.sum(1).tolist()
    parts = [(g * per * chunk, min(T, (g + 1) * per * chunk), s_pos[shared_of[g]]) for g in range(nG) if n_shared[g]]

    # each chunk's other sinks: before its band, of a dialogue in the chunk, not shared with its block
    other = (s_pos[None] < lo[:, None]) & (s_doc[None] == d0[:, None]) & ~shared_of[group]  # (nC, S)
    for c in (~one_doc).nonzero().squeeze(1).tolist():
        other[c] = (s_pos < lo[c]) & torch.isin(s_doc, docs[c])
    rand = row.get("bigbird_random_keys") if kind == BIGBIRD else None
    if rand is not None:  # BigBird: the chunk's random draws before its band, each key once
        extras = []
        for c in range(nC):
            r = rand[0, c * chunk:int(q1[c])].flatten()
            e = torch.unique(torch.cat([s_pos[other[c]], r[(r >= 0) & (r < lo[c])]]))
            extras.append(e[~torch.isin(e, s_pos[shared_of[group[c]]])])
        n_other = torch.tensor([e.numel() for e in extras], device=device, dtype=torch.long)
        other_keys = torch.cat(extras)
    else:
        ci, si = other.nonzero(as_tuple=True)
        n_other = torch.bincount(ci, minlength=nC)
        other_keys = s_pos[si]
    n_band = q1 - lo
    counts = n_other + n_band
    start = torch.cumsum(counts, 0) - counts  # (nC,) offset of each chunk's keys
    keys = torch.empty(int(counts.sum()), dtype=torch.long, device=device)
    c_of = torch.repeat_interleave(c_ar, n_other)
    keys[start[c_of] + torch.arange(c_of.numel(), device=device) - (torch.cumsum(n_other, 0) - n_other)[c_of]] = other_keys
    c_of = torch.repeat_interleave(c_ar, n_band)
    j = torch.arange(c_of.numel(), device=device) - (torch.cumsum(n_band, 0) - n_band)[c_of]
    keys[start[c_of] + n_other[c_of] + j] = lo[c_of] + j
    return parts, keys, counts


def bucket_widths(counts: torch.Tensor, max_buckets: int = MAX_BUCKETS, call_cost: int = CALL_COST) -> list[int]:
    """Widths (ascending) of at most ``max_buckets`` buckets for chunks of ``counts`` keys, each chunk going to the
    narrowest bucket that holds it: minimises padded keys + ``call_cost`` per bucket, by dynamic programming over
    16 candidate widths (quantiles of the counts; the largest count is always one)."""
    c = counts.sort().values
    cand = torch.unique(c[(torch.linspace(0, 1, 16) * (c.numel() - 1)).round().long()]).tolist()
    n_le = [0] + torch.searchsorted(c, torch.tensor(cand, dtype=c.dtype), right=True).tolist()  # chunks of <= w keys
    best = [(0, [])] + [None] * len(cand)  # best[i]: cost and widths covering the chunks of <= cand[i-1] keys
    for _ in range(max_buckets):
        best = [best[0]] + [min([(best[j][0] + (n_le[i] - n_le[j]) * cand[i - 1] + call_cost, best[j][1] + [cand[i - 1]])
                                 for j in range(i) if best[j] is not None] + ([best[i]] if best[i] else []))
                            for i in range(1, len(cand) + 1)]
    return best[-1][1]


class SinkPlan:
    """The plan of a batch, in flat positions: row b's query q is ``b·P + q`` (queries padded to ``P``, a multiple of
    ``chunk``), its key k is ``b·T + k``. ``shared`` = ``[(q0, q1, keys (n,), r0)]`` (r0: the block's first query as
    ``b·T + q``); ``buckets`` = ``[(chunks (n,),
    keys (n·w,), mask (n, chunk, w) bool)]``: n chunks (a chunk's queries are ``[i·chunk, (i+1)·chunk)`` for its
    flat id i) and their w keys each (padded keys and padded queries masked; a padded query sees key 0 of its
    chunk, so no softmax row is empty)."""

    def __init__(self, batch: dict, params: MaskParams = MaskParams(), chunk: int = CHUNK, shared: int = SHARED):
        meta = batch_meta(batch, params)
        kinds = list(batch[MASK_KIND])
        B, T = meta[DOC_IDS].shape
        device = meta[DOC_IDS].device
        nC = -(-T // chunk)
        self.T, self.P, self.chunk = T, nC * chunk, chunk
        self.shared, keys, counts = [], [], []
        for b, kind in enumerate(kinds):
            parts, k, n = row_parts(kind, row_meta(meta, b), params, chunk, shared)
            self.shared += [(b * self.P + q0, b * self.P + q1, b * T + s, b * T + q0) for q0, q1, s in parts]
            keys.append(k + b * T)
            counts.append(n)
        keys, counts = torch.cat(keys), torch.cat(counts)  # chunk i of the batch: row i // nC
        start = torch.cumsum(counts, 0) - counts
        widths = bucket_widths(counts)
        which = torch.searchsorted(torch.tensor(widths, device=device), counts)  # (B·nC,) bucket of each chunk
        self.buckets = []
        for j, w in enumerate(widths):
            ids = (which == j).nonzero().squeeze(1)  # (n,)
            col = torch.arange(w, device=device)
            valid = col[None] < counts[ids, None]  # (n, w)
            k = keys[torch.where(valid, start[ids, None] + col, start[ids, None])]  # (n, w) flat keys
            self.buckets.append(self._bucket(meta, kinds, params, ids, k, valid))
        self.keys_computed = (sum((q1 - q0) * s.numel() for q0, q1, s, _ in self.shared)
                              + sum(m.numel() for _, _, m in self.buckets))
        self.keys_dense = B * T * T
        pos = torch.arange(self.P, device=device)
        self.real_queries = (torch.arange(B, device=device)[:, None] * T + pos.clamp(max=T - 1)).flatten()  # (B·P,)
        self._additive: dict = {}

    def _bucket(self, meta: dict, kinds: list[str], params: MaskParams, ids, k, valid):
        """``(ids, keys (n·w,), mask (n, chunk, w))`` of the chunks ``ids`` with flat keys ``k`` (n, w)."""
        T, C, nC = self.T, self.chunk, self.P // self.chunk
        rows = ids // nC
        q = (ids % nC)[:, None] * C + torch.arange(C, device=ids.device)  # (n, C) row positions
        kk = (k - rows[:, None] * T)[:, None, :]  # (n, 1, w) row positions
        present = sorted({kinds[r] for r in rows.tolist()})
        if len(present) == 1:  # the usual batch: one kind, one predicate call
            m = mask_mod(present[0], meta, params)(rows[:, None, None], None, q.clamp(max=T - 1)[:, :, None], kk)
        else:
            m = torch.zeros(ids.numel(), C, k.shape[1], dtype=torch.bool, device=ids.device)
            for kind in present:
                sel = torch.tensor([kinds[r] == kind for r in rows.tolist()], dtype=torch.bool, device=ids.device)
                r = rows[sel]
                m[sel] = mask_mod(kind, meta, params)(r[:, None, None], None, q[sel].clamp(max=T - 1)[:, :, None], kk[sel])
        m &= valid[:, None, :]  # (n, C, w)
        pad = q >= T  # queries past the row's end (its last chunk): they see key 0 of their chunk only
        if bool(pad.any()):
            m &= ~pad[:, :, None]
            m[:, :, 0] |= pad
        if any(kind in (SMR, BIGBIRD) for kind in present):  # sink keys that not every query sees: drop unseen columns
            used = m.any(1)  # (n, w)
            w2 = int(used.sum(1).max())
            if w2 < k.shape[1]:
                order = torch.argsort((~used).to(torch.int8), dim=1, stable=True)[:, :w2]
                k, m = k.gather(1, order), m.gather(2, order[:, None, :].expand(-1, C, -1))
        return ids, k.flatten(), m

    @property
    def pairs_allowed(self) -> int:
        """(query, key) pairs of the row's own queries that the plan computes unmasked: the pairs the mask allows."""
        rows = self.keys_dense // (self.T * self.T)
        shared = sum((q1 - q0) * s.numel() for q0, q1, s, _ in self.shared)  # blocks hold no padded query
        return shared + sum(int(m.sum()) for _, _, m in self.buckets) - rows * (self.P - self.T)  # a padded query: 1

    def additive_mask(self, j: int, dtype: torch.dtype, group: int) -> torch.Tensor:
        """Bucket j's mask as ``0 / -inf`` of ``dtype``, ``(n, 1, group·chunk, w)``: the chunk's rows repeated for the
        ``group`` query heads that share a key head (built once per batch, dtype and group)."""
        key = (j, dtype, group)
        if key not in self._additive:
            m = self.buckets[j][2]
            # 0 / -inf as (m - 1) / 0 with its 0/0 = nan set to 0: exact, and about 2.5x faster here than torch.where
            add = m.to(dtype).sub_(1).div_(0.0).nan_to_num_(nan=0.0, neginf=float("-inf"))  # (m - 1) is -1 or 0: no +inf
            self._additive[key] = add[:, None, None].expand(-1, 1, group, -1, -1).reshape(m.shape[0], 1, group * self.chunk, -1)
        return self._additive[key]
