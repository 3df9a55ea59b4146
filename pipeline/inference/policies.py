"""Cache policies: what a conversation's KV cache keeps, and when it drops the rest (method.md §3).

- ``dense``: keep everything (causal attention over the whole conversation).
- ``streamingllm``: the first ``max(sink_tokens, pinned)`` tokens + the last ``window`` tokens, enforced after every
  forward (a chunk fed in one forward, e.g. a teacher-forced utterance, sees the held tokens plus itself). Keys are cached
  BEFORE the rotary embedding and rotated at their index inside the cache at every forward (StreamingLLM), so
  positions stay bounded and a key is never re-rotated from an already-rotated (rounded) value.
- ``streamingdialogue``: every utt-0 token (BOS, and a pinned system prompt ``[BOS] system EoU``, never evicted) +
  the EoU of every finished utterance + the previous and the current utterance; the tokens of utterance t-2 go
  when utterance t starts. After T finished utterances (before the next starts) it holds
  ``P + T + (non-EoU tokens of the last two utterances)`` positions, P the pinned tokens (1: BOS alone).
  ``positions='absolute'`` (default): cached keys keep their original rotary positions and new tokens continue the
  dialogue's absolute numbering, which reproduces the training-time dialogue mask exactly.
  ``positions='cache'``: StreamingLLM-style re-indexing inside the cache (pre-RoPE keys, bounded positions).
- ``recompute``: at every utterance start the cache is dropped and the last ``window`` tokens of the conversation
  are re-encoded from scratch (dense attention, positions 0..w-1; a pinned system prompt's P tokens first, then
  the window at P..P+w-1), then the utterance continues on top of them: the "dense attention with recomputation"
  baseline of the paper's 4x / 18x claim.

A policy only decides. Its two hooks, ``before_utterance`` (an utterance starts) and ``after_forward`` (tokens were
just cached), read a ``CacheFacts`` (plain metadata, no model, no conversation) and return a decision: ``None``
(keep everything), ``Keep`` (a boolean index over the cached positions) or ``Reencode`` (drop the cache and
re-encode the last n tokens of the conversation). The ``Conversation`` applies it (it prunes its store and runs any
re-encoding forward itself). Every policy keeps a pinned system prompt (``CacheFacts.pinned``, the first positions
of the conversation): streamingllm counts it among its sinks, recompute re-encodes it before its window.

Shapes: metadata per cached position ``(S,)``; a keep index ``(S,)`` bool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Union

import torch

from pipeline.contract import (
    CACHE_POLICIES,
    DENSE_CACHE,
    RECOMPUTE_CACHE,
    STREAMINGDIALOGUE_CACHE,
    STREAMINGLLM_CACHE,
)


@dataclass(frozen=True)
class CacheFacts:
    """What a policy may read (it must not change the tensors): the metadata of each cached position and where the
    conversation stands."""

    utt: torch.Tensor  # (S,) long: utterance index of each cached position (BOS and a pinned system prompt: 0)
    eou: torch.Tensor  # (S,) bool: the position is an EoU
    utterance: int  # index of the current utterance (the one just started, in before_utterance)
    history_tokens: int  # tokens the conversation has had so far (BOS included), cached or not
    pinned: int = 0  # tokens of a pinned system prompt ``[BOS] system EoU`` (0: none), first in history and cache

    def __len__(self) -> int:
        return int(self.utt.numel())


@dataclass(frozen=True)
class Keep:
    """Keep only the cached positions where ``index`` ``(S,)`` is True (order preserved)."""

    index: torch.Tensor


@dataclass(frozen=True)
class Reencode:
    """Drop the whole cache, then re-encode the first ``pinned`` tokens of the conversation's history (a pinned
    system prompt) and its last ``tokens`` tokens."""

    tokens: int
    pinned: int = 0


Decision = Union[Keep, Reencode, None]  # None: keep everything


class CachePolicy(Protocol):
    """What every policy has: a name (one of ``CACHE_POLICIES``) and two hooks that read facts and return a decision."""

    name: str

    def before_utterance(self, cache: CacheFacts) -> Decision: ...

    def after_forward(self, cache: CacheFacts) -> Decision: ...


class DensePolicy:
    """Keep everything."""

    name = DENSE_CACHE

    def before_utterance(self, cache: CacheFacts) -> Decision:
        return None

    def after_forward(self, cache: CacheFacts) -> Decision:
        return None


class StreamingDialoguePolicy:
    """When utterance ``u`` starts: keep every utt-0 token (BOS + a pinned system prompt), every EoU, and the
    tokens of utterance ``u - 1``."""

    name = STREAMINGDIALOGUE_CACHE

    def before_utterance(self, cache: CacheFacts) -> Decision:
        if not len(cache):
            return None
        return Keep((cache.utt == 0) | cache.eou | (cache.utt >= cache.utterance - 1))

    def after_forward(self, cache: CacheFacts) -> Decision:
        return None


class StreamingLLMPolicy:
    """After every forward: keep the first ``sink_tokens`` (or all pinned tokens, if more) and the last ``window``
    cached tokens."""

    name = STREAMINGLLM_CACHE

    def __init__(self, sink_tokens: int = 4, window: int = 256):
        self.sink_tokens, self.window = sink_tokens, window

    def before_utterance(self, cache: CacheFacts) -> Decision:
        return None

    def after_forward(self, cache: CacheFacts) -> Decision:
        n, sinks = len(cache), max(self.sink_tokens, cache.pinned)
        if n <= sinks + self.window:
            return None
        idx = torch.arange(n)
        return Keep((idx < sinks) | (idx >= n - self.window))


class RecomputePolicy:
    """When an utterance starts: drop the cache and re-encode the pinned prompt (if any) and the last ``window``
    tokens of the conversation after it."""

    name = RECOMPUTE_CACHE

    def __init__(self, window: int = 256):
        self.window = window

    def before_utterance(self, cache: CacheFacts) -> Decision:
        return Reencode(min(self.window, cache.history_tokens - cache.pinned), cache.pinned)

    def after_forward(self, cache: CacheFacts) -> Decision:
        return None


def make_policy(name: str, sink_tokens: int = 4, window: int = 256) -> CachePolicy:
    if name == DENSE_CACHE:
        return DensePolicy()
    if name == STREAMINGDIALOGUE_CACHE:
        return StreamingDialoguePolicy()
    if name == STREAMINGLLM_CACHE:
        return StreamingLLMPolicy(sink_tokens, window)
    if name == RECOMPUTE_CACHE:
        return RecomputePolicy(window)
    raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(CACHE_POLICIES)}")
