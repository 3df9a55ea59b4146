"""Streaming KV caches for chat: what a conversation keeps between tokens (method.md §3).

The cache lives inside the 'convsink' attention callable (``StreamAttention``, registered through transformers'
public ``AttentionInterface`` by ``pipeline.attention``): every layer's new keys/values are attended together with
what the cache holds, then appended. A policy decides what to drop, and when.

- ``dense``: keep everything (causal attention over the whole conversation).
- ``streamingllm``: the first ``sink_tokens`` tokens + the last ``window`` tokens, enforced after every forward (a
  chunk fed in one forward, e.g. a teacher-forced utterance, sees the held tokens plus itself). Keys are cached
  BEFORE the rotary embedding and rotated at their index inside the cache at every forward (StreamingLLM), so
  positions stay bounded and a key is never re-rotated from an already-rotated (rounded) value.
- ``streamingdialogue``: BOS + the EoU of every finished utterance + the previous and the current utterance; the
  tokens of utterance t-2 go when utterance t starts. After T finished utterances (before the next starts) it holds
  ``1 + T + (non-EoU tokens of the last two utterances)`` positions.
  ``positions='absolute'`` (default): cached keys keep their original rotary positions and new tokens continue the
  dialogue's absolute numbering, which reproduces the training-time dialogue mask exactly.
  ``positions='cache'``: StreamingLLM-style re-indexing inside the cache (pre-RoPE keys, bounded positions).
- ``recompute``: at every utterance start the cache is dropped and the last ``window`` tokens of the conversation
  are re-encoded from scratch (dense attention, positions 0..w-1), then the utterance continues on top of them: the
  "dense attention with recomputation" baseline of the paper's 4x / 18x claim.

Shapes: cached keys/values per layer ``(1, Hkv, S, D)``; metadata per cached position ``(S,)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

POLICIES = ("dense", "streamingllm", "streamingdialogue", "recompute")


# --------------------------------------------------------------------------------------------------------------
# Rotary helpers (Llama convention, the same as the model's own ``apply_rotary_pos_emb``)
# --------------------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------------------
# The KV store
# --------------------------------------------------------------------------------------------------------------

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
        self.utt = _empty()  # utterance index (BOS 0)
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


# --------------------------------------------------------------------------------------------------------------
# Attention callables ('convsink' attention: pipeline.attention calls ``layer_call`` with the layer module)
# --------------------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------------------
# Policies: what to drop and when
# --------------------------------------------------------------------------------------------------------------

class DensePolicy:
    """Keep everything."""

    name = "dense"

    def before_utterance(self, conv: "Conversation", utt: int) -> None:
        pass

    def after_forward(self, conv: "Conversation") -> None:
        pass


class StreamingDialoguePolicy(DensePolicy):
    """When utterance ``utt`` starts: keep BOS (utt 0), every EoU, and the tokens of utterance ``utt - 1``."""

    name = "streamingdialogue"

    def before_utterance(self, conv, utt: int) -> None:
        st = conv.store
        if len(st):
            st.keep((st.utt == 0) | st.eou | (st.utt >= utt - 1))


class StreamingLLMPolicy(DensePolicy):
    """After every forward: keep the first ``sink_tokens`` and the last ``window`` cached tokens."""

    name = "streamingllm"

    def __init__(self, sink_tokens: int = 4, window: int = 256):
        self.sink_tokens, self.window = sink_tokens, window

    def after_forward(self, conv) -> None:
        n = len(conv.store)
        if n > self.sink_tokens + self.window:
            idx = torch.arange(n)
            conv.store.keep((idx < self.sink_tokens) | (idx >= n - self.window))


class RecomputePolicy(DensePolicy):
    """When an utterance starts: drop the cache and re-encode the last ``window`` tokens of the conversation."""

    name = "recompute"

    def __init__(self, window: int = 256):
        self.window = window

    def before_utterance(self, conv, utt: int) -> None:
        conv.store.clear()
        history = conv.history[-self.window:]
        if history:
            tokens, utts, eous, positions = zip(*history)
            conv.forward(list(tokens), list(eous), utts=list(utts), positions=list(positions), record=False,
                         logits_to_keep=1)  # the re-encoding needs no logits


def make_policy(name: str, sink_tokens: int = 4, window: int = 256):
    if name == "dense":
        return DensePolicy()
    if name == "streamingdialogue":
        return StreamingDialoguePolicy()
    if name == "streamingllm":
        return StreamingLLMPolicy(sink_tokens, window)
    if name == "recompute":
        return RecomputePolicy(window)
    raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")


@dataclass(frozen=True)
class CacheSettings:
    """What a conversation's cache does: the ``cache`` section of convsink.json, or ``chat:`` of a recipe."""

    policy: str = "streamingdialogue"
    positions: str = "absolute"
    sink_tokens: int = 4
    window: int = 256

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown cache policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.positions not in ("absolute", "cache"):
            raise ValueError(f"unknown cache positions {self.positions!r}; choose absolute or cache")

    @classmethod
    def resolve(cls, chat_cfg=None, info: dict | None = None, policy: str | None = None) -> "CacheSettings":
        """Precedence: ``policy`` argument > fields set explicitly in ``chat_cfg`` (recipe / overrides) > the model's
        convsink.json ``cache`` section > ``chat_cfg`` defaults."""
        exported = dict((info or {}).get("cache") or {})
        values = {}
        for name, cfg_name in (("policy", "cache"), ("positions", "positions"), ("sink_tokens", "sink_tokens"),
                               ("window", "window")):
            explicit = chat_cfg is not None and cfg_name in chat_cfg.model_fields_set
            if explicit or name not in exported:
                values[name] = getattr(chat_cfg, cfg_name) if chat_cfg is not None else getattr(cls(), name)
            else:
                values[name] = exported[name]
        if policy is not None:
            values["policy"] = policy
        return cls(**values)


