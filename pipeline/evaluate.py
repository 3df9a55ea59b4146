"""``convsink eval``: perplexity under a mask, generation with a cache policy, and the paper's text metrics.

Metric definitions (all on whitespace tokens of the detokenized strings):
- BLEU-1 / BLEU-2: sacrebleu corpus BLEU with ``max_ngram_order`` 1 / 2 (cumulative, with brevity penalty);
  BLEU-avg: their mean; corpus BLEU: sacrebleu's default 4-gram corpus BLEU.
- ROUGE-1 / 2 / L: rouge-score F1 (with stemming off), averaged over pairs.
- Distinct-n: distinct n-grams / all n-grams over all predictions.
Perplexity (method.md §4): per dialogue, the mean NLL over the tokens of utterances 2..n (their EoUs included),
then the mean over dialogues; ``ppl = exp(that mean)``.
"""

from __future__ import annotations

import json
import math
import os

import torch

from data_prep.adapters import iter_dialogues
from data_prep.schema import DataError


def strip_eos(text: str) -> str:
    text = text.strip()
    for tail in ("</s>", "<|im_end|>"):
        if text.endswith(tail):
            text = text[: -len(tail)].rstrip()
    return text


def load_dialogues(paths: list[str], limit: int | None = None) -> list:
    out = []
    for p in paths:
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


def distinct_n(texts: list[str], n: int) -> float:
    grams, total = set(), 0
    for t in texts:
        toks = t.split()
        for i in range(len(toks) - n + 1):
            grams.add(tuple(toks[i:i + n]))
            total += 1
    return len(grams) / total if total else 0.0


