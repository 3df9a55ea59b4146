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


def _unfold(x: torch.Tensor, C: int) -> torch.Tensor:
    """``(n, Hkv, g·C, ...)`` → ``(n·C, H, ...)`` (the inverse of ``_fold``, flattened over chunks)."""
    n, hkv, gc = x.shape[:3]
    return x.reshape(n, hkv, gc // C, C, *x.shape[3:]).movedim(3, 1).reshape(n * C, hkv * (gc // C), *x.shape[3:])


class _Flat:
    """Queries ``(B·T, H·D)`` and keys/values ``(B·T, Hkv·D)``, 2-D so that a gather or a scatter moves whole rows
    (``index_select`` on 3-D rows is several times slower); views, not copies, when the inputs are transposed
    ``(B, T, H, D)`` tensors as a Llama layer passes them."""

    def __init__(self, plan: SinkPlan, q, k, v):
        B, H, T, D = q.shape
        self.H, self.hkv, self.D, self.C = H, k.shape[1], D, plan.chunk
        self.q, self.k, self.v = (x.transpose(1, 2).reshape(B * T, -1) for x in (q, k, v))
        self.real = plan.real_queries  # (B·P,) padded query → its row in (B·T) (a padded one: the row's last)

    def chunk_queries(self, x: torch.Tensor, qi: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(N, H·F)`` at rows ``qi`` (n·C,) of n chunks → ``(n, Hkv, g·C, F)``; entries ``zero`` of ``qi``
        (padded queries, whose output gradient is 0) zeroed."""
        rows = x.index_select(0, qi)
        if zero is not None and zero.numel():
            rows.index_fill_(0, zero, 0)
        return _fold(rows.view(-1, self.C, self.H, x.shape[1] // self.H), self.hkv)

    def keys(self, idx: torch.Tensor, n: int):
        """Keys and values at flat positions ``idx`` (n·w,) → ``(n, Hkv, w, D)`` each."""
        return (x.index_select(0, idx).view(n, -1, self.hkv, self.D).transpose(1, 2) for x in (self.k, self.v))

    def block(self, x: torch.Tensor, q0: int, q1: int) -> torch.Tensor:
        """``x`` ``(N, H·F)`` rows ``[q0, q1)`` → ``(1, Hkv, g·m, F)``."""
        return _fold(x[q0:q1].view(1, q1 - q0, self.H, -1), self.hkv)


def _queries(ids: torch.Tensor, C: int) -> torch.Tensor:
    """Padded flat query positions (n·C,) of the chunks ``ids``."""
    return (ids[:, None] * C + torch.arange(C, device=ids.device)).flatten()


def _shared_rows(plan: SinkPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded and real positions of every query of the shared blocks, in block order."""
    padded = torch.cat([torch.arange(q0, q1) for q0, q1, *_ in plan.shared])
    return padded, plan.real_queries[padded]


class PlannedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: SinkPlan, scale: float):
        # q (B, H, T, D); k, v (B, Hkv, T, D) → (B, H, T, D)
        B, H, T, D = q.shape
        C, g = plan.chunk, H // k.shape[1]
        x = _Flat(plan, q, k, v)
        out = torch.empty(B * plan.P, H * D, dtype=q.dtype, device=q.device)  # (B·P, H·D), queries padded per row
        lse = torch.empty(B * plan.P, H, dtype=torch.float32, device=q.device)  # (B·P, H)
        for j, (ids, keys, _) in enumerate(plan.buckets):
            qi = _queries(ids, C)
            kb, vb = x.keys(keys, ids.numel())  # (n, Hkv, w, D)
            o, l = _attn(x.chunk_queries(x.q, x.real[qi]), kb, vb, attn_mask=plan.additive_mask(j, q.dtype, g), scale=scale)
            out.index_copy_(0, qi, _unfold(o, C).reshape(-1, H * D))
            lse.index_copy_(0, qi, _unfold(l, C).float())
        if plan.shared:
            ks, vs = x.keys(torch.cat([s for _, _, s, _ in plan.shared]), 1)  # (1, Hkv, sum n, D)
            os, ls, at = [], [], 0
            for q0, q1, s, r0 in plan.shared:
                o, l = _attn(x.block(x.q, r0, r0 + q1 - q0), ks[:, :, at:at + s.numel()], vs[:, :, at:at + s.numel()], scale=scale)
                at += s.numel()
                os.append(_unfold(o, q1 - q0))  # (m, H, D)
                ls.append(_unfold(l, q1 - q0).float())  # (m, H)
            rows, _ = _shared_rows(plan)
            o, l, l_b = torch.cat(os), torch.cat(ls), lse.index_select(0, rows)
            l_all = torch.logaddexp(l, l_b)  # (m, H)
            o_all = torch.exp(l - l_all)[..., None] * o + torch.exp(l_b - l_all)[..., None] * out.index_select(0, rows).view(-1, H, D)
            out.index_copy_(0, rows, o_all.to(q.dtype).view(-1, H * D))
            lse.index_copy_(0, rows, l_all)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out.view(B, plan.P, H, D)[:, :T].transpose(1, 2)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        B, H, T, D = q.shape
        C, g = plan.chunk, H // k.shape[1]
        x = _Flat(plan, q, k, v)
        do = dout.transpose(1, 2).reshape(B * T, H * D)
        dq = torch.empty(B * plan.P, H * D, dtype=q.dtype, device=q.device)  # every padded query in one chunk
        dk, dv = torch.zeros_like(x.k), torch.zeros_like(x.v)  # (B·T, Hkv·D)
        for j, (ids, keys, _) in enumerate(plan.buckets):
            qi = _queries(ids, C)
            ri = x.real[qi]
            kb, vb = x.keys(keys, ids.numel())
            gq, gk, gv = _attn_backward(x.chunk_queries(do, ri, (qi % plan.P >= T).nonzero().squeeze(1)), x.chunk_queries(x.q, ri), kb, vb,
                                        x.chunk_queries(out, qi), x.chunk_queries(lse, qi)[..., 0].contiguous(), 0.0, False,
                                        attn_mask=plan.additive_mask(j, q.dtype, g), scale=scale)
            dq.index_copy_(0, qi, _unfold(gq, C).reshape(-1, H * D))
            dk.index_add_(0, keys, gk.transpose(1, 2).reshape(-1, dk.shape[1]))
            dv.index_add_(0, keys, gv.transpose(1, 2).reshape(-1, dv.shape[1]))
        if plan.shared:
            keys = torch.cat([s for _, _, s, _ in plan.shared])
            ks, vs = x.keys(keys, 1)  # (1, Hkv, sum n, D)
            gks, gvs = torch.empty_like(ks), torch.empty_like(vs)
            gqs, at = [], 0
            for q0, q1, s, r0 in plan.shared:
                n, r1 = s.numel(), r0 + q1 - q0
                gq, gks[:, :, at:at + n], gvs[:, :, at:at + n] = _attn_backward(
                    x.block(do, r0, r1), x.block(x.q, r0, r1), ks[:, :, at:at + n], vs[:, :, at:at + n],
                    x.block(out, q0, q1), x.block(lse, q0, q1)[..., 0].contiguous(), 0.0, False, scale=scale)
                gqs.append(_unfold(gq, q1 - q0).reshape(-1, H * D))
                at += n
            dq.index_add_(0, _shared_rows(plan)[0], torch.cat(gqs))
            dk.index_add_(0, keys, gks[0].transpose(0, 1).reshape(-1, dk.shape[1]))
            dv.index_add_(0, keys, gvs[0].transpose(0, 1).reshape(-1, dv.shape[1]))
        dq = dq.view(B, plan.P, H, D)[:, :T].transpose(1, 2)
        dk = dk.view(B, T, -1, D).transpose(1, 2)
        dv = dv.view(B, T, -1, D).transpose(1, 2)
        return dq, dk, dv, None, None


def planned_attention(plan: SinkPlan, query, key, value, scale: float):
    """``(B, H, T, D)`` attention of ``query`` over ``key``/``value`` ``(B, Hkv, T, D)`` under ``plan``."""
    return PlannedAttention.apply(query, key, value, plan, scale)
