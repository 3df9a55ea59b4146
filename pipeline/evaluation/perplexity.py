"""Perplexity (method.md §4). A dialogue is laid out ``[BOS] u1 EoU ... un EoU`` (truncated at an utterance
boundary to ``max_tokens``); its NLL is the mean next-token NLL over the tokens of utterances 2..n, their EoUs
included (the first utterance only conditions). ``mean_nll`` is the mean of those per-dialogue means (every
dialogue weighs the same) and ``ppl = exp(mean_nll)``; ``ppl_token_weighted`` (exp of the mean over all scored
tokens) is reported beside it. ``perplexity`` runs one full forward per dialogue under ``--mask``;
``perplexity_cache`` teacher-forces the same tokens utterance by utterance through the cache policy (for
streamingdialogue with absolute positions the two are equal up to float error).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from data_prep.tokenizer_loading import encode_utterances
from pipeline.inference.chat_turns import CHAT_TEMPLATE
from pipeline.contract import (
    BLK,
    DENSE,
    DIALOGUE,
    DOC_IDS,
    EOU,
    INPUT_IDS,
    MASK_KIND,
    POSITION_IDS,
    UTT_IDS,
    ExportInfo,
)

PPL_PROTOCOL = ("ppl = exp(mean over dialogues of the per-dialogue mean token NLL over utterances 2..n, EoUs "
                "included); ppl_token_weighted = exp(mean over all scored tokens)")


def tokenized(tokenizer, dialogues: list, max_tokens: int, layout: dict | None = None
              ) -> list[tuple[str, list[int] | None, list[list[int]]]]:
    """(id, pinned system turn or None, utterance token ids) per dialogue, truncated at an utterance boundary to
    ``max_tokens`` laid out; dialogues left with fewer than 2 utterances are dropped (nothing to score). With a chat
    ``layout`` (convsink.json) the utterances are the template's turns, role headers included, as prep lays them
    out; with ``pin_system`` (on unless the layout says otherwise) a leading system turn is pinned with BOS
    (``[BOS] system EoU``, utterance 0, never scored) and the scored utterances 2..n are the turns after it."""
    spec = None
    if (layout or {}).get("template") == CHAT_TEMPLATE:
        from data_prep.chat_template import chat_spec

        spec = chat_spec(tokenizer, pin_system=bool(layout.get("pin_system", True)))
    out = []
    for d in dialogues:
        system = None
        if spec is None:
            utts = encode_utterances(tokenizer, [t.text for t in d.turns])
        else:
            system, utts = chat_utterances(spec, d)
        head = 1 + (len(system) + 1 if system is not None else 0)
        while utts and head + sum(len(u) + 1 for u in utts) > max_tokens:
            utts = utts[:-1]
        if len(utts) >= 2:
            out.append((d.id, system, utts))
    return out


def chat_utterances(spec, dialogue) -> tuple[list[int] | None, list[list[int]]]:
    """(the pinned system turn or None, the other utterances) of ``dialogue`` rendered by the chat template (EoU =
    its end-of-turn token, not included)."""
    from data_prep.chat_template import encode_dialogue, pinned

    turns = encode_dialogue(spec, dialogue)
    if pinned(turns, spec):
        return turns.utterances[0], turns.utterances[1:]
    return None, turns.utterances


def scored_nll(logits: torch.Tensor, input_ids: list[int], utt_ids: list[int]) -> tuple[float, int]:
    """(sum, count) of next-token NLL over the tokens of utterances >= 2; ``logits (T, V)`` at positions 0..T-1."""
    targets = torch.tensor(input_ids[1:])  # (T-1,)
    scored = torch.tensor(utt_ids[1:]) >= 2
    nll = F.cross_entropy(logits[:-1].float().cpu(), targets, reduction="none")
    return float(nll[scored].sum()), int(scored.sum())


def _summary(per_dialogue: list[tuple[float, int]], **extra) -> dict:
    means = [s / c for s, c in per_dialogue]
    tokens = sum(c for _, c in per_dialogue)
    mean = sum(means) / max(len(means), 1)
    token_mean = sum(s for s, _ in per_dialogue) / max(tokens, 1)
    return {**extra, "dialogues": len(means), "tokens": tokens, "mean_nll": mean, "ppl": math.exp(mean),
            "token_weighted_nll": token_mean, "ppl_token_weighted": math.exp(token_mean), "protocol": PPL_PROTOCOL}


@torch.no_grad()
def perplexity(model, tokenizer, dialogues: list, ids, mask: str, max_tokens: int = 2048,
               mask_params: dict | None = None, layout: dict | None = None) -> dict:
    """method.md §4 perplexity, one full forward per dialogue under ``mask`` (dense boolean mask, SDPA)."""
    from data_prep.layout import layout_dialogue
    from pipeline.config import MaskConfig, ModelConfig
    from pipeline.modeling.forward import forward_batch

    params = dict(mask_params or {})
    params["dialogue_kind"] = DIALOGUE  # the mask asked for is the mask used (not the model's training baseline)
    cfg = ModelConfig(attention=DENSE, mask=MaskConfig(**params))
    per_dialogue = []
    for did, system, utts in tokenized(tokenizer, dialogues, max_tokens, layout):
        lay = layout_dialogue(did, utts, ids, system=system)  # a pinned system turn: utterance 0, never scored
        T = len(lay)
        dev = model.device
        batch = {INPUT_IDS: torch.tensor([lay.input_ids], device=dev), POSITION_IDS: torch.arange(T, device=dev)[None],
                 DOC_IDS: torch.zeros(1, T, dtype=torch.long, device=dev), UTT_IDS: torch.tensor([lay.utt_ids], device=dev),
                 EOU: torch.tensor([lay.eou], device=dev), BLK: torch.tensor([lay.blk], device=dev), MASK_KIND: [mask]}
        logits = forward_batch(model, batch, cfg, impl=DENSE)[0]  # (T, V)
        per_dialogue.append(scored_nll(logits, lay.input_ids, lay.utt_ids))
    return _summary(per_dialogue, mask=mask)


@torch.no_grad()
def cache_perplexity(model, tokenizer, dialogues: list, info: ExportInfo, settings, max_tokens: int = 2048) -> dict:
    """The same perplexity, teacher-forcing each utterance (one forward per utterance) through the cache."""
    from pipeline.inference.conversation import Conversation

    per_dialogue = []
    for _, system, utts in tokenized(tokenizer, dialogues, max_tokens, info.layout):
        conv = Conversation.from_settings(model, info, settings, system=system)
        rows = [conv.prefix_logits]  # (P, V): [BOS] and a pinned system turn, never scored
        input_ids = [info.bos_token_id] + ([*system, info.eou_token_id] if system is not None else [])
        utt_ids = [0] * len(input_ids)
        for i, u in enumerate(utts, start=1):
            rows.append(conv.add_utterance(u))
            input_ids += list(u) + [info.eou_token_id]
            utt_ids += [i] * (len(u) + 1)
        per_dialogue.append(scored_nll(torch.cat(rows), input_ids, utt_ids))
    return _summary(per_dialogue, cache=settings.policy, positions=settings.positions)
