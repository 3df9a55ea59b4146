"""Data preparation over the real dialogues: nothing lost, nothing duplicated, counts that add up; fingerprints;
bad input stops with FILE:LINE or is quarantined with counts (on both engines)."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict

import pyarrow.parquet as pq
import pytest

from data_prep.adapters import iter_dialogues
from data_prep.config import DataConfig
from data_prep.prep import prepare
from data_prep.schema import DataError
from data_prep.shards import read_manifest, read_rows
from data_prep.windows import plan_windows

SEQ_LEN = 1024  # MSC session-3 episodes are longer: some dialogues are split


@pytest.fixture(scope="module")
def prepared(all_inputs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prep") / "shards")
    prepare(all_inputs, out, DataConfig(seq_len=SEQ_LEN, engine="local"), progress=False)
    return out


def _windows_of(table, eou_id):
    """{dialogue name: Counter of windows}, a window being the tuple of its utterances (token tuples)."""
    found = defaultdict(Counter)
    for row in table.to_pylist():
        assert len(row["input_ids"]) == SEQ_LEN
        docs = row["doc_ids"]
        real = [d for d in docs if d >= 0]
        assert docs[:len(real)] == real and real == sorted(real), "documents back to back, padding only at the end"
        assert len(real) <= SEQ_LEN
        for d, name in enumerate(row["dialogue_ids"]):
            idx = [i for i, x in enumerate(docs) if x == d]
            assert idx == list(range(idx[0], idx[0] + len(idx))), "a document is contiguous"
            assert [row["position_ids"][i] for i in idx] == list(range(len(idx))), "positions restart at 0"
            assert row["utt_ids"][idx[0]] == 0 and not row["eou"][idx[0]], "each window starts with BOS"
            utterances, current = [], []
            for i in idx[1:]:
                if row["eou"][i]:
                    assert row["input_ids"][i] == eou_id and row["utt_ids"][i] == len(utterances) + 1
                    utterances.append(tuple(current))
                    current = []
                else:
                    current.append(row["input_ids"][i])
            assert current == [], "a window ends with an EoU"
            found[name][tuple(utterances)] += 1
    return found


@pytest.mark.slow
def test_every_utterance_exactly_once_in_order_split_only_as_documented(prepared, all_inputs, tokenizer):
    manifest = read_manifest(prepared)
    found = _windows_of(read_rows(prepared, ("dialogue",)), manifest["tokenizer"]["eou_id"])
    expected, split = defaultdict(Counter), 0
    for path in all_inputs:
        for d in iter_dialogues(path):
            utts = [tuple(u) for u in tokenizer([t.text for t in d.turns], add_special_tokens=False)["input_ids"]]
            windows = plan_windows([len(u) for u in utts], SEQ_LEN)
            split += len(windows) > 1
            for a, b in windows:
                expected[f"{os.path.basename(path)}:{d.id}"][tuple(utts[a:b])] += 1
    assert found == expected
    assert split == manifest["counts"]["split_dialogues"] > 0


@pytest.mark.slow
def test_manifest_counts_equal_a_recount(prepared, all_inputs):
    m = read_manifest(prepared)
    c = m["counts"]
    rows = read_rows(prepared, ("dialogue",)).to_pylist()
    tokens = sum(sum(1 for d in r["doc_ids"] if d >= 0) for r in rows)
    windows = sum(len(r["dialogue_ids"]) for r in rows)
    assert c["sequences"] == len(rows) == m["packing"]["dialogue"]["sequences"]
    assert c["tokens_out"] == tokens == c["tokens_in"] + c["split_bos_tokens"]
    assert c["windows"] == windows and c["split_bos_tokens"] == windows - c["dialogues"]
    assert c["dialogues"] == len({n for r in rows for n in r["dialogue_ids"]})
    assert c["utterances"] == sum(sum(r["eou"]) for r in rows)
    assert c["records"] == c["dialogues"] + c["rejected"] == sum(i["records"] for i in m["inputs"]) == 3002
    assert c["pad_tokens"] == len(rows) * SEQ_LEN - tokens
    assert c["packing_efficiency"] == pytest.approx(tokens / (len(rows) * SEQ_LEN), abs=1e-6)
    for s in m["shards"]:
        path = os.path.join(prepared, s["file"])
        assert s["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
        t = pq.read_table(path)
        assert s["rows"] == t.num_rows and s["tokens"] == sum(sum(1 for d in r if d >= 0) for r in t["doc_ids"].to_pylist())
    for i, path in zip(m["inputs"], all_inputs):
        assert i["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest() and i["kept"] == i["records"]
    assert os.path.isdir(os.path.join(prepared, "tokenizer")) and not os.path.exists(os.path.join(prepared, "rejected.jsonl"))


def _small(tmp_path, n=6, name="d.jsonl"):
    src = tmp_path / name
    src.write_text("".join(json.dumps({"id": f"g{i}", "turns": [{"speaker": "A", "text": f"hello number {i}"},
                                                                {"speaker": "B", "text": "hi there"}]}) + "\n" for i in range(n)))
    return src


def test_fingerprint_reuses_and_changes(tmp_path):
    src = _small(tmp_path)
    out = tmp_path / "out"
    cfg = DataConfig(seq_len=64, engine="local")
    m1 = prepare([str(src)], str(out), cfg, progress=False)
    before = os.path.getmtime(out / "manifest.json")
    assert prepare([str(src)], str(out), cfg.model_copy(update={"workers": 2}), progress=False) == m1  # execution only
    assert os.path.getmtime(out / "manifest.json") == before, "same fingerprint: reused"
    m2 = prepare([str(src)], str(out), DataConfig(seq_len=128, engine="local"), progress=False, overwrite=True)
    assert m2["fingerprint"] != m1["fingerprint"] and read_manifest(str(out))["seq_len"] == 128
    with open(src, "a") as f:
        f.write(json.dumps({"id": "new", "turns": [{"text": "one more"}]}) + "\n")
    m3 = prepare([str(src)], str(out), DataConfig(seq_len=128, engine="local"), progress=False, overwrite=True)
    assert m3["fingerprint"] != m2["fingerprint"] and m3["counts"]["records"] == 7


GOOD = {"id": "g", "turns": [{"speaker": "A", "text": "hello"}, {"speaker": "B", "text": "hi there"}]}
BAD = [("{not json", "malformed JSON", "malformed_json"), (json.dumps({"id": "e", "turns": [{"text": ""}]}), "empty", "empty_text"),
       (json.dumps({"id": "t", "turns": [{"text": 7}]}), "must be a string", "wrong_type")]


@pytest.mark.parametrize("engine", ["local", pytest.param("ray", marks=pytest.mark.slow)])
@pytest.mark.parametrize("bad, words, code", BAD)
def test_error_mode_stops_with_file_and_line(tmp_path, bad, words, code, engine):
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join([json.dumps(GOOD), json.dumps(GOOD | {"id": "g2"}), bad, json.dumps(GOOD | {"id": "g3"})]) + "\n")
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        prepare([str(src)], str(out), DataConfig(seq_len=64, engine=engine, format="canonical"), progress=False)
    assert str(e.value).startswith(f"{src}:3: ") and words in str(e.value) and e.value.code == code
    assert not out.exists() and not any(p.name.startswith("out.tmp") for p in tmp_path.iterdir()), "nothing left behind"


@pytest.mark.parametrize("engine", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_skip_quarantines_bad_records_with_counts(tmp_path, engine):
    src = tmp_path / "d.jsonl"
    long_turn = " ".join(["word"] * 80)
    lines = [json.dumps(GOOD), BAD[0][0], BAD[1][0], BAD[2][0], json.dumps(GOOD | {"id": "g2"}),
             json.dumps({"id": "long", "turns": [{"text": "short"}, {"text": long_turn}]})]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    m = prepare([str(src)], str(out), DataConfig(seq_len=64, engine=engine, on_bad_record="skip", format="canonical"),
                progress=False)
    c = m["counts"]
    assert c["records"] == 6 and c["dialogues"] == 2 and c["rejected"] == 4
    assert c["rejected_by_reason"] == {"empty_text": 1, "malformed_json": 1, "too_long": 1, "wrong_type": 1}
    assert m["inputs"][0]["rejected"] == 4 and m["rejected_file"] == "rejected.jsonl"
    rejected = [json.loads(l) for l in (out / "rejected.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejected] == [2, 3, 4, 6] and all(r["source"] == str(src) for r in rejected)
    assert "malformed JSON" in rejected[0]["reason"] and "empty" in rejected[1]["reason"] and "string" in rejected[2]["reason"]
    assert "exceeds seq_len=64" in rejected[3]["reason"] and rejected[3]["tokens"] == c["tokens_rejected"] > 64


def test_uri_inputs_and_globs_equal_paths(tmp_path):
    a, b = _small(tmp_path, 3, "a.jsonl"), _small(tmp_path, 4, "b.jsonl")
    cfg = DataConfig(seq_len=64, engine="local")
    m1 = prepare([str(a), str(b)], str(tmp_path / "o1"), cfg, progress=False)
    m2 = prepare([f"file://{tmp_path}/*.jsonl"], str(tmp_path / "o2"), cfg, progress=False)
    assert m1["fingerprint"] == m2["fingerprint"] and m1["shards"] == m2["shards"] and m2["counts"]["records"] == 7
