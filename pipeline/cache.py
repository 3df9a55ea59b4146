"""Streaming KV caches for chat: what a conversation keeps between tokens (method.md §3).

The cache lives inside the 'convsink' attention callable (``StreamAttention``): each layer's new keys/values are
attended together with what the cache holds, then appended. A policy decides what to drop when an utterance
starts. Keys are cached after the rotary embedding, at their absolute positions.

- ``dense``: keep everything (causal attention over the whole conversation).
- ``streamingllm``: the first ``s`` tokens + the last ``w`` tokens; keys are re-rotated to positions inside the
  cache (StreamingLLM), so positions stay bounded.
- ``streamingdialogue``: BOS + the EoU of every finished utterance + the previous and the current utterance.
  With ``positions='absolute'`` this reproduces the training-time dialogue mask exactly; after T finished
  utterances (before the next starts) it holds 1 + T + (non-EoU tokens of the last two utterances) positions.
  ``positions='cache'`` re-indexes inside the cache like StreamingLLM, for conversations longer than the context.
- ``recompute``: dense attention over the last ``w`` tokens, re-encoded from scratch at every utterance (the
  baseline of the paper's 4x / 18x claim).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class KVStore:
    """Per-layer cached keys/values ``(B, Hkv, S, D)`` plus per-position metadata ``(S,)``."""

    num_layers: int
    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    positions: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # original positions
    rope_pos: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # positions keys are rotated at
    utt: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    eou: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))

    def __post_init__(self):
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return int(self.positions.numel())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def commit(self, positions: torch.Tensor, utt: torch.Tensor, eou: torch.Tensor, rope_pos: torch.Tensor | None = None) -> None:
        """Append the keys/values every layer computed in the last forward, with their metadata."""
        for i, (k, v) in self._pending.items():
            self.keys[i] = k if self.keys[i] is None else torch.cat([self.keys[i], k], dim=2)
            self.values[i] = v if self.values[i] is None else torch.cat([self.values[i], v], dim=2)
        self._pending.clear()
        self.positions = torch.cat([self.positions, positions])
        self.rope_pos = torch.cat([self.rope_pos, positions if rope_pos is None else rope_pos])
        self.utt = torch.cat([self.utt, utt])
        self.eou = torch.cat([self.eou, eou])

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the cached positions selected by the boolean ``index`` ``(S,)``."""
        idx = index.nonzero().squeeze(1)
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i].index_select(2, idx)
                self.values[i] = self.values[i].index_select(2, idx)
        self.positions, self.utt, self.eou = self.positions[idx], self.utt[idx], self.eou[idx]
        self.rope_pos = self.rope_pos[idx]

    def clear(self) -> None:
        self.keep(torch.zeros(len(self), dtype=torch.bool))

    def reposition(self, rotary, target: torch.Tensor) -> None:
        """Re-rotate every cached key from ``rope_pos`` to ``target`` positions (RoPE rotations compose)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        delta = (target - self.rope_pos).view(1, -1)
        if len(self) == 0 or bool((delta == 0).all()):
            self.rope_pos = target.clone()
            return
        for i in range(self.num_layers):
            k = self.keys[i]
            cos, sin = rotary(k, delta.to(k.device))
            self.keys[i] = apply_rotary_pos_emb(k, k, cos, sin)[1]
        self.rope_pos = target.clone()


class StreamAttention:
    """'convsink' attention callable for decoding: new queries see every cached key plus the new keys causally."""

    def __init__(self, store: KVStore):
        self.store = store

    def layer_call(self, module, query, key, value, scaling):
        i = module.layer_idx
        self.store._pending[i] = (key.detach(), value.detach())
        cached_k, cached_v = self.store.keys[i], self.store.values[i]
        if cached_k is not None:
            key = torch.cat([cached_k, key], dim=2)  # (B, Hkv, S + Tq, D)
            value = torch.cat([cached_v, value], dim=2)
        tq, tk = query.shape[2], key.shape[2]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=query.device)
        mask[:, tk - tq:] = torch.ones(tq, tq, dtype=torch.bool, device=query.device).tril()
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                              enable_gqa=key.shape[1] != query.shape[1])


class DensePolicy:
    """Keep everything."""

    name = "dense"

    def before_utterance(self, conv, utt: int) -> None:
        pass

    def after_forward(self, conv) -> None:
        pass


class StreamingDialoguePolicy(DensePolicy):
    """Keep BOS (utt 0), every EoU, and the utterances ``utt - 1`` and ``utt`` when utterance ``utt`` starts."""

    name = "streamingdialogue"

    def before_utterance(self, conv, utt: int) -> None:
        store = conv.store
        if len(store):
            store.keep((store.utt == 0) | store.eou | (store.utt >= utt - 1))


class StreamingLLMPolicy(DensePolicy):
    """Keep the first ``sink_tokens`` tokens and the last ``window`` tokens (after every forward)."""

    name = "streamingllm"

    def __init__(self, sink_tokens: int = 4, window: int = 256):
        self.sink_tokens, self.window = sink_tokens, window

    def after_forward(self, conv) -> None:
        store = conv.store
        n = len(store)
        if n > self.sink_tokens + self.window:
            idx = torch.arange(n)
            store.keep((idx < self.sink_tokens) | (idx >= n - self.window))


class RecomputePolicy(DensePolicy):
    """At every utterance: drop the cache and re-encode the last ``window`` tokens of the conversation."""

    name = "recompute"

    def __init__(self, window: int = 256):
        self.window = window

    def before_utterance(self, conv, utt: int) -> None:
        conv.store.clear()
        history = conv.history[-self.window:]
        if history:
            tokens, utts, eous, positions = zip(*history)
            conv.forward(list(tokens), list(eous), utts=list(utts), positions=list(positions), record=False)


def make_policy(name: str, sink_tokens: int = 4, window: int = 256):
    if name == "dense":
        return DensePolicy()
    if name == "streamingdialogue":
        return StreamingDialoguePolicy()
    if name == "streamingllm":
        return StreamingLLMPolicy(sink_tokens, window)
    if name == "recompute":
        return RecomputePolicy(window)
    raise ValueError(f"unknown cache policy {name!r}; choose dense, streamingllm, streamingdialogue or recompute")


class Conversation:
    """One conversation decoded turn by turn: ``[BOS] u1 EoU u2 EoU ...`` with a policy-pruned KV cache.

    ``positions``: 'absolute' (new tokens continue the dialogue's numbering; cached keys keep theirs) or 'cache'
    (keys re-rotated to their index in the cache, new tokens numbered after them). StreamingLLM always uses
    'cache'; recompute re-encodes its window at positions 0..w-1."""

    def __init__(self, model, bos_id: int, eou_id: int, policy="streamingdialogue", positions: str = "absolute",
                 sink_tokens: int = 4, window: int = 256):
        self.model, self.bos_id, self.eou_id = model, bos_id, eou_id
        self.policy = make_policy(policy, sink_tokens, window) if isinstance(policy, str) else policy
        self.positions = "cache" if self.policy.name == "streamingllm" else positions
        self.store = KVStore(model.config.num_hidden_layers)
        self.attn = StreamAttention(self.store)
        self.rotary = _rotary_of(model)
        self.history: list[tuple[int, int, bool, int]] = []  # (token, utt, eou, absolute position)
        self.next_position = 0
        self.utt = 0  # index of the current utterance (BOS is 0)
        self.in_utterance = False
        self.bos_logits = self._feed([bos_id], eou=[False])[0]

    @torch.no_grad()
    def forward(self, token_ids: list[int], eou: list[bool], utts: list[int], positions: list[int], record: bool = True) -> torch.Tensor:
        """Run tokens through the model against the cache, then cache them; returns logits ``(n, V)``."""
        n = len(token_ids)
        device = self.model.device
        absolute = torch.tensor(positions)
        if self.positions == "cache" or self.policy.name == "recompute":
            self.store.reposition(self.rotary, torch.arange(len(self.store)))
            rope = torch.arange(len(self.store), len(self.store) + n)
        else:
            rope = absolute
        out = self.model(input_ids=torch.tensor([token_ids], device=device), position_ids=rope[None].to(device),
                         convsink_attn=self.attn, use_cache=False)
        self.store.commit(absolute, torch.tensor(utts), torch.tensor(eou), rope_pos=rope)
        if record:
            self.history += list(zip(token_ids, utts, eou, positions))
        self.policy.after_forward(self)
        return out.logits[0]

    def _feed(self, token_ids: list[int], eou: list[bool]) -> torch.Tensor:
        """New tokens of the current utterance, at the next absolute positions."""
        n = len(token_ids)
        positions = list(range(self.next_position, self.next_position + n))
        self.next_position += n
        return self.forward(token_ids, eou, [self.utt] * n, positions)

    def start_utterance(self) -> None:
        self.utt += 1
        self.policy.before_utterance(self, self.utt)
        self.in_utterance = True

    def add_utterance(self, token_ids: list[int]) -> torch.Tensor:
        """Teacher-force a whole utterance and its EoU; returns the logits at each of its positions ``(n+1, V)``."""
        self.start_utterance()
        logits = self._feed(list(token_ids) + [self.eou_id], eou=[False] * len(token_ids) + [True])
        self.in_utterance = False
        return logits

    def record_utterance(self, token_ids: list[int]) -> None:
        """Append an utterance to the history without running the model: exact for ``recompute``, whose state
        at the next utterance is rebuilt from the history alone (used to fast-forward benchmarks)."""
        if self.policy.name != "recompute":
            raise ValueError("record_utterance is only exact for the recompute policy")
        self.utt += 1
        n = len(token_ids) + 1
        self.history += list(zip(list(token_ids) + [self.eou_id], [self.utt] * n, [False] * (n - 1) + [True],
                                 range(self.next_position, self.next_position + n)))
        self.next_position += n

    def feed_token(self, token_id: int) -> torch.Tensor:
        """Feed one token of the current utterance (an EoU ends it); returns its logits ``(V,)``."""
        if not self.in_utterance:
            self.start_utterance()
        is_eou = token_id == self.eou_id
        logits = self._feed([token_id], eou=[is_eou])[0]
        if is_eou:
            self.in_utterance = False
        return logits

    def generate(self, last_logits: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 generator: torch.Generator | None = None, on_token=None) -> list[int]:
        """Generate the next utterance from the logits that end the previous one; always closes it with EoU."""
        out, logits = [], last_logits
        for _ in range(max_new_tokens):
            token = sample(logits, temperature, top_k, generator)
            if token == self.eou_id:
                break
            out.append(token)
            if on_token is not None:
                on_token(out)
            logits = self.feed_token(token)
        self.last_logits = self.feed_token(self.eou_id)
        return out

    def cache_info(self) -> dict:
        return {"positions": len(self.store), "kv_bytes": self.store.nbytes(), "utterances": self.utt}


class BatchStreamAttention:
    """Decoding step for several conversations at once: each row's new keys are attended together with its own
    cache, the caches padded to the longest and the padding masked out."""

    def __init__(self, stores: list[KVStore]):
        self.stores = stores

    def layer_call(self, module, query, key, value, scaling):
        # query (B, H, 1, D); key/value (B, Hkv, 1, D)
        i = module.layer_idx
        lengths = [len(st) for st in self.stores]
        smax = max(lengths)
        B, hkv, _, D = key.shape
        keys = key.new_zeros(B, hkv, smax + 1, D)
        values = value.new_zeros(B, hkv, smax + 1, D)
        mask = torch.zeros(B, 1, 1, smax + 1, dtype=torch.bool, device=query.device)
        for b, st in enumerate(self.stores):
            st._pending[i] = (key[b:b + 1].detach(), value[b:b + 1].detach())
            n = lengths[b]
            if n:
                keys[b, :, :n], values[b, :, :n] = st.keys[i][0], st.values[i][0]
            keys[b, :, smax], values[b, :, smax] = key[b, :, 0], value[b, :, 0]
            mask[b, 0, 0, :n] = True
            mask[b, 0, 0, smax] = True
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling,
                                              enable_gqa=hkv != query.shape[1])


@torch.no_grad()
def decode_step(convs: list["Conversation"], tokens: list[int]) -> torch.Tensor:
    """Feed one token to each conversation in one batched forward; returns logits ``(B, V)``. Each conversation
    keeps its own policy, positions and cache (utterance starts, pruning and re-encoding happen per row)."""
    model = convs[0].model
    rope, absolute = [], []
    for conv, token in zip(convs, tokens):
        if not conv.in_utterance:
            conv.start_utterance()
        if conv.positions == "cache" or conv.policy.name == "recompute":
            conv.store.reposition(conv.rotary, torch.arange(len(conv.store)))
            rope.append(len(conv.store))
        else:
            rope.append(conv.next_position)
        absolute.append(conv.next_position)
    device = model.device
    out = model(input_ids=torch.tensor(tokens, device=device)[:, None], position_ids=torch.tensor(rope, device=device)[:, None],
                convsink_attn=BatchStreamAttention([c.store for c in convs]), use_cache=False)
    for conv, token, r, a in zip(convs, tokens, rope, absolute):
        is_eou = token == conv.eou_id
        conv.store.commit(torch.tensor([a]), torch.tensor([conv.utt]), torch.tensor([is_eou]), rope_pos=torch.tensor([r]))
        conv.history.append((token, conv.utt, is_eou, a))
        conv.next_position += 1
        conv.policy.after_forward(conv)
        if is_eou:
            conv.in_utterance = False
    return out.logits[:, -1]


def generate_batch(convs: list["Conversation"], last_logits: list[torch.Tensor], max_new_tokens: int,
                   temperature: float = 0.0, top_k: int = 0, generator=None) -> list[list[int]]:
    """Generate the next utterance of every conversation, decoding them together; each reply ends at its own EoU."""
    replies: list[list[int]] = [[] for _ in convs]
    logits = list(last_logits)
    active = list(range(len(convs)))
    for _ in range(max_new_tokens):
        tokens = {b: sample(logits[b], temperature, top_k, generator) for b in active}
        finished = [b for b in active if tokens[b] == convs[b].eou_id]
        active = [b for b in active if b not in finished]
        if finished:  # close those utterances with their EoU
            for b, lg in zip(finished, decode_step([convs[b] for b in finished], [convs[b].eou_id for b in finished])):
                convs[b].last_logits = lg
        if not active:
            return replies
        for b in active:
            replies[b].append(tokens[b])
        for b, lg in zip(active, decode_step([convs[b] for b in active], [tokens[b] for b in active])):
            logits[b] = lg
    for b, lg in zip(active, decode_step([convs[b] for b in active], [convs[b].eou_id for b in active])):
        convs[b].last_logits = lg
    return replies


def _rotary_of(model):
    """The model's rotary embedding module (Llama family: ``model.model.rotary_emb``)."""
    for name, module in model.named_modules():
        if name.endswith("rotary_emb"):
            return module
    return None


def sample(logits: torch.Tensor, temperature: float, top_k: int, generator=None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
