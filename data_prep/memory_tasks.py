"""SMR and LMR training samples (method.md §2), built from tokenized dialogues with a seed.

SMR ``[BOS] (u_j EoU u_j' EoU) for j = 1..s``: s unrelated utterances, each followed by a verbatim copy.
    utt_ids = blk: BOS 0, original j → 2j-1, copy j → 2j. Loss only on the copy tokens and the copy's EoU.
LMR ``[BOS] (q EoU r EoU) × l + a repeat of one earlier pair``: l consecutive pairs of one real dialogue.
    utt_ids: BOS 0, then 1, 2, 3, ... per utterance; blk: BOS 0, pair p → p, repeated pair → l + 1.
    Loss on the whole history and the repeated query (+ its EoU); on the repeated response too when
    ``supervise_repeated_response`` (the paper's text) — off by default, as in the reference code.

Sampling (sample i uses ``numpy.random.default_rng([seed, 1 (SMR) | 2 (LMR), i])``, so any range of samples can
be built anywhere and the result does not depend on who built it):

* SMR: s distinct dialogues (unrelated utterances), one utterance drawn from each. Utterances that cannot fit a
  sample on their own (``1 + 2 * (len + 1) > seq_len``), or longer than ``smr.max_utterance_tokens`` when set,
  are never drawn (counted: ``smr_long_utterances``).
  When the s pairs do not fit ``seq_len``, the sample keeps the first ones that fit (s is reduced for that
  sample, counted: ``smr_shortened``). Fewer than s eligible dialogues also reduce s.
* LMR: a dialogue with at least 4 utterances (2 pairs; others are counted: ``lmr_ineligible_dialogues``), a
  random start at a query (even utterance), ``min(l, utterances // 2)`` consecutive pairs (fewer than l:
  counted ``lmr_shortened``). When ``[BOS] + pairs + the longest pair`` exceeds ``seq_len``, the oldest pairs
  are dropped until it fits (``lmr_shortened``); below 2 pairs the sample is rejected, counted in
  ``lmr_rejected_too_long`` and not replaced. The repeated pair is then drawn among the kept pairs.
"""

from __future__ import annotations

import numpy as np

from data_prep.config import LMRConfig, SMRConfig
from data_prep.contract import LMR, SMR
from data_prep.items import items_table
from data_prep.layout import IGNORE, TokenizedDialogue
from data_prep.tokenizer_loading import SpecialIds


def smr_sample(name: str, utterances: list[list[int]], ids: SpecialIds, seq_len: int) -> TokenizedDialogue:
    input_ids, labels, utt, eou = [ids.bos], [IGNORE], [0], [False]
    for j, u in enumerate(utterances, start=1):
        if len(input_ids) + 2 * (len(u) + 1) > seq_len:
            break
        for copy in (False, True):
            block = 2 * j if copy else 2 * j - 1
            toks = list(u) + [ids.eou]
            input_ids += toks
            labels += toks if copy else [IGNORE] * len(toks)
            utt += [block] * len(toks)
            eou += [False] * len(u) + [True]
    return TokenizedDialogue(name, input_ids, labels, utt, eou, list(utt), SMR)


def lmr_sample(name: str, pairs: list[tuple[list[int], list[int]]], repeat: int, ids: SpecialIds,
               supervise_repeated_response: bool) -> TokenizedDialogue:
    """``pairs`` of (query, response) token lists; ``repeat`` is the 0-based index of the pair repeated at the end."""
    input_ids, labels, utt, eou, blk = [ids.bos], [IGNORE], [0], [False], [0]
    u = 0
    for p, (query, response) in enumerate(list(pairs) + [pairs[repeat]], start=1):
        repeated = p == len(pairs) + 1
        for is_response, toks in ((False, query), (True, response)):
            u += 1
            seg = list(toks) + [ids.eou]
            input_ids += seg
            supervised = not repeated or not is_response or supervise_repeated_response
            labels += seg if supervised else [IGNORE] * len(seg)
            utt += [u] * len(seg)
            eou += [False] * len(toks) + [True]
            blk += [p] * len(seg)
    return TokenizedDialogue(name, input_ids, labels, utt, eou, blk, LMR)