# --------------------------------------------------------------------------------------------------------------
# One conversation
# --------------------------------------------------------------------------------------------------------------

class Conversation:
    """One conversation decoded turn by turn: ``[BOS] u1 EoU u2 EoU ...`` with a policy-pruned KV cache.

    Rotary positions: 'absolute' (new tokens continue the dialogue's numbering, cached keys keep theirs) or the
    cache frame (a token is rotated at its index in the cache). streamingllm and recompute always use the cache
    frame; dense is the same in both; streamingdialogue uses ``positions``."""

    def __init__(self, model, bos_id: int, eou_id: int, policy="streamingdialogue", positions: str = "absolute",
                 sink_tokens: int = 4, window: int = 256):
        if positions not in ("absolute", "cache"):
            raise ValueError(f"unknown cache positions {positions!r}; choose absolute or cache")
        self.model, self.bos_id, self.eou_id = model, bos_id, eou_id
        self.policy = make_policy(policy, sink_tokens, window) if isinstance(policy, str) else policy
        name = self.policy.name
        cache_frame = name in ("streamingllm", "recompute") or (name == "streamingdialogue" and positions == "cache")
        self.positions = "cache" if cache_frame else "absolute"
        # recompute never evicts inside an utterance, so its keys can stay as the model rotated them
        raw = cache_frame and name != "recompute"
        self.store = KVStore(model.config.num_hidden_layers, raw=raw, rope=Rope(_rotary_of(model)) if raw else None)
        self.attn = StreamAttention(self.store)
        self.history: list[tuple[int, int, bool, int]] = []  # (token, utt, eou, absolute position)
        self.next_position = 0
        self.utt = 0  # index of the current utterance (BOS is 0)
        self.in_utterance = False
        self.last_logits: torch.Tensor | None = None
        self.bos_logits = self._feed([bos_id], eou=[False])[0]

    @classmethod
    def from_settings(cls, model, info: dict, settings: CacheSettings) -> "Conversation":
        return cls(model, info["bos_token_id"], info["eou_token_id"], settings.policy, positions=settings.positions,
                   sink_tokens=settings.sink_tokens, window=settings.window)

    def fork(self) -> "Conversation":
        """An independent copy sharing the model (the cache tensors are shared until either side changes them)."""
        new = copy.copy(self)
        new.store = self.store.copy()
        new.attn = StreamAttention(new.store)
        new.history = list(self.history)
        return new

    def _rope_positions(self, n: int) -> torch.Tensor:
        if self.positions == "cache":
            return torch.arange(len(self.store), len(self.store) + n)
        return torch.arange(self.next_position, self.next_position + n)

    @torch.no_grad()
    def forward(self, token_ids: list[int], eou: list[bool], utts: list[int], positions: list[int], record: bool = True,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Run tokens through the model against the cache, then cache them; returns logits ``(n, V)`` (the last
        ``logits_to_keep`` rows only when it is > 0)."""
        n = len(token_ids)
        device = self.model.device
        absolute = torch.tensor(positions)
        rope = torch.arange(len(self.store), len(self.store) + n) if self.positions == "cache" else absolute
        self.attn.begin(rope, device)
        out = self.model(input_ids=torch.tensor([token_ids], device=device), position_ids=rope[None].to(device),
                         convsink_attn=self.attn, use_cache=False, logits_to_keep=logits_to_keep)
        self.store.commit(absolute, torch.tensor(utts), torch.tensor(eou), rope_pos=rope)
        if record:
            self.history += list(zip(token_ids, utts, eou, positions))
        self.policy.after_forward(self)
        return out.logits[0]

    def _feed(self, token_ids: list[int], eou: list[bool], logits_to_keep: int = 0) -> torch.Tensor:
        """New tokens of the current utterance, at the next absolute positions."""
        n = len(token_ids)
        positions = list(range(self.next_position, self.next_position + n))
        self.next_position += n
        return self.forward(token_ids, eou, [self.utt] * n, positions, logits_to_keep=logits_to_keep)

    def start_utterance(self) -> None:
        self.utt += 1
        self.policy.before_utterance(self, self.utt)
        self.in_utterance = True

    def add_utterance(self, token_ids: list[int], all_logits: bool = True) -> torch.Tensor:
        """Teacher-force a whole utterance and its EoU in one forward; returns the logits at each of its positions
        ``(n + 1, V)`` (only the EoU's ``(1, V)`` with ``all_logits=False``): the last row predicts the next
        utterance's first token."""
        if self.in_utterance:
            raise RuntimeError("add_utterance inside an unfinished utterance: end it with the EoU token first")
        self.start_utterance()
        logits = self._feed(list(token_ids) + [self.eou_id], eou=[False] * len(token_ids) + [True],
                            logits_to_keep=0 if all_logits else 1)
        self.in_utterance = False
        self.last_logits = logits[-1]
        return logits

    def record_utterance(self, token_ids: list[int]) -> None:
        """Append an utterance to the history without running the model: exact for ``recompute``, whose state at
        the next utterance is rebuilt from the history alone (used to fast-forward benchmarks)."""
        if self.policy.name != "recompute":
            raise ValueError("record_utterance is only exact for the recompute policy")
        self.utt += 1
        n = len(token_ids) + 1
        self.history += list(zip(list(token_ids) + [self.eou_id], [self.utt] * n, [False] * (n - 1) + [True],
                                 range(self.next_position, self.next_position + n)))
        self.next_position += n
        self.last_logits = None

    def feed_token(self, token_id: int) -> torch.Tensor:
        """Feed one token of the current utterance (an EoU ends it); returns its logits ``(V,)``."""
        if not self.in_utterance:
            self.start_utterance()
        is_eou = token_id == self.eou_id
        logits = self._feed([token_id], eou=[is_eou])[0]
        if is_eou:
            self.in_utterance = False
            self.last_logits = logits
        return logits

    def generate(self, last_logits: torch.Tensor | None = None, max_new_tokens: int = 48, temperature: float = 0.0,
                 top_k: int = 0, generator: torch.Generator | None = None, on_token=None,
                 min_new_tokens: int = 0) -> list[int]:
        """Generate the next utterance from the logits that end the previous one (default: ``last_logits``);
        stops at EoU or after ``max_new_tokens`` and always closes the utterance with EoU (fed to the cache).
        ``on_token(ids_so_far)`` is called after every token; EoU is not sampled before ``min_new_tokens``."""
        logits = self.last_logits if last_logits is None else last_logits
        if logits is None:
            raise ValueError("no logits to continue from: add an utterance first")
        out: list[int] = []
        for _ in range(max_new_tokens):
            if len(out) < min_new_tokens:
                logits = logits.clone()
                logits[self.eou_id] = float("-inf")
            token = sample(logits, temperature, top_k, generator)
            if token == self.eou_id:
                break
            out.append(token)
            if on_token is not None:
                on_token(out)
            logits = self.feed_token(token)
        self.feed_token(self.eou_id)
        return out

    def cache_info(self) -> dict:
        return {"policy": self.policy.name, "positions": len(self.store), "kv_bytes": self.store.nbytes(),
                "utterances": self.utt, "conversation_tokens": self.next_position}


# --------------------------------------------------------------------------------------------------------------
# Several conversations in one batch
# --------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def decode_step(convs: list[Conversation], tokens: list[int]) -> torch.Tensor:
    """Feed one token to each conversation in one batched forward; returns logits ``(B, V)``. Each conversation
    keeps its own policy, positions and cache (utterance starts, pruning and re-encoding happen per row)."""
    model = convs[0].model
    rope, absolute = [], []
    for conv in convs:
        if not conv.in_utterance:
            conv.start_utterance()
        rope.append(int(conv._rope_positions(1)[0]))
        absolute.append(conv.next_position)
    device = model.device
    attn = BatchStreamAttention([c.store for c in convs])
    attn.begin(rope, device)
    out = model(input_ids=torch.tensor(tokens, device=device)[:, None], position_ids=torch.tensor(rope, device=device)[:, None],
                convsink_attn=attn, use_cache=False)
    logits = out.logits[:, -1]
    for b, (conv, token) in enumerate(zip(convs, tokens)):
        is_eou = token == conv.eou_id
        conv.store.commit(torch.tensor([absolute[b]]), torch.tensor([conv.utt]), torch.tensor([is_eou]),
                          rope_pos=torch.tensor([rope[b]]))
        conv.history.append((token, conv.utt, is_eou, absolute[b]))
        conv.next_position += 1
        conv.policy.after_forward(conv)
        if is_eou:
            conv.in_utterance = False
            conv.last_logits = logits[b]
    return logits


def generate_batch(convs: list[Conversation], last_logits: list[torch.Tensor] | None = None, max_new_tokens: int = 48,
                   temperature: float = 0.0, top_k: int = 0, generator=None) -> list[list[int]]:
    """Generate the next utterance of every conversation, decoding them together; each reply ends at its own EoU
    (or after ``max_new_tokens``, then EoU is appended). Equals ``generate`` on each conversation alone."""
    logits = [c.last_logits for c in convs] if last_logits is None else list(last_logits)
    replies: list[list[int]] = [[] for _ in convs]
    active = list(range(len(convs)))
    for _ in range(max_new_tokens):
        tokens = {b: sample(logits[b], temperature, top_k, generator) for b in active}
        finished = [b for b in active if tokens[b] == convs[b].eou_id]
        active = [b for b in active if b not in finished]
        if finished:  # close those utterances with their EoU
            decode_step([convs[b] for b in finished], [convs[b].eou_id for b in finished])
        if not active:
            return replies
        for b in active:
            replies[b].append(tokens[b])
        for b, lg in zip(active, decode_step([convs[b] for b in active], [tokens[b] for b in active])):
            logits[b] = lg
    if active:
        decode_step([convs[b] for b in active], [convs[b].eou_id for b in active])
    return replies


def _rotary_of(model):
    """The model's rotary embedding module (Llama family: ``model.model.rotary_emb``)."""
    for name, module in model.named_modules():
        if name.endswith("rotary_emb"):
            return module
    return None


def sample(logits: torch.Tensor, temperature: float, top_k: int = 0, generator: torch.Generator | None = None) -> int:
    """Greedy at ``temperature <= 0``; otherwise sample (optionally from the ``top_k`` most likely) with ``generator``."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float().cpu() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
