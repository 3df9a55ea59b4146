"""Generation metrics (``score_predictions``), references = the last utterance of each dialogue, predictions with a
trailing ``</s>`` / ``<|im_end|>`` stripped; every score on sacrebleu's default 13a tokenization, case-sensitive:
- BLEU-1 / BLEU-2: sacrebleu CORPUS BLEU with ``max_ngram_order`` 1 / 2, i.e. brevity penalty x the geometric
  mean of the corpus-level modified 1..n-gram precisions (cumulative, not individual n-gram), on 0-100;
  BLEU-avg: their mean; ``corpus_bleu``: sacrebleu's default 4-gram corpus BLEU.
- ROUGE-1 / ROUGE-2 / ROUGE-L: rouge-score F1 (its default tokenizer, no stemming), averaged over pairs, x100.
- Distinct-n: distinct n-grams / all n-grams over all predictions (whitespace tokens)."""

from __future__ import annotations


def strip_eos(text: str) -> str:
    text = text.strip()
    for tail in ("</s>", "<|im_end|>"):
        if text.endswith(tail):
            text = text[: -len(tail)].rstrip()
    return text


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
