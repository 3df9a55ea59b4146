"""The scaled corpus of `convsink bench prep --scale N`: N copies of the shipped dialogues, each copy with fresh
unique ids, every record a shipped record under a new id, the same bytes for the same N."""

from __future__ import annotations

import re

from data_prep.adapters import iter_dialogues
from data_prep.scaled_corpus import DEFAULT_COPIES, shipped_files, write_scaled_corpus

COPY = re.compile(r"^(?P<id>.+)~c(?P<k>\d+)$")


def _shipped(shared_data) -> dict:
    """{output file name: {shipped id: (turns, session)}} of the shipped files."""
    out = {}
    for path in shipped_files(str(shared_data)):
        family = "personachat" if path.endswith(".json") else "msc"
        name = f"{family}-{path.rsplit('/', 1)[1].rsplit('.', 1)[0]}.jsonl"
        out[name] = {d.id: (d.turns, d.session) for d in iter_dialogues(path)}
    return out


def test_copies_are_shipped_records_with_fresh_unique_ids(shared_data, tmp_path):
    shipped = _shipped(shared_data)
    info = write_scaled_corpus(str(shared_data), str(tmp_path / "c2"), 2)
    assert sorted(p.rsplit("/", 1)[1] for p in info["files"]) == sorted(shipped)
    assert info["records"] == 2 * sum(len(v) for v in shipped.values())
    for path in info["files"]:
        name = path.rsplit("/", 1)[1]
        seen, per_copy = set(), {0: 0, 1: 0}
        for d in iter_dialogues(path):
            assert not hasattr(d, "reason"), d  # a DataError: the copy is not a valid record
            m = COPY.match(d.id)
            assert m and d.id not in seen and d.id not in shipped[name], d.id
            seen.add(d.id)
            assert shipped[name][m["id"]] == (d.turns, d.session), d.id  # the shipped record, turn for turn
            per_copy[int(m["k"])] += 1
        assert per_copy == {0: len(shipped[name]), 1: len(shipped[name])}


def test_same_scale_same_bytes_and_default_is_at_least_200_mb(shared_data, tmp_path):
    one = write_scaled_corpus(str(shared_data), str(tmp_path / "a"), 1)
    two = write_scaled_corpus(str(shared_data), str(tmp_path / "b"), 2)
    again = write_scaled_corpus(str(shared_data), str(tmp_path / "c"), 2)
    assert two["sha256"] == again["sha256"] != one["sha256"]
    assert [open(p, "rb").read() for p in two["files"]] == [open(p, "rb").read() for p in again["files"]]
    assert two["bytes"] == 2 * one["bytes"] == sum(len(open(p, "rb").read()) for p in two["files"])
    # copies k >= 10 have one more id digit, so DEFAULT_COPIES copies are at least this many bytes
    assert DEFAULT_COPIES * one["bytes"] >= 200 * 10**6
