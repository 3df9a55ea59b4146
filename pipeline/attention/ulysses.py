"""Ulysses sequence parallelism: sequence shards → all-to-all → the full sequence for heads/P on each rank →
the same masked attention (built from FULL-length metadata, so any mask works) → all-to-all back.

    rank r holds   q, k, v  (B, H, T/P, D)   tokens [r·T/P, (r+1)·T/P)
    all-to-all  →  q, k, v  (B, H/P, T, D)   heads  [r·H/P, (r+1)·H/P)
    attention   →  out      (B, H/P, T, D)
    all-to-all  →  out      (B, H, T/P, D)

transformers' own Ulysses integration silently replaces custom masks with a causal one; this wraps the mask-
carrying attention callable itself, so the mask cannot be lost.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.contract import INPUT_IDS, LABELS, POSITION_IDS, TARGETS


def check_sp_size(num_heads: int, num_kv_heads: int, sp: int) -> None:
    """THE sequence-parallel head rule, checked once before launch (``pipeline.config.RunConfig`` for a random-init
    model, ``pipeline.training.launch.check_sequence_parallel`` for a model folder), never per forward: Ulysses
    splits the query AND the key/value heads over the ``sp`` ranks, so both must be divisible."""
    if sp < 1 or num_heads % sp or num_kv_heads % sp:
        raise ValueError(f"sequence_parallel_size={sp} must divide num_heads={num_heads} and num_kv_heads={num_kv_heads}")


class _AllToAll(torch.autograd.Function):
    """Equal-split all-to-all over dim 0 (size P): out[i] = rank i's in[me]. It is its own adjoint."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = torch.empty_like(grad, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(B, H, T/P, D) sequence shard → (B, H/P, T, D) head shard."""
    P = dist.get_world_size(group)
    B, H, t, D = x.shape
    send = x.view(B, P, H // P, t, D).permute(1, 0, 2, 3, 4)  # (P, B, H/P, T/P, D): group j goes to rank j
    recv = _AllToAll.apply(send, group)  # recv[i] = rank i's tokens for my heads
    return recv.permute(1, 2, 0, 3, 4).reshape(B, H // P, P * t, D)


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(B, H/P, T, D) head shard → (B, H, T/P, D) sequence shard."""
    P = dist.get_world_size(group)
    B, h, T, D = x.shape
    send = x.view(B, h, P, T // P, D).permute(2, 0, 1, 3, 4)  # (P, B, H/P, T/P, D): token chunk j goes to rank j
    recv = _AllToAll.apply(send, group)  # recv[i] = my tokens for rank i's heads
    return recv.permute(1, 0, 2, 3, 4).reshape(B, P * h, T // P, D)


def ulysses_attention(attn_fn, group):
    """Wrap an attention callable ``(q, k, v, scaling) -> out`` prepared for the FULL sequence (full-length
    metadata) into one taking this rank's contiguous sequence shard. Autograd-correct: the all-to-all is its
    own adjoint. Head group r of the query maps onto kv-head group r, so grouped-query attention is kept."""

    def attend(query, key, value, scaling):
        # query (B, H, T/P, D); key/value (B, Hkv, T/P, D) → (B, H, T/P, D); P divides H and Hkv (check_sp_size)
        q, k, v = (seq_to_heads(t, group) for t in (query, key, value))  # (B, H/P, T, D), (B, Hkv/P, T, D)
        return heads_to_seq(attn_fn(q, k, v, scaling), group)

    return attend


SHARDED_COLUMNS = (INPUT_IDS, POSITION_IDS, TARGETS, LABELS)


def shard_sequence(batch: dict, rank: int, size: int) -> dict:
    """This rank's contiguous token slice ``[rank·T/size, (rank+1)·T/size)`` of the per-token training columns
    (``SHARDED_COLUMNS``, those present); the mask metadata (doc_ids, utt_ids, eou, blk) and ``mask_kind`` stay
    full length, because the attention runs on the whole sequence. ``targets`` should be shifted before the
    split (``pipeline.training.shard_loader.targets_from_labels``) so the prediction across a shard boundary is kept."""
    T = batch[INPUT_IDS].shape[1]
    if T % size:
        raise ValueError(f"sequence length {T} is not divisible by sequence_parallel_size={size}")
    n = T // size
    out = dict(batch)
    for c in SHARDED_COLUMNS:
        if c in batch:
            out[c] = batch[c][:, rank * n:(rank + 1) * n]
    return out


class SequenceParallel:
    """Ulysses groups of ``size`` consecutive ranks: every rank of a group holds the same sample, a contiguous
    slice of its tokens, and the full-length mask metadata; attention runs on the whole sequence for heads/size.
    ``SequenceParallel(1)`` changes nothing. The head counts were checked before launch (``check_sp_size``)."""

    def __init__(self, size: int, group=None, rank: int = 0):
        self.size, self.group, self.rank = size, group, rank

    @classmethod
    def create(cls, size: int) -> "SequenceParallel":
        """This rank's group; every rank must call it (creating process groups is collective)."""
        if size == 1:
            return cls(1)
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = None
        for start in range(0, world, size):  # every rank creates every group, in the same order
            group = dist.new_group(list(range(start, start + size)))
            if start <= rank < start + size:
                mine = group
        return cls(size, mine, rank % size)

    def local(self, batch: dict) -> dict:
        """This rank's token slice of the per-token columns (``shard_sequence``); ``batch`` itself when size is 1."""
        if self.size == 1:
            return batch
        return shard_sequence(batch, self.rank, self.size)

    def wrap(self, attn):
        """``attn`` (built from full-length metadata) taking this rank's sequence shard (``ulysses_attention``)."""
        if self.size == 1:
            return attn
        return ulysses_attention(attn, self.group)
