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
BlockMask is built block-row by block-row (never a T×T tensor).
"""

from __future__ import annotations

import torch

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
from pipeline.contract import DOC_IDS, FLEX, MASK_KIND, SINK


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
