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

CPU path (``SinkAttention``): a ``SinkPlan`` (``pipeline.attention.sink_plan``), built once per batch, cuts each
row into shared parts (a block of queries and the sink keys every one of them sees: one unmasked attention) and
chunks of C queries (their remaining sink keys and their band ``[sinks | band]``, with the exact predicate as the
mask). ``pipeline.attention.lse_attention`` runs every part with PyTorch's fused CPU attention op and merges them
by log-sum-exp; its backward runs the op's backward per part with the merged output. Attention is
permutation-invariant over keys when the mask is permuted with them, so the result equals the dense reference. A
query in utterance i of a dialogue with utterances of L tokens computes about ``i + C + 2L`` keys instead of
``i·L``, most of them in the shared parts at the fused kernel's full speed.

    dialogue mask, chunk = the two d queries     natural key order              gathered [sinks | band]
                                                   B a a E b b E c c E d d        B E E | c c E d d
                                              d    1 0 0 1 0 0 1 1 1 1 1          1 1 1   1 1 1 1
                                              d    1 0 0 1 0 0 1 1 1 1 1 1        1 1 1   1 1 1 1 1

CUDA path (``FlexSinkAttention``): FlexAttention with a BlockMask built once per batch from the same predicates.
Keys are permuted per row so the sinks form one contiguous run at the front (``[sinks | the rest]``): the scattered
EoU columns become a few dense blocks and the rest of the mask is banded, so most 128×128 blocks are skipped. The
BlockMask evaluates the predicate only on the blocks that may hold an allowed pair (``candidate_blocks``: the sink
blocks and the band's blocks of each query block), never on a T×T tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.attention.lse_attention import planned_attention
from pipeline.attention.masks import MaskParams, mask_mod
from pipeline.attention.sink_plan import (  # noqa: F401  (band_start, sink_keys: the plan's predicates, re-exported)
    CHUNK,
    SHARED,
    SinkPlan,
    row_parts,
    band_start,
    batch_meta,
    row_meta,
    sink_keys,
)
from pipeline.contract import BIGBIRD, DOC_IDS, FLEX, MASK_KIND, SINK


class SinkAttention:
    """CPU path: a per-batch ``SinkPlan`` (built once), run for every layer by ``planned_attention``: shared sink
    keys per block of queries without a mask, each chunk's remaining keys with its exact mask, merged by
    log-sum-exp. ``keys_computed / keys_dense`` is the fraction of the T×T (query, key) pairs actually computed,
    ``pairs_allowed / keys_dense`` the fraction the mask allows."""

    def __init__(self, batch: dict, params: MaskParams = MaskParams(), chunk: int = CHUNK, shared: int = SHARED):
        self.plan = SinkPlan(batch, params, chunk, shared)
        self.keys_computed, self.keys_dense = self.plan.keys_computed, self.plan.keys_dense

    @property
    def pairs_allowed(self) -> int:
        return self.plan.pairs_allowed  # sums every bucket's mask: asked by the bench, not on the training step

    def __call__(self, query, key, value, scaling):
        # query (B, H, T, D); key/value (B, Hkv, T, D) → (B, H, T, D)
        return planned_attention(self.plan, query, key, value, scaling)


def sinks_first_permutation(batch: dict, params: MaskParams = MaskParams()) -> torch.Tensor:
    """``(B, T)``: per row, the positions of its sink keys (in order) then all other positions (in order)."""
    meta = batch_meta(batch, params)
    perms = []
    for b, kind in enumerate(batch[MASK_KIND]):
        row = row_meta(meta, b)
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


def candidate_blocks(batch: dict, params: MaskParams, perm: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``(B, nb, nb)`` bool: per row, the key blocks (of the keys permuted by ``perm``, sinks first) that may hold a
    pair the mask allows for each query block; the rest are certainly empty. A pair needs ``pos(k) <= q`` and, for
    a key outside the row's sink keys, ``pos(k) >= band_start(q)`` (``sink_plan.band_start``: every other visible
    key lies in the band). So a query block ``[q0, q1]`` only meets key blocks whose smallest position is at most
    ``q1`` and that hold a sink key or reach the block's smallest band start. BigBird rows (random keys outside
    band and sinks) keep every block."""
    meta = batch_meta(batch, params)
    B, T = meta[DOC_IDS].shape
    nb = -(-T // block)
    out = torch.ones(B, nb, nb, dtype=torch.bool, device=perm.device)
    pad = nb * block - T
    for b, kind in enumerate(batch[MASK_KIND]):
        if kind == BIGBIRD:
            continue
        row = row_meta(meta, b)
        pos = perm[b]  # (T,) position of each permuted key
        per_block = lambda x, fill: F.pad(x, (0, pad), value=fill).view(nb, block)  # (T,) -> (nb, block)
        q_last = (torch.arange(1, nb + 1, device=pos.device) * block - 1).clamp(max=T - 1)  # (nb,)
        q_start = per_block(band_start(kind, row, params), T).amin(1)  # (nb,) smallest band start of a query block
        k_min, k_max = per_block(pos, T).amin(1), per_block(pos, -1).amax(1)  # (nb,) key positions of a key block
        has_sink = per_block(sink_keys(kind, row, params)[pos], False).any(1)  # (nb,)
        out[b] = (k_min[None, :] <= q_last[:, None]) & (has_sink[None, :] | (k_max[None, :] >= q_start[:, None]))
    return out


def block_mask_from_mod(mod, B: int, T: int, device=None, block: int = 128, rows: int = 1024,
                        candidates: torch.Tensor | None = None):
    """The BlockMask of ``mod`` (what ``create_block_mask(mod, B, None, T, T)`` builds), evaluated on ``rows``
    queries' worth of blocks at a time, so memory stays O(rows × T) instead of O(T²). ``mod.for_row(b)``, when
    present, is the same predicate restricted to row b (cheaper: one mask kind per row). ``candidates``
    (``(B, nb, nb)`` bool, ``candidate_blocks``): only those blocks are evaluated, the others are empty."""
    from torch.nn.attention.flex_attention import BlockMask

    nb = -(-T // block)
    ar = torch.arange(block, device=device)
    partial = torch.zeros(B, 1, nb, nb, dtype=torch.bool, device=device)
    full = torch.zeros_like(partial)
    if candidates is None:
        candidates = torch.ones(B, nb, nb, dtype=torch.bool, device=device)
    step = max(1, rows * nb // max(1, block))  # blocks per evaluation: as many elements as `rows` queries × T keys
    for b in range(B):
        bt = torch.full((1, 1, 1), b, dtype=torch.long, device=device)
        row_mod = mod.for_row(b) if hasattr(mod, "for_row") else mod
        ij = candidates[b].nonzero()  # (n, 2): query block, key block
        for c0 in range(0, ij.shape[0], step):
            i, j = ij[c0:c0 + step].unbind(1)
            q = (i[:, None] * block + ar)[:, :, None]  # (n, block, 1)
            kv = (j[:, None] * block + ar)[:, None, :]  # (n, 1, block)
            m = row_mod(bt, torch.zeros_like(bt), q, kv) & (q < T) & (kv < T)  # (n, block, block)
            any_, all_ = m.flatten(1).any(1), m.flatten(1).all(1)
            full[b, 0, i, j] = all_
            partial[b, 0, i, j] = any_ & ~all_

    def ordered(dense):  # (B, 1, nq, nk) bool → counts (B, 1, nq), block indices (B, 1, nq, nk), listed first
        return dense.sum(-1).to(torch.int32), torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)

    n, idx = ordered(partial)
    fn, fidx = ordered(full)
    return BlockMask.from_kv_blocks(n, idx, fn, fidx, BLOCK_SIZE=block, mask_mod=mod, seq_lengths=(T, T))


_compiled_flex = None


def flex_attention_fn(compiled: bool):
    """FlexAttention: compiled once per process (static shapes: one graph per length) when ``compiled``, else eager."""
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
        cand = candidate_blocks(batch, params, self.perm, block) if permute else None
        self.block_mask = block_mask_from_mod(mod, B, T, doc.device, block=block, candidates=cand)
        self.compiled = doc.device.type == "cuda" if compiled is None else compiled

    def __call__(self, query, key, value, scaling):
        # query (B, H, T, D); key/value (B, Hkv, T, D) → (B, H, T, D)
        if self.perm is not None:
            idx = self.perm[:, None, :, None].expand(key.shape)  # (B, Hkv, T, D)
            key, value = key.gather(2, idx), value.gather(2, idx)
        return flex_attention_fn(self.compiled)(query, key, value, block_mask=self.block_mask, scale=scaling,
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
