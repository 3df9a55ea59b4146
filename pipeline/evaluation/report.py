"""``convsink eval``: perplexity under a mask, generation with a cache policy, the paper's text metrics and a
long-memory recall probe; or scoring of existing predictions without a model.


The pieces: ``pipeline.evaluation.perplexity``, ``.metrics``, ``.recall_probe``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

from data_prep.adapters import iter_dialogues
from data_prep.paths import read_json
from data_prep.schema import DataError
from pipeline.contract import DIALOGUE
from pipeline.evaluation.metrics import score_predictions
from pipeline.evaluation.perplexity import cache_perplexity, perplexity
from pipeline.evaluation.recall_probe import generate_and_probe


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


def evaluate_model(model_dir: str, data: list[str], out: str, cache: str | None = None, mask: str = DIALOGUE,
                   limit: int | None = 20, max_new_tokens: int = 32, max_tokens: int = 2048, recall_after: int = 10,
                   chat_cfg=None, batch_size: int = 8) -> dict:
    """Perplexity (under ``mask`` and through the cache), generation of each dialogue's last utterance with the
    cache policy (``cache``, else chat_cfg / convsink.json, see ``CacheSettings.resolve``), text metrics and the
    recall probe; writes ``out`` (JSON) and a Markdown table next to it."""
    from pipeline.contract import CacheSettings
    from pipeline.modeling.loader import load_chat_model

    dialogues = load_dialogues(data, limit)
    if not dialogues:
        raise ValueError(f"{', '.join(data)}: no dialogues")
    model, tokenizer, info = load_chat_model(model_dir)
    settings = CacheSettings.resolve(chat_cfg, info, policy=cache)
    ids = info.special_ids
    result = {"model": model_dir if model_dir in ("smollm2", "tiny") else os.path.abspath(model_dir), "data": list(data),
              "limit": limit, "cache": asdict(settings), "max_new_tokens": max_new_tokens,
              "perplexity": perplexity(model, tokenizer, dialogues, ids, mask, max_tokens, info.mask, info.layout),
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
    preds = read_json(predictions_file, list, "predictions file")
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
