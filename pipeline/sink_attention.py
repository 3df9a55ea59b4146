"""Sink attention: exactly the masked attention of ``pipeline.masks``, without a T×T mask and without computing
keys no query of a chunk may see (method.md §5).

For each row and each chunk of C queries, the keys the chunk can reach are gathered into one short list:

    [ sink keys before the band (BOS, EoUs, StreamingLLM sinks, BigBird globals/randoms) | the contiguous band ]

The band starts at the earliest key any query of the chunk may see locally (the start of the previous utterance
for the dialogue mask, of the block for SMR/LMR, ``q - w + 1`` for windows). Attention is permutation-invariant
over keys when the mask is permuted with them, so applying the exact predicate on this (C × K) key set gives the
same result as the dense reference, with K ≈ i + 1.5·L instead of i·L keys for a query in utterance i.

CPU: plain torch gather + SDPA per chunk, so autograd gives gradients (FlexAttention has no CPU backward in this
torch). CUDA: FlexAttention with a BlockMask built once per batch from the same predicates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import bigbird_random_keys, mask_mod

CHUNK = 256
SINK_KINDS = {"dialogue", "smr", "lmr"}  # sinks: BOS + every EoU
WINDOW_KINDS = {"local", "streamingllm", "bigbird"}


def _run_starts(*keys: torch.Tensor) -> torch.Tensor:
    """``(T,)`` index where the run of equal ``keys`` containing each position starts."""
    T = keys[0].shape[0]
    idx = torch.arange(T, device=keys[0].device)
    change = torch.zeros(T, dtype=torch.bool, device=keys[0].device)
    change[0] = True
    for k in keys:
        change[1:] |= k[1:] != k[:-1]
    return torch.cummax(torch.where(change, idx, torch.zeros_like(idx)), 0).values


def _previous_run_start(start: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
    """Start of the run before each position's run, if it is in the same dialogue, else the run's own start."""
    before = (start - 1).clamp(min=0)
    prev = start[before]
    return torch.where((start > 0) & (doc[before] == doc), prev, start)


def _row_plan(kind: str, meta: dict, b: int, params: dict, chunk: int) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """For one row: ``[(q0, q1, key positions (K,), mask (C, K))]`` per query chunk."""
    doc = meta["doc_ids"][b]
    T = doc.shape[0]
    device = doc.device
    pos = meta["position_ids"][b] if "position_ids" in meta else None
    ar = torch.arange(T, device=device)
    if kind in SINK_KINDS:
        by = meta["blk"][b] if kind in ("smr", "lmr") and "blk" in meta else meta["utt_ids"][b]
        start = _run_starts(doc, by)
        band_start = _previous_run_start(start, doc) if kind == "dialogue" else start
        sink = (meta["utt_ids"][b] == 0) | meta["eou"][b]
    elif kind in WINDOW_KINDS:
        w = params.get("local_window" if kind == "local" else "sink_window" if kind == "streamingllm" else "bigbird_window", 64)
        band_start = (ar - w + 1).clamp(min=0)
        if kind == "streamingllm":
            sink = pos < params.get("sink_tokens", 1)
        elif kind == "bigbird":
            sink = pos < params.get("bigbird_global", 1)
        else:
            sink = torch.zeros(T, dtype=torch.bool, device=device)
    else:  # causal: every earlier key of the dialogue
        band_start = _run_starts(doc)
        sink = torch.zeros(T, dtype=torch.bool, device=device)
    rand = meta.get("bigbird_random_keys")
    pred = mask_mod(kind, {k: v[b:b + 1] for k, v in meta.items() if torch.is_tensor(v)}, **params)
    zero = torch.zeros(1, 1, dtype=torch.long, device=device)
    plan = []
    for q0 in range(0, T, chunk):
        q1 = min(T, q0 + chunk)
        lo = int(band_start[q0:q1].min())
        extra = sink[:lo].nonzero().squeeze(1)
        if kind == "bigbird" and rand is not None:
            r = rand[b, q0:q1].flatten()
            extra = torch.unique(torch.cat([extra, r[(r >= 0) & (r < lo)]]))
        keys = torch.cat([extra, torch.arange(lo, q1, device=device)])  # (K,)
        m = pred(zero, None, torch.arange(q0, q1, device=device).view(-1, 1), keys.view(1, -1))  # (C, K)
        plan.append((q0, q1, keys, m))
    return plan


class SinkAttention:
    """Per-batch plan of gathered keys and small masks; ``__call__`` runs it for every layer."""

    def __init__(self, batch: dict, chunk: int = CHUNK, **params):
        meta = {k: batch[k] for k in ("doc_ids", "utt_ids", "eou", "blk", "position_ids") if k in batch}
        if "bigbird" in batch["mask_kind"]:
            meta["bigbird_random_keys"] = bigbird_random_keys(meta, params.get("bigbird_random", 8), params.get("bigbird_seed", 0))
        self.plans = [_row_plan(kind, meta, b, params, chunk) for b, kind in enumerate(batch["mask_kind"])]
        T = batch["doc_ids"].shape[1]
        self.keys_computed = sum(int(m.numel()) for plan in self.plans for *_, m in plan)
        self.keys_dense = len(self.plans) * T * T

    def __call__(self, query, key, value, scaling):
        # query (B, H, T, D); key/value (B, Hkv, T, D)
        gqa = key.shape[1] != query.shape[1]
        rows = []
        for b, plan in enumerate(self.plans):
            outs = []
            for q0, q1, keys, m in plan:
                k = key[b].index_select(1, keys)  # (Hkv, K, D)
                v = value[b].index_select(1, keys)
                outs.append(F.scaled_dot_product_attention(query[b, :, q0:q1], k, v, attn_mask=m, scale=scaling, enable_gqa=gqa))
            rows.append(torch.cat(outs, dim=1))  # (H, T, D)
        return torch.stack(rows)  # (B, H, T, D)


class FlexSinkAttention:
    """CUDA path: FlexAttention with a BlockMask built once per batch from the mask predicates (rows may mix kinds)."""

    def __init__(self, batch: dict, **params):
        from torch.nn.attention.flex_attention import create_block_mask

        meta = {k: batch[k] for k in ("doc_ids", "utt_ids", "eou", "blk", "position_ids") if k in batch}
        if "bigbird" in batch["mask_kind"]:
            meta["bigbird_random_keys"] = bigbird_random_keys(meta, params.get("bigbird_random", 8), params.get("bigbird_seed", 0))
        kinds = sorted(set(batch["mask_kind"]))
        kind_of_row = torch.tensor([kinds.index(k) for k in batch["mask_kind"]], device=meta["doc_ids"].device)
        mods = [mask_mod(k, meta, **params) for k in kinds]

        def mod(b, h, q, k):
            out = mods[0](b, h, q, k) & (kind_of_row[b] == 0)
            for i, m in enumerate(mods[1:], start=1):
                out = out | (m(b, h, q, k) & (kind_of_row[b] == i))
            return out

        B, T = meta["doc_ids"].shape
        self.block_mask = create_block_mask(mod, B, None, T, T, device=meta["doc_ids"].device)

    def __call__(self, query, key, value, scaling):
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(query, key, value, block_mask=self.block_mask, scale=scaling,
                              enable_gqa=key.shape[1] != query.shape[1])


def prepare_sink_attention(batch: dict, impl: str = "sink", **params):
    """The per-batch attention callable for ``impl`` 'sink' (chunked gather) or 'flex' (FlexAttention)."""
    if impl == "flex":
        return FlexSinkAttention(batch, **params)
    return SinkAttention(batch, **params)
