"""K/V storage of a streaming conversation: per-layer cached keys/values with per-position metadata, and the
attention callables that attend new queries to them.

The cache lives inside the 'convsink' attention callable (``StreamAttention``, registered through transformers'
public ``AttentionInterface`` by ``pipeline.attention.registry``): every layer's new keys/values are attended
together with what the store holds, then appended. Keys are kept as the model rotated them, or (``raw``) before
the rotary embedding, to be rotated at their index in the cache whenever they are attended.

Shapes: cached keys/values per layer ``(1, Hkv, S, D)``; metadata per cached position ``(S,)``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rope:
    """Rotations by the model's rotary embedding module, computed in float32.

    The module returns ``attention_scaling * (cos, sin)``; ``rotate`` applies exactly what the model applies to a
    key at a position, ``unrotate`` inverts it (R(-p) / scaling), giving the pre-RoPE key."""

    def __init__(self, rotary):
        if rotary is None:
            raise ValueError("the model has no rotary embedding module (rotary_emb): cache positions need RoPE")
        self.rotary = rotary
        self.scaling = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)

    def cos_sin(self, positions: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``(S,)`` → cos, sin ``(1, 1, S, D)`` float32."""
        like = torch.zeros(1, dtype=torch.float32, device=device)
        cos, sin = self.rotary(like, positions.view(1, -1).to(device))
        return cos.float()[:, None], sin.float()[:, None]

    @staticmethod
    def rotate(x: torch.Tensor, cs) -> torch.Tensor:
        cos, sin = cs
        xf = x.float()
        return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)

    def unrotate(self, x: torch.Tensor, cs) -> torch.Tensor:
        cos, sin = cs
        xf = x.float()
        return ((xf * cos - _rotate_half(xf) * sin) / self.scaling ** 2).to(x.dtype)


def _empty(dtype=torch.long) -> torch.Tensor:
    return torch.zeros(0, dtype=dtype)


class KVStore:
    """Per-layer cached keys/values ``(1, Hkv, S, D)`` plus per-position metadata ``(S,)``.

    ``raw=False``: keys are stored as the model rotated them, at ``rope_pos``. ``raw=True``: keys are stored
    before the rotary embedding and rotated at ``0..S-1`` (their index in the cache) whenever they are attended.
    Every operation builds new tensors (``cat`` / ``index_select``), never writes in place, so ``copy()`` is
    cheap and the copies are independent."""

    def __init__(self, num_layers: int, raw: bool = False, rope: Rope | None = None):
        self.num_layers, self.raw, self.rope = num_layers, raw, rope
        if raw and rope is None:
            raise ValueError("a raw (pre-RoPE) KV store needs the model's rotary embedding")
        self.keys: list = [None] * num_layers
        self.values: list = [None] * num_layers
        self.positions = _empty()  # original (absolute) position of each cached token in the conversation
        self.rope_pos = _empty()  # position its key is rotated at when attended
        self.utt = _empty()  # utterance index (BOS and a pinned system prompt: 0)
        self.eou = _empty(torch.bool)
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return int(self.positions.numel())

    def nbytes(self) -> int:
        """Bytes of the cached keys and values (all layers)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def copy(self) -> "KVStore":
        new = copy.copy(self)
        new.keys, new.values, new._pending = list(self.keys), list(self.values), {}
        return new

    # -- inside a forward --------------------------------------------------------------------------------------
    def stage(self, layer: int, key: torch.Tensor, value: torch.Tensor, new_cs=None) -> None:
        """Hold one layer's new (post-RoPE) keys/values ``(1, Hkv, n, D)`` until ``commit``; raw stores un-rotate
        them first with ``new_cs`` (cos/sin at the positions the model rotated them at)."""
        key = key.detach()
        if self.raw:
            key = self.rope.unrotate(key, new_cs)
        self._pending[layer] = (key, value.detach())

    def attend(self, layer: int, cached_cs=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Cached keys/values of ``layer`` ready for attention ``(1, Hkv, S, D)`` (raw keys rotated by ``cached_cs``)."""
        k, v = self.keys[layer], self.values[layer]
        if k is not None and self.raw:
            k = self.rope.rotate(k, cached_cs)
        return k, v

    def commit(self, positions: torch.Tensor, utt: torch.Tensor, eou: torch.Tensor, rope_pos: torch.Tensor | None = None) -> None:
        """Append what every layer staged in the last forward, with its metadata ``(n,)``."""
        if len(self._pending) != self.num_layers:
            raise RuntimeError(f"{len(self._pending)} of {self.num_layers} layers staged keys in this forward")
        for i, (k, v) in self._pending.items():
            self.keys[i] = k if self.keys[i] is None else torch.cat([self.keys[i], k], dim=2)
            self.values[i] = v if self.values[i] is None else torch.cat([self.values[i], v], dim=2)
        self._pending = {}
        self.positions = torch.cat([self.positions, positions.cpu()])
        self.rope_pos = torch.cat([self.rope_pos, (positions if rope_pos is None else rope_pos).cpu()])
        self.utt = torch.cat([self.utt, utt.cpu()])
        self.eou = torch.cat([self.eou, eou.cpu()])

    # -- pruning -----------------------------------------------------------------------------------------------
    def keep(self, index: torch.Tensor) -> None:
        """Keep only the cached positions selected by the boolean ``index`` ``(S,)`` (order preserved)."""
        idx = index.nonzero().squeeze(1)
        if idx.numel() == len(self):
            return
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                dev = idx.to(self.keys[i].device)
                self.keys[i] = self.keys[i].index_select(2, dev)
                self.values[i] = self.values[i].index_select(2, dev)
        self.positions, self.utt, self.eou = self.positions[idx], self.utt[idx], self.eou[idx]
        self.rope_pos = torch.arange(len(idx)) if self.raw else self.rope_pos[idx]

    def clear(self) -> None:
        self.keep(torch.zeros(len(self), dtype=torch.bool))

    def reposition(self, rotary, target: torch.Tensor) -> None:
        """Re-rotate post-RoPE keys (``raw=False``) from ``rope_pos`` to ``target`` (RoPE rotations compose).
        The policies do not use this (cache-frame policies keep pre-RoPE keys instead, so rounding never
        accumulates); it is kept for callers that switch a post-RoPE store to other positions."""
        if self.raw:
            raise ValueError("raw (pre-RoPE) stores are rotated when attended; nothing to re-rotate")
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        delta = (target - self.rope_pos).view(1, -1)
        if len(self) and not bool((delta == 0).all()):
            for i in range(self.num_layers):
                k = self.keys[i]
                cos, sin = rotary(k, delta.to(k.device))
                self.keys[i] = apply_rotary_pos_emb(k, k, cos, sin)[1]
        self.rope_pos = target.clone()


