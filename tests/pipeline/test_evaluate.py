"""Scoring the StreamingDialogue authors' PersonaChat outputs gives exactly what sacrebleu and rouge-score give."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_scores_equal_direct_library_calls(shared_data, tmp_path):
    import sacrebleu
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    preds_file = shared_data / "reference_outputs" / "streamingdialogue_personachat_generated.json"
    out = tmp_path / "scores.json"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "eval", "--predictions", str(preds_file), "--references",
                           str(shared_data / "personachat" / "valid.json"), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(out.read_text())["scores"]
    # the references, read independently of convsink: last turn of each dialogue, in file order
    raw = json.loads((shared_data / "personachat" / "valid.json").read_text())
    refs = [sorted(turns, key=lambda t: t["turn_id"])[-1]["text"].strip() for turns in raw.values()]
    preds = [p[:-len("</s>")].strip() if p.endswith("</s>") else p.strip() for p in json.loads(preds_file.read_text())]
    assert scores["n"] == len(refs) == 1000
    assert scores["bleu1"] == BLEU(max_ngram_order=1).corpus_score(preds, [refs]).score
    assert scores["bleu2"] == BLEU(max_ngram_order=2).corpus_score(preds, [refs]).score
    assert scores["corpus_bleu"] == sacrebleu.corpus_bleu(preds, [refs]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    direct = [scorer.score(r, p) for p, r in zip(preds, refs)]
    for key in ("rouge1", "rouge2", "rougeL"):
        assert scores[key] == pytest.approx(100 * sum(d[key].fmeasure for d in direct) / len(direct), abs=1e-9)
    grams = [tuple(p.split()[i:i + 2]) for p in preds for i in range(len(p.split()) - 1)]
    assert scores["distinct2"] == pytest.approx(len(set(grams)) / len(grams))
    assert (tmp_path / "scores.md").read_text().startswith("| metric | value |")
    print({k: round(v, 3) for k, v in scores.items()})


def test_model_eval_writes_perplexity_generation_and_probe(tmp_path, shared_data, tokenizer):
    import torch

    from data_prep.tokenizer import prepare_tokenizer
    from pipeline.config import ModelConfig
    from pipeline.model import build_model

    torch.manual_seed(0)
    ids = prepare_tokenizer(tokenizer)
    model = build_model(ModelConfig(), len(tokenizer), ids)
    model.config._attn_implementation = "sdpa"
    model_dir = tmp_path / "m"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / "convsink.json").write_text(json.dumps({"bos_token_id": ids.bos, "eou_token_id": ids.eou, "pad_token_id": ids.pad}))
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "eval", "--model", str(model_dir), "--data",
                           str(shared_data / "msc" / "session_2_test.jsonl"), "--limit", "2", "--out", str(out),
                           "chat.max_new_tokens=4"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["perplexity"]["dialogues"] == 2 and r["perplexity"]["ppl"] > 1
    assert len(r["predictions"]) == 2 and r["generation"]["n"] == 2
    assert r["recall_probe"]["n"] == 2
