"""Attention run as the parts of a ``SinkPlan`` (disjoint key sets per query), merged by log-sum-exp.

Each part is one call of PyTorch's fused CPU attention op (``aten._scaled_dot_product_flash_attention_for_cpu``,
which returns the log-sum-exp that ``F.scaled_dot_product_attention`` drops): a shared part is one unmasked call
over a block of queries, a bucket is one batched call over its chunks with their masks. For a query with parts
(o₁, l₁), (o₂, l₂): ``l = log(e^l₁ + e^l₂)`` and ``o = e^(l₁-l)·o₁ + e^(l₂-l)·o₂``, exactly softmax over the union.

Backward runs the op's own backward on every part with the MERGED output and log-sum-exp (as ring attention does):
``P = exp(S - l)`` and ``rowsum(dO·O)`` are then those of the whole softmax, so each part's gradients are its share
of the exact ones. Nothing gathered is saved: keys are gathered again in backward, so a layer keeps only its
inputs, its output and the log-sum-exp (what SDPA keeps).

Grouped-query attention: the ``g`` query heads of one key head are stacked along the query axis (``(g·C)``
queries against that head's keys), so keys are never repeated per query head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.attention.sink_plan import SinkPlan

_attn = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_attn_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _fold(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """``(n, C, H, ...)`` → ``(n, Hkv, g·C, ...)``: query head h = kv head h // g, stacked along the query axis."""
    n, C, H = x.shape[:3]
    g = H // hkv
    return x.reshape(n, C, hkv, g, *x.shape[3:]).movedim(1, 3).reshape(n, hkv, g * C, *x.shape[3:])


class _Flat:
    """Queries ``(B·T, H·D)`` and keys/values ``(B·T, Hkv·D)``, 2-D so that a gather or a scatter moves whole rows
    (``index_select`` on 3-D rows is several times slower); views, not copies, when the inputs are transposed
    ``(B, T, H, D)`` tensors as a Llama layer passes them."""

    def __init__(self, plan: SinkPlan, q, k, v):
        B, H, T, D = q.shape
        self.H, self.hkv, self.D, self.C, self.P, self.T = H, k.shape[1], D, plan.chunk, plan.P, T
        self.q, self.k, self.v = (x.transpose(1, 2).reshape(B * T, -1) for x in (q, k, v))
        self.real = plan.real_queries  # (B·P,) padded query → its row in (B·T) (a padded one: the row's last)

    def chunk_queries(self, x: torch.Tensor, ids: torch.Tensor, real: bool = False) -> torch.Tensor:
        """``x`` ``(N, H·F)`` at the queries of the chunks ``ids`` (n,) → ``(n, Hkv, g·C, F)``. Rows of ``x`` are
        padded positions (B·P), or real queries (B·T) when ``real``: then padded queries (the last chunk of a row
        whose T is not a multiple of C) are zeroed, as their output gradient is 0."""
        n, F_ = ids.numel(), x.shape[1] // self.H
        if self.H == self.hkv and not (real and self.P != self.T):  # chunk i = rows [i·C, (i+1)·C): one row per chunk
            return _fold(x.reshape(-1, self.C * x.shape[1]).index_select(0, ids).view(n, self.C, self.H, F_), self.hkv)
        pos = _queries(ids, self.C)  # (n·C,)
        idx = self._head_rows(self.real[pos] if real and self.P != self.T else pos, n)  # (n, Hkv, g, C)
        out = x.reshape(-1, F_).index_select(0, idx.flatten()).view(n, self.hkv, -1, self.C, F_)  # gathered folded
        if real and self.P != self.T:
            out.masked_fill_((pos % self.P >= self.T).view(n, 1, 1, self.C, 1), 0)
        return out.view(n, self.hkv, -1, F_)

    def put_chunks(self, dst: torch.Tensor, ids: torch.Tensor, x: torch.Tensor) -> None:
        """``dst`` ``(B·P, H·F)`` at the queries of chunks ``ids`` ← ``x`` ``(n, Hkv, g·C, F)`` (any strides): one
        pass, whole chunks (a scatter of (query, head) rows of F is twice as slow)."""
        g = self.H // self.hkv
        src = x.unflatten(2, (g, self.C)).permute(0, 3, 1, 2, 4)  # (n, C, Hkv, g, F) view
        dst.view(-1, self.C, self.hkv, g, x.shape[-1]).index_copy_(0, ids, src.to(dst.dtype))

    def _head_rows(self, pos: torch.Tensor, n: int) -> torch.Tensor:
        """``(n, Hkv, g, C)`` rows of a ``(N·H, F)`` view for query positions ``pos`` (n·C,): query head kv·g + j
        of a key head kv, in the folded order of ``_fold``."""
        heads = torch.arange(self.H, device=pos.device).view(1, self.hkv, -1, 1)  # (1, Hkv, g, 1)
        return pos.view(n, 1, 1, self.C) * self.H + heads

    def keys(self, idx: torch.Tensor, n: int):
        """Keys and values at flat positions ``idx`` (n·w,) → ``(n, Hkv, w, D)`` each."""
        return (x.index_select(0, idx).view(n, -1, self.hkv, self.D).transpose(1, 2) for x in (self.k, self.v))

    def block(self, x: torch.Tensor, q0: int, q1: int) -> torch.Tensor:
        """``x`` ``(N, H·F)`` rows ``[q0, q1)`` → ``(1, Hkv, g·m, F)``."""
        return _fold(x[q0:q1].view(1, q1 - q0, self.H, -1), self.hkv)


