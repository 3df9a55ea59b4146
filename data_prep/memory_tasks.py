"""SMR and LMR training samples (method.md §2), built from tokenized dialogues with a seed.

SMR ``[BOS] (u_j EoU u_j' EoU) for j = 1..s``: s unrelated utterances, each followed by a verbatim copy.
    utt_ids = blk: BOS 0, original j → 2j-1, copy j → 2j. Loss only on the copy tokens and the copy's EoU.
LMR ``[BOS] (q EoU r EoU) × l + a repeat of one earlier pair``: l consecutive pairs of one real dialogue.
    utt_ids: BOS 0, then 1, 2, 3, ... per utterance; blk: BOS 0, pair p → p, repeated pair → l + 1.
    Loss on the whole history and the repeated query (+ its EoU); on the repeated response too when
    ``supervise_repeated_response`` (the paper's text) — off by default, as in the reference code.

A sample longer than ``seq_len`` keeps fewer utterances / pairs (as many as fit); an LMR sample needs at least
2 pairs. Dialogues that cannot give one are counted in the manifest (``lmr_skipped_dialogues``), never dropped
silently.
"""

from __future__ import annotations

import numpy as np

from .config import LMRConfig, SMRConfig
from .tokenize import IGNORE, TokenizedDialogue
from .tokenizer import SpecialIds


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
    return TokenizedDialogue(name, input_ids, labels, utt, eou, list(utt), "smr")


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
    return TokenizedDialogue(name, input_ids, labels, utt, eou, blk, "lmr")


def build_smr(pool: list[list[int]], cfg: SMRConfig, ids: SpecialIds, seq_len: int, seed: int) -> tuple[list, dict]:
    """``cfg.samples`` SMR samples of ``cfg.utterances_per_sample`` utterances drawn from ``pool``."""
    usable = [u for u in pool if 1 + 2 * (len(u) + 1) <= seq_len]
    stats = {"smr_samples": 0, "smr_shortened": 0, "smr_utterance_pool": len(usable)}
    if cfg.samples == 0:
        return [], stats
    if not usable:
        raise ValueError(f"no utterance fits an SMR sample of seq_len={seq_len}")
    out = []
    for i in range(cfg.samples):
        rng = np.random.default_rng([seed, 1, i])
        pick = rng.choice(len(usable), size=min(cfg.utterances_per_sample, len(usable)), replace=False)
        sample = smr_sample(f"smr-{i}", [usable[j] for j in pick], ids, seq_len)
        stats["smr_shortened"] += sample.num_utterances // 2 < cfg.utterances_per_sample
        out.append(sample)
    stats["smr_samples"] = len(out)
    return out, stats


def build_lmr(dialogues: list[list[list[int]]], cfg: LMRConfig, ids: SpecialIds, seq_len: int, seed: int) -> tuple[list, dict]:
    """``cfg.samples`` LMR samples, each from ``cfg.pairs_per_sample`` consecutive pairs of one dialogue."""
    stats = {"lmr_samples": 0, "lmr_shortened": 0, "lmr_skipped_dialogues": 0}
    if cfg.samples == 0:
        return [], stats
    eligible = [d for d in dialogues if len(d) >= 4]
    stats["lmr_skipped_dialogues"] = len(dialogues) - len(eligible)
    if not eligible:
        raise ValueError("no dialogue has the 4 utterances (2 pairs) an LMR sample needs")
    out = []
    for i in range(cfg.samples):
        rng = np.random.default_rng([seed, 2, i])
        d = eligible[int(rng.integers(len(eligible)))]
        n_pairs = min(cfg.pairs_per_sample, len(d) // 2)
        first = 2 * int(rng.integers(len(d) // 2 - n_pairs + 1))
        pairs = [(d[first + 2 * p], d[first + 2 * p + 1]) for p in range(n_pairs)]
        while len(pairs) >= 2:
            repeat = int(rng.integers(len(pairs) - 1)) if len(pairs) > 1 else 0
            sample = lmr_sample(f"lmr-{i}", pairs, repeat, ids, cfg.supervise_repeated_response)
            if len(sample) <= seq_len:
                break
            pairs = pairs[1:]  # drop the oldest pair until it fits
        else:
            continue
        stats["lmr_shortened"] += len(pairs) < cfg.pairs_per_sample
        out.append(sample)
    stats["lmr_samples"] = len(out)
    if len(out) < cfg.samples:
        stats["lmr_rejected_too_long"] = cfg.samples - len(out)
    return out, stats
