"""Long conversations kept whole: a chat of hundreds of turns (MSC episodes chained) that fits seq_len is one row,
one document, never split; prep reports the dialogue length distribution and how many dialogues it split."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from data_prep.adapters import iter_dialogues
from data_prep.config import DataConfig
from data_prep.prep import prepare
from data_prep.shards import read_manifest, read_rows

EPISODES = 12  # MSC session-3 episodes (3 sessions each) chained into one conversation (~13k SmolLM2 tokens)
OTHERS = 12  # ordinary episodes next to it


def long_conversation_file(shared_data, path, episodes: int = EPISODES, others: int = OTHERS) -> str:
    """A JSONL of one long realistic chat (``episodes`` MSC episodes, every session of each, back to back) then
    ``others`` episodes as they are."""
    lines = open(shared_data / "msc" / "session_3_valid.jsonl").read().splitlines()
    chained = [json.loads(line) for line in lines[:episodes]]
    sessions = [s for ep in chained for s in ep.get("previous_dialogs", []) + [ep]]
    long_chat = {"personas": chained[0]["personas"], "dialog": [t for s in sessions for t in s["dialog"]]}
    with open(path, "w") as f:
        for rec in [long_chat] + [json.loads(line) for line in lines[episodes:episodes + others]]:
            f.write(json.dumps(rec) + "\n")
    return str(path)


def dialogue_lengths(path, tokenizer) -> list[int]:
    """``[BOS] u1 EoU ... un EoU`` token counts of every dialogue of ``path``, computed directly."""
    out = []
    for dialogue in iter_dialogues(str(path)):
        texts = [t.text for t in dialogue.turns]
        out.append(1 + sum(len(u) + 1 for u in tokenizer(texts, add_special_tokens=False)["input_ids"]))
    return out


@pytest.fixture(scope="module")
def long_file(shared_data, tmp_path_factory):
    return long_conversation_file(shared_data, tmp_path_factory.mktemp("long") / "long_chat.jsonl")


def _prep(long_file, out, seq_len: int, engine: str = "local") -> dict:
    prepare([long_file], str(out), DataConfig(seq_len=seq_len, engine=engine), progress=False)
    return read_manifest(str(out))


def test_a_long_conversation_that_fits_seq_len_is_one_row_one_document(long_file, tokenizer, tmp_path):
    lengths = dialogue_lengths(long_file, tokenizer)
    turns = len(json.loads(open(long_file).readline())["dialog"])
    assert 10_000 <= lengths[0] <= 16_384 and turns >= 300, (lengths[0], turns)  # a realistic long chat
    manifest = _prep(long_file, tmp_path / "whole", 16_384)
    c = manifest["counts"]
    assert c["dialogues_split"] == 0 and c["windows"] == c["dialogues"] == len(lengths)
    rows = read_rows(str(tmp_path / "whole"), ("dialogue",)).to_pylist()
    docs = [(r, d) for r in rows for d in range(len(r["dialogue_ids"]))]
    found = [(r, d) for r, d in docs if int(np.sum(np.asarray(r["doc_ids"]) == d)) == lengths[0]]
    assert len(found) == 1, "the whole conversation in one document of one row"
    row, d = found[0]
    name = row["dialogue_ids"][d]
    assert [n for r, k in docs for n in [r["dialogue_ids"][k]] if n == name] == [name], "no second piece of it"
    utt = np.asarray(row["utt_ids"])[np.asarray(row["doc_ids"]) == d]
    assert utt[0] == 0 and utt[-1] == turns and np.all(np.diff(utt) >= 0)
    assert set(utt.tolist()) == set(range(turns + 1)), "utterance ids 0..n, all in this one document"


def test_a_long_conversation_longer_than_seq_len_is_split_and_counted(long_file, tokenizer, tmp_path):
    lengths = dialogue_lengths(long_file, tokenizer)
    manifest = _prep(long_file, tmp_path / "split", 2048)
    c = manifest["counts"]
    assert c["dialogues_split"] == sum(n > 2048 for n in lengths) >= 1
    assert c["windows"] > c["dialogues"] == len(lengths)
    assert c["windows"] - c["dialogues"] >= lengths[0] // 2048  # the long chat alone needs ceil(n/2048) windows


@pytest.mark.parametrize("seq_len", [2048, 16_384])
def test_dialogue_length_distribution_matches_a_direct_computation(long_file, tokenizer, tmp_path, seq_len):
    lengths = np.sort(np.asarray(dialogue_lengths(long_file, tokenizer)))
    dist = _prep(long_file, tmp_path / "d", seq_len)["counts"]["dialogue_tokens"]
    n = len(lengths)
    nearest_rank = {f"p{q}": int(lengths[int(np.ceil(q / 100 * n)) - 1]) for q in (50, 90, 99)}
    assert dist == {"min": int(lengths[0]), **nearest_rank, "max": int(lengths[-1]),
                    "histogram": _power_of_two_histogram(lengths)}
    assert dist["max"] == lengths.max() >= 10_000  # whole dialogues, not windows, even when split


def _power_of_two_histogram(lengths) -> dict:
    """{"<=2^k": dialogues whose length is in (2^(k-1), 2^k]}, smallest bucket first."""
    out: dict = {}
    for n in sorted(lengths):
        key = f"<={1 << max(int(n) - 1, 0).bit_length()}"
        out[key] = out.get(key, 0) + 1
    return out


@pytest.mark.slow
def test_both_engines_give_the_same_split_counts_and_distribution(long_file, tmp_path):
    local = _prep(long_file, tmp_path / "local", 2048)["counts"]
    ray = _prep(long_file, tmp_path / "ray", 2048, engine="ray")["counts"]
    keys = ("dialogue_tokens", "dialogues_split", "windows", "dialogues")
    assert {k: ray[k] for k in keys} == {k: local[k] for k in keys}


def test_prep_summary_has_one_line_with_the_distribution_and_the_split_count(long_file, tmp_path, capsys):
    prepare([long_file], str(tmp_path / "s"), DataConfig(seq_len=2048, engine="local"), progress=True)
    c = read_manifest(str(tmp_path / "s"))["counts"]
    d = c["dialogue_tokens"]
    # the windows of the split dialogues, counted from the shards: documents whose dialogue has more than one
    pieces = Counter(name for r in read_rows(str(tmp_path / "s"), ("dialogue",)).to_pylist() for name in r["dialogue_ids"])
    split_windows = sum(n for n in pieces.values() if n > 1)
    assert sum(n > 1 for n in pieces.values()) == c["dialogues_split"] and 0 < c["dialogues_split"] < c["dialogues"]
    assert split_windows != c["windows"]  # whole dialogues too: the count of all windows would be another number
    lines = [line for line in capsys.readouterr().out.splitlines() if "dialogue tokens" in line]
    assert lines == [f"prep: dialogue tokens min {d['min']:,} p50 {d['p50']:,} p90 {d['p90']:,} p99 {d['p99']:,} "
                     f"max {d['max']:,}; {c['dialogues_split']:,} of {c['dialogues']:,} dialogues split "
                     f"(seq_len 2,048) into {split_windows:,} windows"]
