"""``convsink eval``: perplexity under a mask, generation with a cache policy, the paper's text metrics and a
long-memory recall probe; or scoring of existing predictions without a model.

Perplexity (method.md §4). A dialogue is laid out ``[BOS] u1 EoU ... un EoU`` (truncated at an utterance
boundary to ``max_tokens``); its NLL is the mean next-token NLL over the tokens of utterances 2..n, their EoUs
included (the first utterance only conditions). ``mean_nll`` is the mean of those per-dialogue means (every
dialogue weighs the same) and ``ppl = exp(mean_nll)``; ``ppl_token_weighted`` (exp of the mean over all scored
tokens) is reported beside it. ``perplexity`` runs one full forward per dialogue under ``--mask``;
``perplexity_cache`` teacher-forces the same tokens utterance by utterance through the cache policy (for
streamingdialogue with absolute positions the two are equal up to float error).

Generation metrics (``score_predictions``), references = the last utterance of each dialogue, predictions with a
trailing ``</s>`` / ``<|im_end|>`` stripped; every score on sacrebleu's default 13a tokenization, case-sensitive:
- BLEU-1 / BLEU-2: sacrebleu CORPUS BLEU with ``max_ngram_order`` 1 / 2, i.e. brevity penalty x the geometric
  mean of the corpus-level modified 1..n-gram precisions (cumulative, not individual n-gram), on 0-100;
  BLEU-avg: their mean; ``corpus_bleu``: sacrebleu's default 4-gram corpus BLEU.
- ROUGE-1 / ROUGE-2 / ROUGE-L: rouge-score F1 (its default tokenizer, no stemming), averaged over pairs, x100.
- Distinct-n: distinct n-grams / all n-grams over all predictions (whitespace tokens).
Recall probe: after ``recall_after`` turns of a dialogue the user asks for the first utterance verbatim; exact
match (after whitespace normalisation) and token F1 (lower-cased whitespace tokens) against it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict

import torch
import torch.nn.functional as F

from data_prep.adapters import iter_dialogues
from data_prep.schema import DataError

PPL_PROTOCOL = ("ppl = exp(mean over dialogues of the per-dialogue mean token NLL over utterances 2..n, EoUs "
                "included); ppl_token_weighted = exp(mean over all scored tokens)")
RECALL_PROMPT = "Can you repeat exactly the first thing that was said in this conversation?"


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------

def strip_eos(text: str) -> str:
    text = text.strip()
    for tail in ("</s>", "<|im_end|>"):
        if text.endswith(tail):
            text = text[: -len(tail)].rstrip()
    return text


def load_dialogues(paths: list[str], limit: int | None = None) -> list:
    """Dialogues of the files in order (first ``limit``); a bad record raises its one-line DataError."""
    out = []
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: dialogue file not found")
        for d in iter_dialogues(p):
            if isinstance(d, DataError):
                raise d
            out.append(d)
            if limit is not None and len(out) >= limit:
                return out
    return out


def references_from(paths: list[str], limit: int | None = None) -> list[str]:
    """The last utterance of each dialogue (what the reference repository scores against)."""
    return [d.turns[-1].text for d in load_dialogues(paths, limit)]


# --------------------------------------------------------------------------------------------------------------
# Text metrics
# --------------------------------------------------------------------------------------------------------------

def distinct_n(texts: list[str], n: int) -> float:
    grams, total = set(), 0
    for t in texts:
        toks = t.split()
        for i in range(len(toks) - n + 1):
            grams.add(tuple(toks[i:i + n]))
            total += 1
    return len(grams) / total if total else 0.0


def bleu_n(predictions: list[str], references: list[str], n: int) -> float:
    """sacrebleu corpus BLEU with maximum n-gram order ``n`` (cumulative 1..n, brevity penalty), 0-100."""
    from sacrebleu.metrics import BLEU

    return BLEU(max_ngram_order=n).corpus_score(predictions, [references]).score


def score_predictions(predictions: list[str], references: list[str]) -> dict:
    """BLEU-1/2/avg, corpus BLEU, ROUGE-1/2/L, Distinct-1/2/3 (definitions in the module docstring)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not all(isinstance(p, str) for p in predictions):
        raise ValueError("predictions must be a JSON list of strings")
    preds = [strip_eos(p) for p in predictions]
    b1, b2 = bleu_n(preds, references, 1), bleu_n(preds, references, 2)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    rouge = {k: 0.0 for k in ("rouge1", "rouge2", "rougeL")}
    for p, r in zip(preds, references):
        s = scorer.score(r, p)
        for k in rouge:
            rouge[k] += s[k].fmeasure
    n = max(len(preds), 1)
    return {"n": len(preds), "bleu1": b1, "bleu2": b2, "bleu_avg": (b1 + b2) / 2,
            "corpus_bleu": sacrebleu.corpus_bleu(preds, [references]).score,
            "rouge1": 100 * rouge["rouge1"] / n, "rouge2": 100 * rouge["rouge2"] / n, "rougeL": 100 * rouge["rougeL"] / n,
            "distinct1": distinct_n(preds, 1), "distinct2": distinct_n(preds, 2), "distinct3": distinct_n(preds, 3)}


