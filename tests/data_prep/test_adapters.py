"""Adapters (every input format), input resolution (globs, URIs) and the driver's chunk scan."""

from __future__ import annotations

import json

import pytest

from data_prep.adapters import detect_format, iter_dialogues, parse_jsonl, personachat_records
from data_prep.schema import DataError
from data_prep.sources import read_bytes, resolve_inputs, scan


def _write(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return str(path)


def test_canonical(tmp_path):
    p = _write(tmp_path / "c.jsonl", [{"id": "d1", "turns": [{"speaker": "A", "text": " hi "}, {"text": "yo"}], "session": 2}])
    [d] = list(iter_dialogues(p))
    assert d.id == "d1" and [t.text for t in d.turns] == ["hi", "yo"] and [t.speaker for t in d.turns] == ["A", ""]
    assert d.session == 2 and d.line == 1 and detect_format(p) == "canonical"


def test_messages(tmp_path):
    p = _write(tmp_path / "chat.jsonl", ["", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]}])
    [d] = list(iter_dialogues(p))
    assert [t.text for t in d.turns] == ["hi", "hello!"] and [t.speaker for t in d.turns] == ["user", "assistant"]
    assert d.line == 2 and d.id == "chat.jsonl:2" and detect_format(p) == "messages"


def test_msc_concatenates_sessions_oldest_first(tmp_path):
    ep = {"dialog": [{"id": "B", "text": "now"}], "metadata": {"initial_data_id": "ep7"},
          "previous_dialogs": [{"dialog": [{"id": "A", "text": "first"}, {"id": "B", "text": "second"}]}]}
    p = _write(tmp_path / "m.jsonl", [ep])
    [d] = list(iter_dialogues(p))
    assert d.id == "ep7" and [t.text for t in d.turns] == ["first", "second", "now"] and d.session == 2
    assert detect_format(p) == "msc"


def test_personachat_orders_turns_and_finds_lines(tmp_path):
    data = {"a": [{"turn_id": 1, "text": "second"}, {"turn_id": 0, "text": "first"}], "b": [{"turn_id": 0, "text": "x"}]}
    p = tmp_path / "pc.json"
    p.write_text(json.dumps(data, indent=2))
    ds = list(iter_dialogues(str(p)))
    assert [d.id for d in ds] == ["a", "b"] and [t.text for t in ds[0].turns] == ["first", "second"]
    text = p.read_text()
    assert [r[2] for r in personachat_records(str(p), p.read_bytes())] == [2, text[:text.index('"b"')].count("\n") + 1]
    assert detect_format(str(p)) == "personachat"


def test_real_personachat_and_msc_files(shared_data):
    pc = list(iter_dialogues(str(shared_data / "personachat" / "valid.json")))
    assert len(pc) == 1000 and sum(len(d.turns) for d in pc) == 14602
    msc = list(iter_dialogues(str(shared_data / "msc" / "session_3_test.jsonl")))
    assert len(msc) == 501 and all(len(d.turns) > 20 for d in msc)


@pytest.mark.parametrize("line, code, words", [
    ('{"id": "b", "turns": [', "malformed_json", "malformed JSON"),
    ({"id": "b", "turns": [{"text": "   "}]}, "empty_text", "text is empty"),
    ({"id": "b", "turns": [{"text": 42}]}, "wrong_type", "must be a string"),
    ({"id": "b", "turns": "hello"}, "wrong_type", "turns must be a list, got string"),
    ({"id": "b", "turns": [{"text": "x", "speaker": 3}]}, "wrong_type", "turns[0].speaker must be a string, got integer"),
    ({"id": "b"}, "missing_field", "missing key"),
    ({"id": "b", "turns": []}, "too_few_turns", "0 turns"),
])
def test_bad_records_name_file_line_and_code(tmp_path, line, code, words):
    p = _write(tmp_path / "bad.jsonl", [{"id": "a", "turns": [{"text": "ok"}]}, line])
    recs = list(iter_dialogues(p, "canonical"))
    assert not isinstance(recs[0], DataError)
    err = recs[1]
    assert isinstance(err, DataError) and err.code == code and words in err.reason
    assert str(err).startswith(f"{p}:2: ")


def test_parse_jsonl_chunk_keeps_line_numbers():
    text = b'{"id": 1, "turns": [{"text": "a"}]}\n\n{"id": 2, "turns": [{"text": "b"}]}\n'
    got = [(n, r.id) for n, r in parse_jsonl("f", "canonical", text, first_line=10)]
    assert got == [(10, "1"), (12, "2")]


def test_resolve_inputs_globs_uris_and_missing(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        (tmp_path / name).write_text("{}\n")
    assert resolve_inputs([str(tmp_path / "*.jsonl")]) == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    uri = f"file://{tmp_path}/*.jsonl"
    assert resolve_inputs([uri]) == [f"file://{tmp_path}/a.jsonl", f"file://{tmp_path}/b.jsonl"]
    assert read_bytes(f"file://{tmp_path}/a.jsonl") == b"{}\n"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        resolve_inputs([str(tmp_path / "nope.jsonl")])
    with pytest.raises(FileNotFoundError, match="matches"):
        resolve_inputs([str(tmp_path / "*.parquet")])


def test_scan_chunks_cover_records_with_lines(tmp_path):
    lines = [json.dumps({"id": i, "turns": [{"text": f"t{i}"}]}) if i % 4 else "" for i in range(1, 23)]
    p = _write(tmp_path / "s.jsonl", lines)
    sc = scan(p, chunk_records=5, max_records=13)
    assert sc.records == 13 and [c.records for c in sc.chunks] == [5, 5, 3]
    seen = []
    for c in sc.chunks:
        data = read_bytes(p, c.start, c.end)
        seen += [(n, r.id) for n, r in parse_jsonl(p, "canonical", data, c.first_line, c.start)]
    expected = [(n, r.id) for n, r in parse_jsonl(p, "canonical", open(p, "rb").read())][:13]
    assert seen == expected
    import hashlib

    assert sc.sha256 == hashlib.sha256(open(p, "rb").read()).hexdigest()