def _as_rows(x: torch.Tensor, m: int) -> torch.Tensor:
    """``(1, Hkv, g·m, F)`` (any strides) → ``(m, Hkv, g, F)``, a view: query head kv·g + j of row r, as in ``(m, H, F)``
    rows (the inverse of ``_fold``, without a copy)."""
    return x[0].unflatten(1, (-1, m)).permute(2, 0, 1, 3)


def _queries(ids: torch.Tensor, C: int) -> torch.Tensor:
    """Padded flat query positions (n·C,) of the chunks ``ids``."""
    return (ids[:, None] * C + torch.arange(C, device=ids.device)).flatten()


def _shared_backward(do, q, k, v, out, lse, scale: float, threads: int | None = None):
    """The fused op's backward of one shared part: ``do, q, out`` ``(1, Hkv, M, D)``, ``k, v`` ``(1, Hkv, n, D)``,
    ``lse`` ``(1, Hkv, M)``. The op parallelises its backward over batch × heads only, so with Hkv heads on t
    threads (SmolLM2: 3 on 2) some threads would idle; the M queries are split into s pieces run as a batch of s
    against the same keys (each piece's key gradients summed), s·Hkv a multiple of t."""
    hkv, M = q.shape[1], q.shape[2]
    t = threads or torch.get_num_threads()
    s = t // math.gcd(hkv, t)
    if s == 1 or M % s or M // s < 256:
        return _attn_backward(do, q, k, v, out, lse.contiguous(), 0.0, False, scale=scale)
    split = lambda t: t.view(hkv, s, M // s, -1).transpose(0, 1)  # (1, Hkv, M, F) → (s, Hkv, M/s, F)
    gq, gk, gv = _attn_backward(split(do), split(q), k.expand(s, -1, -1, -1), v.expand(s, -1, -1, -1), split(out),
                                split(lse[..., None])[..., 0].contiguous(), 0.0, False, scale=scale)
    return gq.transpose(0, 1).reshape(1, hkv, M, -1), gk.sum(0, keepdim=True), gv.sum(0, keepdim=True)


class PlannedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: SinkPlan, scale: float):
        # q (B, H, T, D); k, v (B, Hkv, T, D) → (B, H, T, D)
        B, H, T, D = q.shape
        g = H // k.shape[1]
        x = _Flat(plan, q, k, v)
        out = torch.empty(B * plan.P, H * D, dtype=q.dtype, device=q.device)  # (B·P, H·D), queries padded per row
        lse = torch.empty(B * plan.P, H, dtype=torch.float32, device=q.device)  # (B·P, H)
        for j, (ids, keys, _) in enumerate(plan.buckets):
            kb, vb = x.keys(keys, ids.numel())  # (n, Hkv, w, D)
            o, l = _attn(x.chunk_queries(x.q, ids, real=True), kb, vb, attn_mask=plan.additive_mask(j, q.dtype, g), scale=scale)
            x.put_chunks(out, ids, o)
            x.put_chunks(lse, ids, l[..., None])
        if plan.shared:
            ks, vs = x.keys(torch.cat([s for _, _, s, _ in plan.shared]), 1)  # (1, Hkv, sum n, D)
            at = 0
            for q0, q1, s, r0 in plan.shared:
                m, n = q1 - q0, s.numel()
                o, l = _attn(x.block(x.q, r0, r0 + m), ks[:, :, at:at + n], vs[:, :, at:at + n], scale=scale)
                at += n
                o, l = _as_rows(o, m), _as_rows(l[..., None], m)[..., 0].float()  # (m, Hkv, g, D), (m, Hkv, g) views
                o_b, l_b = out[q0:q1].view(o.shape), lse[q0:q1].view(l.shape)  # the block's chunk parts: merged into in place
                l_all = torch.logaddexp(l, l_b)  # (m, Hkv, g)
                o_b.mul_(torch.exp(l_b - l_all)[..., None]).addcmul_(o, torch.exp(l - l_all)[..., None])  # two passes
                l_b.copy_(l_all)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out.view(B, plan.P, H, D)[:, :T].transpose(1, 2)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        B, H, T, D = q.shape
        g = H // k.shape[1]
        x = _Flat(plan, q, k, v)
        do = dout.transpose(1, 2).reshape(B * T, H * D)
        dq = torch.empty(B * plan.P, H * D, dtype=q.dtype, device=q.device)  # every padded query in one chunk
        dk, dv = torch.zeros_like(x.k), torch.zeros_like(x.v)  # (B·T, Hkv·D)
        for j, (ids, keys, _) in enumerate(plan.buckets):
            kb, vb = x.keys(keys, ids.numel())
            gq, gk, gv = _attn_backward(x.chunk_queries(do, ids, real=True), x.chunk_queries(x.q, ids, real=True), kb, vb,
                                        x.chunk_queries(out, ids), x.chunk_queries(lse, ids)[..., 0].contiguous(), 0.0, False,
                                        attn_mask=plan.additive_mask(j, q.dtype, g), scale=scale)
            x.put_chunks(dq, ids, gq)
            dk.index_add_(0, keys, gk.transpose(1, 2).reshape(-1, dk.shape[1]))
            dv.index_add_(0, keys, gv.transpose(1, 2).reshape(-1, dv.shape[1]))
        if plan.shared:
            keys = torch.cat([s for _, _, s, _ in plan.shared])
            ks, vs = x.keys(keys, 1)  # (1, Hkv, sum n, D)
            gks, gvs = torch.empty_like(ks), torch.empty_like(vs)
            at = 0
            for q0, q1, s, r0 in plan.shared:
                n, r1 = s.numel(), r0 + q1 - q0
                gq, gks[:, :, at:at + n], gvs[:, :, at:at + n] = _shared_backward(
                    x.block(do, r0, r1), x.block(x.q, r0, r1), ks[:, :, at:at + n], vs[:, :, at:at + n],
                    x.block(out, q0, q1), x.block(lse, q0, q1)[..., 0], scale)
                dq[q0:q1].view(q1 - q0, -1, g, D).add_(_as_rows(gq, q1 - q0))
                at += n
            dk.index_add_(0, keys, gks[0].transpose(0, 1).reshape(-1, dk.shape[1]))
            dv.index_add_(0, keys, gvs[0].transpose(0, 1).reshape(-1, dv.shape[1]))
        dq = dq.view(B, plan.P, H, D)[:, :T].transpose(1, 2)
        dk = dk.view(B, T, -1, D).transpose(1, 2)
        dv = dv.view(B, T, -1, D).transpose(1, 2)
        return dq, dk, dv, None, None


def planned_attention(plan: SinkPlan, query, key, value, scale: float):
    """``(B, H, T, D)`` attention of ``query`` over ``key``/``value`` ``(B, Hkv, T, D)`` under ``plan``."""
    return PlannedAttention.apply(query, key, value, plan, scale)