def token_f1(pred: str, ref: str) -> float:
    p, r = pred.lower().split(), ref.lower().split()
    common = sum(min(p.count(w), r.count(w)) for w in set(p))
    if not p or not r or not common:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


# --------------------------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------------------------

def tokenized(tokenizer, dialogues: list, max_tokens: int) -> list[tuple[str, list[list[int]]]]:
    """(id, utterance token ids) per dialogue, truncated at an utterance boundary to ``max_tokens`` laid out;
    dialogues left with fewer than 2 utterances are dropped (nothing to score)."""
    out = []
    for d in dialogues:
        utts = tokenizer([t.text for t in d.turns], add_special_tokens=False)["input_ids"]
        while utts and 1 + sum(len(u) + 1 for u in utts) > max_tokens:
            utts = utts[:-1]
        if len(utts) >= 2:
            out.append((d.id, utts))
    return out


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
               mask_params: dict | None = None) -> dict:
    """method.md §4 perplexity, one full forward per dialogue under ``mask`` (dense boolean mask, SDPA)."""
    from data_prep.tokenize import layout_dialogue

    from .config import MaskConfig, ModelConfig
    from .model import forward_batch

    params = dict(mask_params or {})
    params["dialogue_kind"] = "dialogue"  # the mask asked for is the mask used (not the model's training baseline)
    cfg = ModelConfig(attention="dense", mask=MaskConfig(**params))
    per_dialogue = []
    for did, utts in tokenized(tokenizer, dialogues, max_tokens):
        lay = layout_dialogue(did, utts, ids)
        T = len(lay)
        dev = model.device
        batch = {"input_ids": torch.tensor([lay.input_ids], device=dev), "position_ids": torch.arange(T, device=dev)[None],
                 "doc_ids": torch.zeros(1, T, dtype=torch.long, device=dev), "utt_ids": torch.tensor([lay.utt_ids], device=dev),
                 "eou": torch.tensor([lay.eou], device=dev), "blk": torch.tensor([lay.blk], device=dev), "mask_kind": [mask]}
        logits = forward_batch(model, batch, cfg, impl="dense")[0]  # (T, V)
        per_dialogue.append(scored_nll(logits, lay.input_ids, lay.utt_ids))
    return _summary(per_dialogue, mask=mask)


@torch.no_grad()
def cache_perplexity(model, tokenizer, dialogues: list, info: dict, settings, max_tokens: int = 2048) -> dict:
    """The same perplexity, teacher-forcing each utterance (one forward per utterance) through the cache."""
    from .cache import Conversation

    per_dialogue = []
    for _, utts in tokenized(tokenizer, dialogues, max_tokens):
        conv = Conversation.from_settings(model, info, settings)
        rows, input_ids, utt_ids = [conv.bos_logits[None]], [info["bos_token_id"]], [0]
        for i, u in enumerate(utts, start=1):
            rows.append(conv.add_utterance(u))
            input_ids += list(u) + [info["eou_token_id"]]
            utt_ids += [i] * (len(u) + 1)
        per_dialogue.append(scored_nll(torch.cat(rows), input_ids, utt_ids))
    return _summary(per_dialogue, cache=settings.policy, positions=settings.positions)


# --------------------------------------------------------------------------------------------------------------
# Generation and the recall probe (several conversations decode in one batch)
# --------------------------------------------------------------------------------------------------------------

def _continue_batch(model, tokenizer, info: dict, settings, histories: list[list[str]], max_new_tokens: int,
                    batch_size: int) -> list[str]:
    """For each history (utterance texts): teacher-force it, then generate the next utterance (greedy)."""
    from .cache import Conversation, generate_batch

    out = []
    for start in range(0, len(histories), batch_size):
        convs = []
        for history in histories[start:start + batch_size]:
            conv = Conversation.from_settings(model, info, settings)
            for text in history:
                conv.add_utterance(tokenizer(text, add_special_tokens=False)["input_ids"], all_logits=False)
            convs.append(conv)
        out += [tokenizer.decode(r, skip_special_tokens=True).strip() for r in generate_batch(convs, None, max_new_tokens)]
    return out


