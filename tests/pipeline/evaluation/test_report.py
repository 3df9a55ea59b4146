"""Scoring equals sacrebleu / rouge-score called directly; perplexity follows method.md §4 (checked against a
hand computation); the cache perplexity of streamingdialogue equals the dialogue-mask perplexity; batched
generation equals one-by-one; ``convsink eval`` writes JSON + Markdown."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.repo import REPO

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only cost here


def test_scores_equal_direct_library_calls(shared_data, tmp_path):
    import sacrebleu
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    preds_file = shared_data / "reference_outputs" / "streamingdialogue_personachat_generated.json"
    out = tmp_path / "scores.json"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "eval", "--predictions", str(preds_file), "--references",
                           str(shared_data / "personachat" / "valid.json"), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(out.read_text())["scores"]
    # the references, read independently of convsink: last turn of each dialogue, in file order
    raw = json.loads((shared_data / "personachat" / "valid.json").read_text())
    refs = [sorted(turns, key=lambda t: t["turn_id"])[-1]["text"].strip() for turns in raw.values()]
    preds = [p[:-len("</s>")].strip() if p.endswith("</s>") else p.strip() for p in json.loads(preds_file.read_text())]
    assert scores["n"] == len(refs) == 1000
    assert scores["bleu1"] == BLEU(max_ngram_order=1).corpus_score(preds, [refs]).score
    assert scores["bleu2"] == BLEU(max_ngram_order=2).corpus_score(preds, [refs]).score
    assert scores["bleu_avg"] == pytest.approx((scores["bleu1"] + scores["bleu2"]) / 2)
    assert scores["corpus_bleu"] == sacrebleu.corpus_bleu(preds, [refs]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    direct = [scorer.score(r, p) for p, r in zip(preds, refs)]
    for key in ("rouge1", "rouge2", "rougeL"):
        assert scores[key] == pytest.approx(100 * sum(d[key].fmeasure for d in direct) / len(direct), abs=1e-9)
    for n in (1, 2, 3):
        grams = [tuple(p.split()[i:i + n]) for p in preds for i in range(len(p.split()) - n + 1)]
        assert scores[f"distinct{n}"] == pytest.approx(len(set(grams)) / len(grams))
    md = (tmp_path / "scores.md").read_text()
    assert md.startswith("| metric | value |") and f"| bleu1 | {scores['bleu1']:.4f} |" in md
    print({k: round(v, 3) for k, v in scores.items()})


def test_score_files_rejects_a_length_mismatch(shared_data, tmp_path):
    from pipeline.evaluation.report import score_files

    preds = tmp_path / "p.json"
    preds.write_text(json.dumps(["hello"] * 3))
    with pytest.raises(ValueError, match="3 predictions but 1000 dialogues"):
        score_files(str(preds), [str(shared_data / "personachat" / "valid.json")], str(tmp_path / "o.json"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pipeline.modeling.loader import export_random_model, load_chat_model

    path = export_random_model(str(tmp_path_factory.mktemp("eval") / "tiny"))
    return (path,) + load_chat_model(path)


@pytest.fixture(scope="module")
def dialogues(shared_data):
    from pipeline.evaluation.report import load_dialogues

    return load_dialogues([str(shared_data / "personachat" / "valid.json")], limit=3)


def test_perplexity_is_the_mean_of_per_dialogue_means(tiny, dialogues):
    from data_prep.layout import layout_dialogue
    from pipeline.attention.masks import dense_mask
    from pipeline.attention.registry import DenseMaskAttention
    from pipeline.contract import CacheSettings
    from pipeline.evaluation.perplexity import cache_perplexity, perplexity

    _, model, tok, info = tiny
    ids = info.special_ids
    means, total, count = [], 0.0, 0
    for d in dialogues:  # by hand: utterances 2..n with their EoUs, mean per dialogue
        lay = layout_dialogue(d.id, [tok(t.text, add_special_tokens=False)["input_ids"] for t in d.turns], ids)
        meta = {"doc_ids": torch.zeros(1, len(lay), dtype=torch.long), "utt_ids": torch.tensor([lay.utt_ids]),
                "eou": torch.tensor([lay.eou])}
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([lay.input_ids]), position_ids=torch.arange(len(lay))[None],
                           convsink_attn=DenseMaskAttention(dense_mask("dialogue", meta))).logits[0]
        logp = torch.log_softmax(logits.double(), -1)
        nll = [-float(logp[t - 1, lay.input_ids[t]]) for t in range(1, len(lay)) if lay.utt_ids[t] >= 2]
        means.append(sum(nll) / len(nll))
        total, count = total + sum(nll), count + len(nll)
    want = sum(means) / len(means)

    # the model's mask params naming a baseline (dialogue_kind) must not change what --mask dialogue computes
    got = perplexity(model, tok, dialogues, ids, "dialogue", mask_params={"dialogue_kind": "causal"})
    assert got["dialogues"] == 3 and got["tokens"] == count
    assert got["mean_nll"] == pytest.approx(want, rel=1e-5) and got["ppl"] == pytest.approx(math.exp(want), rel=1e-5)
    assert got["token_weighted_nll"] == pytest.approx(total / count, rel=1e-5)
    causal = perplexity(model, tok, dialogues, ids, "causal")
    assert abs(causal["mean_nll"] - want) > 1e-4  # the mask matters

    # through the caches: streamingdialogue (absolute) = the dialogue mask; dense = causal
    sd = cache_perplexity(model, tok, dialogues, info, CacheSettings("streamingdialogue"))
    assert sd["mean_nll"] == pytest.approx(want, rel=1e-5)
    dense = cache_perplexity(model, tok, dialogues, info, CacheSettings("dense"))
    assert dense["mean_nll"] == pytest.approx(causal["mean_nll"], rel=1e-5)


def test_batched_generation_equals_one_by_one(tiny, dialogues):
    from pipeline.contract import CacheSettings
    from pipeline.evaluation.recall_probe import generate_and_probe

    _, model, tok, info = tiny
    for policy in ("streamingdialogue", "recompute"):
        s = CacheSettings(policy, window=64)
        one = generate_and_probe(model, tok, dialogues, info, s, 5, recall_after=4, batch_size=1)
        many = generate_and_probe(model, tok, dialogues, info, s, 5, recall_after=4, batch_size=3)
        assert one["predictions"] == many["predictions"] and len(one["predictions"]) == 3
        assert [i["answer"] for i in one["recall_probe"]["items"]] == [i["answer"] for i in many["recall_probe"]["items"]]
        assert one["recall_probe"]["n"] == 3


def test_eval_cli_writes_perplexity_generation_and_probe(tiny, shared_data, tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "eval.json"
    rc = main(["eval", "--model", tiny[0], "--data", str(shared_data / "msc" / "session_2_test.jsonl"), "--limit", "2",
               "--cache", "streamingllm", "--recall-after", "6", "--out", str(out), "chat.max_new_tokens=4"])
    assert rc == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    assert r["perplexity"]["dialogues"] == 2 and r["perplexity"]["ppl"] > 1 and "protocol" in r["perplexity"]
    assert r["perplexity_cache"]["cache"] == "streamingllm" and r["cache"]["policy"] == "streamingllm"
    assert len(r["predictions"]) == 2 and r["generation"]["n"] == 2 and len(r["references"]) == 2
    assert r["recall_probe"]["n"] == 2 and r["recall_probe"]["turns_before_question"] == 6
    md = (tmp_path / "eval.md").read_text()
    assert "perplexity (dialogue mask" in md and "recall token F1" in md