def score_predictions(predictions: list[str], references: list[str]) -> dict:
    import sacrebleu
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    preds = [strip_eos(p) for p in predictions]
    b1 = BLEU(max_ngram_order=1).corpus_score(preds, [references]).score
    b2 = BLEU(max_ngram_order=2).corpus_score(preds, [references]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    rouge = {k: 0.0 for k in ("rouge1", "rouge2", "rougeL")}
    for p, r in zip(preds, references):
        s = scorer.score(r, p)
        for k in rouge:
            rouge[k] += s[k].fmeasure / len(preds)
    return {"n": len(preds), "bleu1": b1, "bleu2": b2, "bleu_avg": (b1 + b2) / 2,
            "corpus_bleu": sacrebleu.corpus_bleu(preds, [references]).score,
            "rouge1": 100 * rouge["rouge1"], "rouge2": 100 * rouge["rouge2"], "rougeL": 100 * rouge["rougeL"],
            "distinct1": distinct_n(preds, 1), "distinct2": distinct_n(preds, 2), "distinct3": distinct_n(preds, 3)}


@torch.no_grad()
def perplexity(model, tokenizer, dialogues: list, ids, mask: str, max_tokens: int, mask_params: dict | None = None) -> dict:
    """method.md §4 perplexity of each dialogue (truncated to ``max_tokens`` at an utterance boundary) under ``mask``."""
    from data_prep.tokenize import layout_dialogue

    from .config import MaskConfig, ModelConfig
    from .data import targets_from_labels
    from .losses import token_nll
    from .model import forward_batch

    per_dialogue, tokens = [], 0
    cfg = ModelConfig(attention="dense", mask=MaskConfig(**(mask_params or {})))
    for d in dialogues:
        utts = tokenizer([t.text for t in d.turns], add_special_tokens=False)["input_ids"]
        while utts and 1 + sum(len(u) + 1 for u in utts) > max_tokens:
            utts = utts[:-1]
        if len(utts) < 2:
            continue
        lay = layout_dialogue(d.id, utts, ids)
        T = len(lay)
        batch = {"input_ids": torch.tensor([lay.input_ids]), "position_ids": torch.arange(T)[None],
                 "doc_ids": torch.zeros(1, T, dtype=torch.long), "utt_ids": torch.tensor([lay.utt_ids]),
                 "eou": torch.tensor([lay.eou]), "blk": torch.tensor([lay.blk]), "mask_kind": [mask]}
        labels = torch.tensor([[x if u >= 2 else -100 for x, u in zip(lay.input_ids, lay.utt_ids)]])
        logits = forward_batch(model, batch, cfg, impl="dense")
        nll, valid = token_nll(logits, targets_from_labels(labels))
        per_dialogue.append(float(nll.sum() / valid.sum()))
        tokens += int(valid.sum())
    mean = sum(per_dialogue) / max(len(per_dialogue), 1)
    return {"mask": mask, "dialogues": len(per_dialogue), "tokens": tokens, "mean_nll": mean, "ppl": math.exp(mean)}


def token_f1(pred: str, ref: str) -> float:
    p, r = pred.lower().split(), ref.lower().split()
    common = sum(min(p.count(w), r.count(w)) for w in set(p))
    if not p or not r or not common:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


RECALL_PROMPT = "Can you repeat exactly the first thing that was said in this conversation?"


def generate_and_probe(model, tokenizer, dialogues: list, info: dict, cache: str, max_new_tokens: int,
                       recall_after: int, chat_cfg) -> dict:
    """Generate the last utterance of each dialogue with ``cache``; then a recall probe: after ``recall_after``
    turns, ask for the first utterance (exact match and token F1)."""
    from .cache import Conversation

    predictions, recall = [], []
    for d in dialogues:
        conv = Conversation(model, info["bos_token_id"], info["eou_token_id"], cache, positions=chat_cfg.positions,
                            sink_tokens=chat_cfg.sink_tokens, window=chat_cfg.window)
        logits = conv.bos_logits
        for t in d.turns[:-1]:
            logits = conv.add_utterance(tokenizer(t.text, add_special_tokens=False)["input_ids"])[-1]
        predictions.append(tokenizer.decode(conv.generate(logits, max_new_tokens), skip_special_tokens=True))
        if len(d.turns) > recall_after:
            probe = Conversation(model, info["bos_token_id"], info["eou_token_id"], cache, positions=chat_cfg.positions,
                                 sink_tokens=chat_cfg.sink_tokens, window=chat_cfg.window)
            for t in d.turns[:recall_after]:
                probe.add_utterance(tokenizer(t.text, add_special_tokens=False)["input_ids"])
            logits = probe.add_utterance(tokenizer(RECALL_PROMPT, add_special_tokens=False)["input_ids"])[-1]
            answer = tokenizer.decode(probe.generate(logits, max_new_tokens), skip_special_tokens=True).strip()
            first = d.turns[0].text.strip()
            recall.append({"exact": float(answer == first), "f1": token_f1(answer, first)})
    probe_summary = {"turns": recall_after, "n": len(recall),
                     "exact_match": sum(r["exact"] for r in recall) / max(len(recall), 1),
                     "token_f1": sum(r["f1"] for r in recall) / max(len(recall), 1)}
    return {"predictions": predictions, "recall_probe": probe_summary}


def evaluate_model(model_dir: str, data: list[str], out: str, cache: str = "streamingdialogue", mask: str = "dialogue",
                   limit: int | None = 20, max_new_tokens: int = 32, max_tokens: int = 2048, recall_after: int = 10,
                   chat_cfg=None) -> dict:
    from data_prep.tokenizer import SpecialIds

    from .chat import load_chat_model
    from .config import ChatConfig

    chat_cfg = chat_cfg or ChatConfig()
    model, tokenizer, info = load_chat_model(model_dir)
    ids = SpecialIds(info["bos_token_id"], info["eou_token_id"], info["pad_token_id"])
    dialogues = load_dialogues(data, limit)
    result = {"model": os.path.abspath(model_dir), "data": data, "cache": cache, "limit": limit,
              "perplexity": perplexity(model, tokenizer, dialogues, ids, mask, max_tokens, info.get("mask"))}
    gen = generate_and_probe(model, tokenizer, dialogues, info, cache, max_new_tokens, recall_after, chat_cfg)
    result["generation"] = score_predictions(gen["predictions"], [d.turns[-1].text for d in dialogues])
    result["recall_probe"] = gen["recall_probe"]
    result["predictions"] = gen["predictions"]
    write_result(result, out)
    return result


def write_result(result: dict, out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    rows = []
    if "perplexity" in result:
        p = result["perplexity"]
        rows.append(f"| perplexity ({p['mask']} mask) | {p['ppl']:.3f} |")
    g = result.get("generation", result.get("scores", {}))
    for k in ("bleu1", "bleu2", "bleu_avg", "corpus_bleu", "rouge1", "rouge2", "rougeL", "distinct1", "distinct2", "distinct3"):
        if k in g:
            rows.append(f"| {k} | {g[k]:.4f} |")
    if "recall_probe" in result:
        r = result["recall_probe"]
        rows.append(f"| recall exact match (after {r['turns']} turns) | {r['exact_match']:.4f} |")
        rows.append(f"| recall token F1 | {r['token_f1']:.4f} |")
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write("| metric | value |\n|---|---|\n" + "\n".join(rows) + "\n")