class Corpus:
    """Tokenized kept dialogues as flat arrays (cheap to ship to workers): ``tokens`` of all utterances,
    ``utt_offsets`` (n_utterances + 1) into tokens, ``dial_offsets`` (n_dialogues + 1) into utterances."""

    def __init__(self, tokens: np.ndarray, utt_offsets: np.ndarray, dial_offsets: np.ndarray):
        self.tokens, self.utt_offsets, self.dial_offsets = tokens, utt_offsets, dial_offsets

    @classmethod
    def from_lists(cls, dialogues: list[list[list[int]]]) -> "Corpus":
        utts = [u for d in dialogues for u in d]
        lens = np.fromiter((len(u) for u in utts), dtype=np.int64, count=len(utts))
        tokens = np.fromiter((t for u in utts for t in u), dtype=np.int32, count=int(lens.sum()))
        dial = np.fromiter((len(d) for d in dialogues), dtype=np.int64, count=len(dialogues))
        return cls(tokens, np.concatenate([[0], np.cumsum(lens)]), np.concatenate([[0], np.cumsum(dial)]))

    @property
    def num_dialogues(self) -> int:
        return len(self.dial_offsets) - 1

    def utt_len(self) -> np.ndarray:
        return np.diff(self.utt_offsets)

    def utterance(self, u: int) -> list[int]:
        return self.tokens[self.utt_offsets[u]:self.utt_offsets[u + 1]].tolist()


def smr_plan(corpus: Corpus, seq_len: int, max_utterance_tokens: int | None = None) -> dict:
    """What SMR sampling draws from: usable utterances grouped by dialogue (computed once, shared). Utterances
    that do not fit a sample, or are longer than ``max_utterance_tokens``, are counted in ``long_utterances``."""
    lens = corpus.utt_len()
    usable = 1 + 2 * (lens + 1) <= seq_len
    if max_utterance_tokens is not None:
        usable &= lens <= max_utterance_tokens
    idx = np.nonzero(usable)[0]
    dial_of = np.repeat(np.arange(corpus.num_dialogues), np.diff(corpus.dial_offsets))
    per_dial = np.bincount(dial_of[idx], minlength=corpus.num_dialogues)
    eligible = np.nonzero(per_dial)[0]
    start = np.concatenate([[0], np.cumsum(per_dial)[:-1]])
    return {"usable": idx, "per_dial": per_dial, "start": start, "eligible": eligible,
            "long_utterances": int((~usable).sum())}


def build_smr(corpus: Corpus, cfg: SMRConfig, ids: SpecialIds, seq_len: int, seed: int, start: int, stop: int,
              plan: dict | None = None):
    """SMR samples ``start .. stop-1`` → (items table, stats)."""
    plan = plan or smr_plan(corpus, seq_len, cfg.max_utterance_tokens)
    eligible = plan["eligible"]
    if len(eligible) == 0:
        raise ValueError(f"no utterance fits an SMR sample of seq_len={seq_len}")
    out, shortened = [], 0
    for i in range(start, stop):
        rng = np.random.default_rng([seed, 1, i])
        s = min(cfg.utterances_per_sample, len(eligible))
        dials = eligible[rng.choice(len(eligible), size=s, replace=False)]
        picks = [int(plan["usable"][plan["start"][d] + rng.integers(plan["per_dial"][d])]) for d in dials]
        sample = smr_sample(f"smr-{i}", [corpus.utterance(u) for u in picks], ids, seq_len)
        shortened += sample.num_utterances // 2 < cfg.utterances_per_sample
        out.append(sample)
    return items_table(out), {"smr_samples": len(out), "smr_shortened": shortened}


def build_lmr(corpus: Corpus, cfg: LMRConfig, ids: SpecialIds, seq_len: int, seed: int, start: int, stop: int):
    """LMR samples ``start .. stop-1`` → (items table, stats)."""
    n_utts = np.diff(corpus.dial_offsets)
    eligible = np.nonzero(n_utts >= 4)[0]
    if len(eligible) == 0:
        raise ValueError("no dialogue has the 4 utterances (2 pairs) an LMR sample needs")
    lens = corpus.utt_len()
    out, shortened, rejected = [], 0, 0
    for i in range(start, stop):
        rng = np.random.default_rng([seed, 2, i])
        d = int(eligible[rng.integers(len(eligible))])
        first_utt, n = int(corpus.dial_offsets[d]), int(n_utts[d])
        n_pairs = min(cfg.pairs_per_sample, n // 2)
        first = first_utt + 2 * int(rng.integers(n // 2 - n_pairs + 1))
        pair_len = [int(lens[first + 2 * p] + lens[first + 2 * p + 1] + 2) for p in range(n_pairs)]
        drop = 0
        while n_pairs - drop >= 2 and 1 + sum(pair_len[drop:]) + max(pair_len[drop:]) > seq_len:
            drop += 1
        if n_pairs - drop < 2:
            rejected += 1
            continue
        pairs = [(corpus.utterance(first + 2 * p), corpus.utterance(first + 2 * p + 1)) for p in range(drop, n_pairs)]
        repeat = int(rng.integers(len(pairs)))
        out.append(lmr_sample(f"lmr-{i}", pairs, repeat, ids, cfg.supervise_repeated_response))
        shortened += len(pairs) < cfg.pairs_per_sample
    return items_table(out), {"lmr_samples": len(out), "lmr_shortened": shortened, "lmr_rejected_too_long": rejected}


def lmr_ineligible(corpus: Corpus) -> int:
    return int((np.diff(corpus.dial_offsets) < 4).sum())
