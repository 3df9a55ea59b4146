"""`convsink bench method --model tiny`: the real command end to end (split, prep, SD memory + dialogue stages,
SD-no-memory, Dense under the causal mask, every model + cache evaluated), then what its report must hold: the table
of every model x cache, each cache's K/V size per point as its policy defines it, the equal-size baselines holding
exactly SD's positions, the perplexity protocol of method.md §4, the PNG and command; a second call resumes (every
phase skipped, no training); a call with another setting on the same folder is refused in one line.

The equal-size cache itself (``SDMatchedWindow``) is checked on a real conversation: which positions it keeps.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from pipeline.contract import CAUSAL, DENSE_CACHE, DIALOGUE, STREAMINGDIALOGUE_CACHE
from tests.repo import REPO

PAIRS = [("SD", STREAMINGDIALOGUE_CACHE), ("SD-no-memory", STREAMINGDIALOGUE_CACHE), ("Dense", DENSE_CACHE),
         ("Dense", "streamingllm_same_size"), ("Dense", "local_same_size")]


def bench(out, *extra):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "method", "--model", "tiny", "--out", str(out),
                           *extra], cwd=REPO, capture_output=True, text=True, timeout=500)


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "method"
    proc = bench(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, json.loads((out / "bench_method.json").read_text())


def sd_positions(lengths: list[int], T: int) -> int:
    """method.md §3: BOS + the EoU of each of the T finished utterances + the tokens of the last two utterances."""
    return 1 + T + lengths[T - 1] + (lengths[T - 2] if T >= 2 else 0)


def bytes_per_position(model_dir) -> int:
    """K and V of every layer, fp32."""
    c = json.loads((model_dir / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim * 4


@pytest.mark.slow
def test_the_table_has_every_model_and_cache_and_the_files_are_written(tiny_bench):
    out, proc, r = tiny_bench
    from pipeline.bench.method_report import TABLE_HEADER

    assert [(row["model"], row["cache"]) for row in r["table"]] == PAIRS
    for row in r["table"]:
        assert list(row) == list(TABLE_HEADER)
        assert all(math.isfinite(row[c]) for c in TABLE_HEADER[2:]), row
        assert row["held-apart ppl"] > 1 and row["ms/token"] > 0
    md = (out / "bench_method.md").read_text().splitlines()
    header = md.index("| " + " | ".join(TABLE_HEADER) + " |")
    body = md[header + 2:header + 2 + len(PAIRS)]
    assert [tuple(c.strip() for c in line.strip("|").split("|")[:2]) for line in body] == PAIRS
    assert all(line.count("|") == len(TABLE_HEADER) + 1 for line in body)
    assert (out / "bench_method.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    command = (out / "command.txt").read_text().strip()
    assert command.startswith("convsink bench method") and "--model tiny" in command and md[-1].strip() == command
    held = r["split"]
    assert held["heldout_dialogues"] == 4 and held["heldout_sources"] == {"msc_session_3_test": 2, "personachat_held_out": 2}
    train_ids = {json.loads(line)["id"].split(":", 1)[1] for line in open(held["train_file"])}
    assert not train_ids & {json.loads(line)["id"].split(":", 1)[1] for line in open(held["heldout_file"])}
    budget = {json.loads((out / d / "config.json").read_text())["train"]["max_steps"]
              for d in ("train-sd", "train-sd-no-memory", "train-dense")}
    assert budget == {r["setting"]["steps"]}, "the same dialogue-stage budget for every model"
    assert json.loads((out / "train-dense" / "config.json").read_text())["model"]["mask"]["dialogue_kind"] == CAUSAL
    assert json.loads((out / "train-sd" / "config.json").read_text())["train"]["init_from"] == str(out / "export-sd-memory")
    assert [t["met"] == (t["sd_over_other"] <= 1.05 if i == 0 else t["sd_over_other"] < 1)
            for i, t in enumerate(r["target_checks"])] == [True] * 4


@pytest.mark.slow
def test_every_cache_holds_what_its_policy_defines_and_the_baselines_hold_sds_positions(tiny_bench):
    out, _, r = tiny_bench
    per_position = bytes_per_position(out / "export-dense")
    by = {(x["model"], x["cache"]): x for x in r["results"]}
    sd = {d["dialogue_id"]: d for d in by["SD", STREAMINGDIALOGUE_CACHE]["dialogues"]}
    checked = 0
    for (model, cache), result in by.items():
        assert len(result["dialogues"]) == 4, (model, cache)
        for d in result["dialogues"]:
            L = d["utterance_tokens"]
            assert [p["utterances"] for p in d["points"]] == list(range(1, len(L) + 1))
            for p in d["points"]:
                T = p["utterances"]
                if cache == DENSE_CACHE:
                    expected = 1 + sum(n + 1 for n in L[:T])
                    assert p["positions"] == p["conversation_tokens"] == expected
                elif cache == STREAMINGDIALOGUE_CACHE:
                    assert p["positions"] == sd_positions(L, T)
                else:  # the equal-size baselines: SD's own measured count at the same point of the same dialogue
                    assert p["positions"] == sd[d["dialogue_id"]]["points"][T - 1]["positions"] == sd_positions(L, T)
                assert p["kv_bytes"] == p["positions"] * per_position
                checked += 1
    assert checked > 5 * 4 * 3
    dense_last = [d["points"][-1]["positions"] for d in by["Dense", DENSE_CACHE]["dialogues"]]
    sd_last = [d["points"][-1]["positions"] for d in sd.values()]
    assert all(a > b for a, b in zip(dense_last, sd_last)), "the tiny bench's dialogues are long enough to evict"
    for cache in ("streamingllm_same_size", "local_same_size"):
        assert r["equal_size"][cache]["max_abs_difference"] == 0
        assert r["equal_size"][cache]["points"] == sum(len(d["points"]) for d in sd.values())


@pytest.mark.slow
def test_cache_perplexity_follows_method_md_protocol(tiny_bench, one_thread):
    """Teacher-forced through the StreamingDialogue cache = one forward under the dialogue mask; through the dense
    cache = under the causal mask (absolute positions: the streaming equivalence), on the same held-apart dialogues."""
    out, _, r = tiny_bench
    from pipeline.evaluation.perplexity import perplexity
    from pipeline.evaluation.report import load_dialogues
    from pipeline.modeling.loader import load_chat_model

    dialogues = load_dialogues([r["split"]["heldout_file"]])
    by = {(x["model"], x["cache"]): x["perplexity"]["ppl"] for x in r["results"]}
    for model, folder, cache, mask in (("SD", "export-sd", STREAMINGDIALOGUE_CACHE, DIALOGUE),
                                       ("Dense", "export-dense", DENSE_CACHE, CAUSAL)):
        m, tok, info = load_chat_model(str(out / folder))
        full = perplexity(m, tok, dialogues, info.special_ids, mask, r["setting"]["max_tokens"])
        assert full["dialogues"] == 4
        assert by[model, cache] == pytest.approx(full["ppl"], rel=1e-4), (model, cache)


@pytest.mark.slow
def test_a_second_call_resumes_without_training_and_another_setting_is_refused(tiny_bench):
    out, first, r = tiny_bench
    assert "0 of 11 phases skipped" in first.stdout
    before = {d: os.path.getmtime(out / d / "checkpoints" / "latest") for d in
              ("train-sd-memory", "train-sd", "train-sd-no-memory", "train-dense")}
    again = bench(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "11 of 11 phases skipped" in again.stdout and "train dialogue stage" not in again.stdout
    assert before == {d: os.path.getmtime(out / d / "checkpoints" / "latest") for d in before}
    r2 = json.loads((out / "bench_method.json").read_text())
    assert r2["table"] == r["table"] and all(p["status"].startswith("skipped") for p in r2["phases"])
    other = bench(out, "--steps", "3")
    assert other.returncode == 2
    assert other.stderr.strip().splitlines() == [other.stderr.strip()]
    assert str(out / "setting.json") in other.stderr and "steps" in other.stderr


def test_the_equal_size_cache_keeps_sinks_and_the_most_recent_positions(one_thread):
    """On a real conversation: after every utterance the StreamingLLM (4 sinks) and local (no sink) caches hold as many
    positions as the StreamingDialogue cache, namely the first s and the most recent ones."""
    from data_prep.tokenizer_loading import encode_utterance
    from pipeline.bench.method_eval import LOCAL_MATCHED, STREAMINGLLM_MATCHED, make_conversation
    from pipeline.modeling.loader import load_chat_model

    model, tok, info = load_chat_model("tiny")
    texts = ["hello there how are you today", "fine thanks and you", "i just got back from a long run in the park",
             "nice do you run often", "every morning before work", "that is impressive", "thanks it keeps me sane"]
    utts = [encode_utterance(tok, t) for t in texts]
    convs = {c: make_conversation(model, info, c, 4) for c in (STREAMINGDIALOGUE_CACHE, STREAMINGLLM_MATCHED, LOCAL_MATCHED)}
    evicted = False
    for T, u in enumerate(utts, start=1):
        for conv in convs.values():
            conv.add_utterance(u, all_logits=False)
        held = len(convs[STREAMINGDIALOGUE_CACHE].store)
        total = convs[STREAMINGDIALOGUE_CACHE].next_position
        assert held == sd_positions([len(x) for x in utts], T)
        for case, sinks in ((STREAMINGLLM_MATCHED, 4), (LOCAL_MATCHED, 0)):
            kept = convs[case].store.positions.tolist()
            expected = list(range(total)) if held >= total else list(range(sinks)) + list(range(total - held + sinks, total))
            assert kept == expected, (case, T)
        evicted |= held < total
    assert evicted, "the conversation is long enough to evict"