def generate_and_probe(model, tokenizer, dialogues: list, info: dict, settings, max_new_tokens: int, recall_after: int,
                       batch_size: int = 8) -> dict:
    """Generate the last utterance of each dialogue from the others; recall probe on dialogues longer than
    ``recall_after`` turns."""
    predictions = _continue_batch(model, tokenizer, info, settings, [[t.text for t in d.turns[:-1]] for d in dialogues],
                                  max_new_tokens, batch_size)
    probed = [d for d in dialogues if len(d.turns) > recall_after]
    histories = [[t.text for t in d.turns[:recall_after]] + [RECALL_PROMPT] for d in probed]
    firsts = [d.turns[0].text for d in probed]
    budget = max([max_new_tokens] + [len(tokenizer(f, add_special_tokens=False)["input_ids"]) + 1 for f in firsts])
    answers = _continue_batch(model, tokenizer, info, settings, histories, budget, batch_size)
    items = [{"dialogue": d.id, "asked_for": f, "answer": a, "exact": float(" ".join(a.split()) == " ".join(f.split())),
              "f1": token_f1(a, f)} for d, f, a in zip(probed, firsts, answers)]
    summary = {"turns_before_question": recall_after, "question": RECALL_PROMPT, "n": len(items),
               "exact_match": sum(i["exact"] for i in items) / max(len(items), 1),
               "token_f1": sum(i["f1"] for i in items) / max(len(items), 1), "items": items}
    return {"predictions": predictions, "recall_probe": summary}


def evaluate_model(model_dir: str, data: list[str], out: str, cache: str | None = None, mask: str = "dialogue",
                   limit: int | None = 20, max_new_tokens: int = 32, max_tokens: int = 2048, recall_after: int = 10,
                   chat_cfg=None, batch_size: int = 8) -> dict:
    """Perplexity (under ``mask`` and through the cache), generation of each dialogue's last utterance with the
    cache policy (``cache``, else chat_cfg / convsink.json, see ``CacheSettings.resolve``), text metrics and the
    recall probe; writes ``out`` (JSON) and a Markdown table next to it."""
    from data_prep.tokenizer import SpecialIds

    from .cache import CacheSettings
    from .chat import load_chat_model

    dialogues = load_dialogues(data, limit)
    if not dialogues:
        raise ValueError(f"{', '.join(data)}: no dialogues")
    model, tokenizer, info = load_chat_model(model_dir)
    settings = CacheSettings.resolve(chat_cfg, info, policy=cache)
    ids = SpecialIds(info["bos_token_id"], info["eou_token_id"], info["pad_token_id"])
    result = {"model": model_dir if model_dir in ("smollm2", "tiny") else os.path.abspath(model_dir), "data": list(data),
              "limit": limit, "cache": asdict(settings), "max_new_tokens": max_new_tokens,
              "perplexity": perplexity(model, tokenizer, dialogues, ids, mask, max_tokens, info.get("mask")),
              "perplexity_cache": cache_perplexity(model, tokenizer, dialogues, info, settings, max_tokens)}
    gen = generate_and_probe(model, tokenizer, dialogues, info, settings, max_new_tokens, recall_after, batch_size)
    references = [d.turns[-1].text for d in dialogues]
    result["generation"] = score_predictions(gen["predictions"], references)
    result["recall_probe"] = gen["recall_probe"]
    result["predictions"] = gen["predictions"]
    result["references"] = references
    write_result(result, out)
    return result


def score_files(predictions_file: str, references: list[str], out: str) -> dict:
    """Score a JSON list of generated strings against the last utterance of each dialogue of ``references``."""
    if not os.path.isfile(predictions_file):
        raise FileNotFoundError(f"{predictions_file}: predictions file not found")
    try:
        with open(predictions_file) as f:
            preds = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{predictions_file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(preds, list):
        raise ValueError(f"{predictions_file}: expected a JSON list of strings")
    refs = references_from(references)
    if len(preds) != len(refs):
        raise ValueError(f"{predictions_file}: {len(preds)} predictions but {len(refs)} dialogues in {', '.join(references)}")
    result = {"predictions_file": predictions_file, "references": list(references), "scores": score_predictions(preds, refs)}
    write_result(result, out)
    return result


def write_result(result: dict, out: str) -> None:
    """``out`` (JSON) and ``<out stem>.md`` (a metric | value table)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    rows = []
    if "perplexity" in result:
        p = result["perplexity"]
        rows.append(f"| perplexity ({p['mask']} mask, {p['dialogues']} dialogues) | {p['ppl']:.3f} |")
    if "perplexity_cache" in result:
        p = result["perplexity_cache"]
        rows.append(f"| perplexity ({p['cache']} cache, {p['positions']} positions) | {p['ppl']:.3f} |")
    g = result.get("generation", result.get("scores", {}))
    for k in ("bleu1", "bleu2", "bleu_avg", "corpus_bleu", "rouge1", "rouge2", "rougeL", "distinct1", "distinct2", "distinct3"):
        if k in g:
            rows.append(f"| {k} | {g[k]:.4f} |")
    if "recall_probe" in result:
        r = result["recall_probe"]
        rows.append(f"| recall exact match (after {r['turns_before_question']} turns, n={r['n']}) | {r['exact_match']:.4f} |")
        rows.append(f"| recall token F1 | {r['token_f1']:.4f} |")
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write("| metric | value |\n|---|---|\n" + "\n".join(rows) + "\n")
