"""One conversation decoded turn by turn against a policy-pruned KV cache, and several decoded together.

``Conversation`` owns its state (the store, the positions, the utterance index); the policy
(``pipeline.inference.policies``) decides what the store keeps, from metadata alone, and the conversation applies
that decision (pruning, or re-encoding recent history with its own forward); the store
(``pipeline.inference.kv_store``) holds the keys and values.
"""

from __future__ import annotations

import copy

import torch

from pipeline.contract import (
    ABSOLUTE,
    CACHE_FRAME,
    CACHE_POSITIONS,
    RECOMPUTE_CACHE,
    STREAMINGDIALOGUE_CACHE,
    STREAMINGLLM_CACHE,
    CacheSettings,
    ExportInfo,
)
from pipeline.inference.kv_store import BatchStreamAttention, KVStore, Rope, StreamAttention
from pipeline.inference.policies import CacheFacts, Decision, Keep, Reencode, make_policy


class Conversation:
    """One conversation decoded turn by turn: ``[BOS] u1 EoU u2 EoU ...`` with a policy-pruned KV cache.

    Rotary positions: 'absolute' (new tokens continue the dialogue's numbering, cached keys keep theirs) or the
    cache frame (a token is rotated at its index in the cache). streamingllm and recompute always use the cache
    frame; dense is the same in both; streamingdialogue uses ``positions``.

    ``system`` (token ids): a pinned system prompt, ``[BOS] system EoU`` all with utterance index 0 (the layout of
    ``data.pin_system``), so like BOS it is visible to every later token and no policy evicts it (streamingdialogue:
    utt 0; streamingllm and recompute: ``CacheFacts.pinned``); ``last_logits`` then predicts the first user token.
    ``pinned`` counts BOS + the prompt + its EoU (1: BOS alone)."""

    def __init__(self, model, bos_id: int, eou_id: int, policy=STREAMINGDIALOGUE_CACHE, positions: str = ABSOLUTE,
                 sink_tokens: int = 4, window: int = 256, system: list[int] | None = None):
        if positions not in CACHE_POSITIONS:
            raise ValueError(f"unknown cache positions {positions!r}; choose absolute or cache")
        self.model, self.bos_id, self.eou_id = model, bos_id, eou_id
        self.policy = make_policy(policy, sink_tokens, window) if isinstance(policy, str) else policy
        name = self.policy.name
        cache_frame = name in (STREAMINGLLM_CACHE, RECOMPUTE_CACHE) or (name == STREAMINGDIALOGUE_CACHE and positions == CACHE_FRAME)
        self.positions = CACHE_FRAME if cache_frame else ABSOLUTE
        # recompute never evicts inside an utterance, so its keys can stay as the model rotated them
        raw = cache_frame and name != RECOMPUTE_CACHE
        self.store = KVStore(model.config.num_hidden_layers, raw=raw, rope=Rope(_rotary_of(model)) if raw else None)
        self.attn = StreamAttention(self.store)
        self.history: list[tuple[int, int, bool, int]] = []  # (token, utt, eou, absolute position)
        self.next_position = 0
        self.utt = 0  # index of the current utterance (BOS is 0)
        self.in_utterance = False
        self.last_logits: torch.Tensor | None = None
        prefix = [bos_id] + ([*system, eou_id] if system is not None else [])
        self.pinned = len(prefix)
        logits = self._feed(prefix, eou=[False] * (len(prefix) - 1) + [system is not None])
        self.prefix_logits = logits  # (P, V): BOS and a pinned system prompt
        self.bos_logits = logits[0]
        if system is not None:
            self.last_logits = logits[-1]

    @classmethod
    def from_settings(cls, model, info: ExportInfo, settings: CacheSettings,
                      system: list[int] | None = None) -> "Conversation":
        return cls(model, info.bos_token_id, info.eou_token_id, settings.policy, positions=settings.positions,
                   sink_tokens=settings.sink_tokens, window=settings.window, system=system)

    def fork(self) -> "Conversation":
        """An independent copy sharing the model (the cache tensors are shared until either side changes them)."""
        new = copy.copy(self)
        new.store = self.store.copy()
        new.attn = StreamAttention(new.store)
        new.history = list(self.history)
        return new

    def next_rope_position(self) -> int:
        """The rotary position the next new token takes: its index in the cache, or its absolute position."""
        return len(self.store) if self.positions == CACHE_FRAME else self.next_position

    @torch.no_grad()
    def forward(self, token_ids: list[int], eou: list[bool], utts: list[int], positions: list[int], record: bool = True,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Run tokens through the model against the cache, cache them, then prune as the policy decides; returns
        logits ``(n, V)`` (the last ``logits_to_keep`` rows only when it is > 0)."""
        n = len(token_ids)
        device = self.model.device
        absolute = torch.tensor(positions)
        rope = torch.arange(len(self.store), len(self.store) + n) if self.positions == CACHE_FRAME else absolute
        self.attn.begin(rope, device)
        out = self.model(input_ids=torch.tensor([token_ids], device=device), position_ids=rope[None].to(device),
                         convsink_attn=self.attn, use_cache=False, logits_to_keep=logits_to_keep)
        self._commit(token_ids, utts, eou, positions, rope, record)
        return out.logits[0]

    def _commit(self, token_ids: list[int], utts: list[int], eou: list[bool], positions: list[int],
                rope: torch.Tensor, record: bool = True) -> None:
        """Cache what the last forward staged in the store, with its metadata ``(n,)``; record it in the history;
        then prune as the policy decides."""
        self.store.commit(torch.tensor(positions), torch.tensor(utts), torch.tensor(eou), rope_pos=rope)
        if record:
            self.history += list(zip(token_ids, utts, eou, positions))
        self._apply(self.policy.after_forward(self._facts()))

    def _facts(self) -> CacheFacts:
        """What the policy gets to read: the store's metadata and where the conversation stands."""
        return CacheFacts(utt=self.store.utt, eou=self.store.eou, utterance=self.utt,
                          history_tokens=len(self.history), pinned=self.pinned if self.pinned > 1 else 0)

    def _apply(self, decision: Decision) -> None:
        """Carry out a policy's decision on this conversation's cache."""
        if isinstance(decision, Keep):
            self.store.keep(decision.index)
        elif isinstance(decision, Reencode):
            self.store.clear()
            start = max(decision.pinned, len(self.history) - decision.tokens) if decision.tokens > 0 else len(self.history)
            history = self.history[:decision.pinned] + self.history[start:]  # the pinned prompt, then the window
            if history:
                tokens, utts, eous, positions = zip(*history)
                self.forward(list(tokens), list(eous), utts=list(utts), positions=list(positions), record=False,
                             logits_to_keep=1)  # the re-encoding needs no logits
        elif decision is not None:
            raise TypeError(f"unknown cache decision {decision!r}")

    def _feed(self, token_ids: list[int], eou: list[bool], logits_to_keep: int = 0) -> torch.Tensor:
        """New tokens of the current utterance, at the next absolute positions."""
        n = len(token_ids)
        positions = list(range(self.next_position, self.next_position + n))
        self.next_position += n
        return self.forward(token_ids, eou, [self.utt] * n, positions, logits_to_keep=logits_to_keep)

    def start_utterance(self) -> None:
        self.utt += 1
        self._apply(self.policy.before_utterance(self._facts()))
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
        if self.policy.name != RECOMPUTE_CACHE:
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

    def begin_token(self) -> int:
        """First half of a batched one-token step (``decode_step``): open an utterance if none is open (the policy
        prunes or re-encodes here); returns the token's rotary position. The batched forward then stages the
        token's keys/values in ``self.store`` and ``end_token`` caches them."""
        if not self.in_utterance:
            self.start_utterance()
        return self.next_rope_position()

    def end_token(self, token: int, logits: torch.Tensor) -> None:
        """Second half: cache the token the batched forward staged, record it, let the policy prune; an EoU closes
        the utterance and its logits ``(V,)`` become ``last_logits``."""
        rope = torch.tensor([self.next_rope_position()])  # the store has not grown since begin_token
        is_eou = token == self.eou_id
        self._commit([token], [self.utt], [is_eou], [self.next_position], rope)
        self.next_position += 1
        if is_eou:
            self.in_utterance = False
            self.last_logits = logits

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
        return {"policy": self.policy.name, "positions": len(self.store), "pinned": self.pinned,
                "kv_bytes": self.store.nbytes(),
                "utterances": self.utt, "conversation_tokens": self.next_position}


@torch.no_grad()
def decode_step(convs: list[Conversation], tokens: list[int]) -> torch.Tensor:
    """Feed one token to each conversation in one batched forward; returns logits ``(B, V)``. Each conversation
    keeps its own policy, positions and cache (utterance starts, pruning and re-encoding happen per row, inside
    the conversations' ``begin_token`` / ``end_token``)."""
    model = convs[0].model
    rope = [conv.begin_token() for conv in convs]
    device = model.device
    attn = BatchStreamAttention([c.store for c in convs])
    attn.begin(rope, device)
    out = model(input_ids=torch.tensor(tokens, device=device)[:, None], position_ids=torch.tensor(rope, device=device)[:, None],
                convsink_attn=attn, use_cache=False)
    logits = out.logits[:, -1]  # (B, V)
    for conv, token, row in zip(convs, tokens, logits):
        conv.end_token(token, row)
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