class StreamAttention:
    """One conversation: its ``n`` new queries see every cached key plus the new keys causally."""

    def __init__(self, store: KVStore):
        self.store = store
        self.new_cs = self.cached_cs = None

    def begin(self, new_rope: torch.Tensor, device) -> None:
        """Called once per forward (before the layers) with the rotary positions ``(n,)`` of the new tokens."""
        if self.store.raw:
            rope = self.store.rope
            self.new_cs = rope.cos_sin(new_rope, device)
            self.cached_cs = rope.cos_sin(torch.arange(len(self.store)), device) if len(self.store) else None

    def layer_call(self, module, query, key, value, scaling):
        # query (1, H, n, D); key/value (1, Hkv, n, D), already rotated by the model at the new positions
        i = module.layer_idx
        self.store.stage(i, key, value, self.new_cs)
        ck, cv = self.store.attend(i, self.cached_cs)
        if ck is not None:
            key, value = torch.cat([ck, key], dim=2), torch.cat([cv, value], dim=2)  # (1, Hkv, S + n, D)
        tq, tk = query.shape[2], key.shape[2]
        mask = None
        if tq > 1:  # every cached key + causal inside the new chunk
            mask = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril(diagonal=tk - tq)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                              enable_gqa=key.shape[1] != query.shape[1])


class BatchStreamAttention:
    """One decoding step for several conversations: row b's single new key is attended together with its own
    cache; the caches are padded to the longest and the padding masked out."""

    def __init__(self, stores: list[KVStore]):
        self.stores = stores
        self.new_cs: list = [None] * len(stores)
        self.cached_cs: list = [None] * len(stores)

    def begin(self, new_rope: list[int], device) -> None:
        for b, st in enumerate(self.stores):
            if st.raw:
                self.new_cs[b] = st.rope.cos_sin(torch.tensor([new_rope[b]]), device)
                self.cached_cs[b] = st.rope.cos_sin(torch.arange(len(st)), device) if len(st) else None

    def layer_call(self, module, query, key, value, scaling):
        # query (B, H, 1, D); key/value (B, Hkv, 1, D)
        i = module.layer_idx
        lengths = [len(st) for st in self.stores]
        smax = max(lengths)
        B, hkv, _, D = key.shape
        keys = key.new_zeros(B, hkv, smax + 1, D)  # (B, Hkv, Smax + 1, D): cache, padding, then the new key
        values = value.new_zeros(B, hkv, smax + 1, D)
        mask = torch.zeros(B, 1, 1, smax + 1, dtype=torch.bool, device=query.device)
        for b, st in enumerate(self.stores):
            st.stage(i, key[b:b + 1], value[b:b + 1], self.new_cs[b])
            ck, cv = st.attend(i, self.cached_cs[b])
            n = lengths[b]
            if n:
                keys[b, :, :n], values[b, :, :n] = ck[0], cv[0]
            mask[b, 0, 0, :n] = True
        keys[:, :, smax], values[:, :, smax] = key[:, :, 0], value[:, :, 0]
        mask[:, 0, 0, smax] = True
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling,
                                              enable_gqa=hkv != query.shape[1])
