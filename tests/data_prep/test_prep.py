"""Data preparation over the real dialogues: nothing lost, nothing duplicated, counts that add up."""

from __future__ import annotations

import json
import os
from collections import defaultdict

import pytest

from data_prep.adapters import iter_dialogues
from data_prep.config import DataConfig
from data_prep.prep import prepare
from data_prep.shards import read_manifest, read_rows


@pytest.fixture(scope="module")
def all_inputs(shared_data):
    return [str(shared_data / "personachat" / "valid.json")] + sorted(str(p) for p in (shared_data / "msc").glob("*.jsonl"))


@pytest.fixture(scope="module")
def prepared(all_inputs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prep") / "shards")
    prepare(all_inputs, out, DataConfig(seq_len=1024, engine="local"), progress=False)
    return out


def test_every_utterance_exactly_once_in_order(prepared, all_inputs, tokenizer):
    table = read_rows(prepared, ("dialogue",))
    manifest = read_manifest(prepared)
    seq_len = manifest["seq_len"]
    eou = manifest["tokenizer"]["eou_id"]
    # reassemble each dialogue from its windows, in window order
    pieces = defaultdict(list)
    for row in table.to_pylist():
        assert len(row["input_ids"]) == seq_len
        docs = row["doc_ids"]
        real = [d for d in docs if d >= 0]
        assert docs[:len(real)] == real, "padding only at the end"
        for d, name in enumerate(row["dialogue_ids"]):
            idx = [i for i, x in enumerate(docs) if x == d]
            ids = [row["input_ids"][i] for i in idx]
            utt = [row["utt_ids"][i] for i in idx]
            assert utt[0] == 0 and row["position_ids"][idx[0]] == 0, "each window starts with BOS at position 0"
            utterances, current = [], []
            for tok, is_eou in zip(ids[1:], [row["eou"][i] for i in idx[1:]]):
                if is_eou:
                    assert tok == eou
                    utterances.append(current)
                    current = []
                else:
                    current.append(tok)
            assert current == []
            pieces[name].append(utterances)
    expected = {}
    for path in all_inputs:
        for d in iter_dialogues(path):
            expected[f"{os.path.basename(path)}:{d.id}"] = tokenizer([t.text for t in d.turns], add_special_tokens=False)["input_ids"]
    assert set(pieces) == set(expected)
    split = 0
    for name, windows in pieces.items():
        # windows of one dialogue, in order, give back every utterance exactly once
        candidates = [w for w in windows]
        flat = [u for w in sorted(candidates, key=lambda w: _first_index(expected[name], w)) for u in w]
        assert flat == expected[name], name
        split += len(windows) > 1
    assert split == manifest["counts"]["split_dialogues"]


def _first_index(utterances, window):
    for i in range(len(utterances)):
        if utterances[i:i + len(window)] == window:
            return i
    raise AssertionError("window not found in its dialogue")


def test_manifest_counts_equal_a_recount(prepared):
    manifest = read_manifest(prepared)
    c = manifest["counts"]
    table = read_rows(prepared, ("dialogue",))
    rows = table.to_pylist()
    tokens = sum(sum(1 for d in r["doc_ids"] if d >= 0) for r in rows)
    assert c["sequences"] == len(rows)
    assert c["tokens_out"] == c["tokens_in"] == tokens
    assert c["windows"] == sum(len(r["dialogue_ids"]) for r in rows)
    assert c["utterances"] == sum(sum(r["eou"]) for r in rows)
    assert c["dialogues"] + c["rejected"] == c["records"] == sum(i["records"] for i in manifest["inputs"])
    assert c["packing_efficiency"] == pytest.approx(tokens / (len(rows) * manifest["seq_len"]), abs=1e-6)
    for s in manifest["shards"]:
        assert os.path.isfile(os.path.join(prepared, s["file"]))


def test_same_fingerprint_reuses_output(prepared, all_inputs):
    before = os.path.getmtime(os.path.join(prepared, "manifest.json"))
    prepare(all_inputs, prepared, DataConfig(seq_len=1024, engine="local"), progress=False)
    assert os.path.getmtime(os.path.join(prepared, "manifest.json")) == before


def test_skip_quarantines_bad_records_with_counts(tmp_path):
    src = tmp_path / "d.jsonl"
    good = {"id": "g", "turns": [{"speaker": "A", "text": "hello"}, {"speaker": "B", "text": "hi there"}]}
    lines = [json.dumps(good), "{not json", json.dumps({"id": "e", "turns": [{"text": ""}]}),
             json.dumps({"id": "t", "turns": [{"text": 7}]}), json.dumps(good | {"id": "g2"})]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    m = prepare([str(src)], str(out), DataConfig(seq_len=64, engine="local", on_bad_record="skip", format="canonical"), progress=False)
    assert m["counts"]["records"] == 5 and m["counts"]["dialogues"] == 2 and m["counts"]["rejected"] == 3
    rejected = [json.loads(l) for l in (out / "rejected.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejected] == [2, 3, 4]
    assert "malformed JSON" in rejected[0]["reason"] and "empty" in rejected[1]["reason"] and "string" in rejected[2]["reason"]


def test_messages_format(tmp_path):
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]}) + "\n")
    [d] = list(iter_dialogues(str(src)))
    assert [t.text for t in d.turns] == ["hi", "hello!"] and [t.speaker for t in d.turns] == ["user", "assistant"]


@pytest.mark.slow
def test_ray_output_is_byte_identical_with_1_and_2_workers(all_inputs, tmp_path):
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prepare(all_inputs[:2], str(out), DataConfig(seq_len=1024, engine="ray", workers=workers, block_dialogues=128,
                                                     smr={"samples": 8}, lmr={"samples": 8}), progress=False)
        outs.append(out)
    local = tmp_path / "local"
    prepare(all_inputs[:2], str(local), DataConfig(seq_len=1024, engine="local", workers=1, block_dialogues=128,
                                                   smr={"samples": 8}, lmr={"samples": 8}), progress=False)
    for name in sorted(os.listdir(outs[0])):
        if name.endswith(".parquet"):
            assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes() == (local / name).read_bytes(), name
    m1, m2 = (json.loads((o / "manifest.json").read_text()) for o in outs)
    for m in (m1, m2):
        m.pop("timing")
        m["config"].pop("workers")
    assert m1["shards"] == m2["shards"] and m1["counts"] == m2["counts"]
