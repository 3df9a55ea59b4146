"""Bad input, fuzzed (cases from ``fuzz_cases``), on the local engine: error mode stops with one ``FILE:LINE: reason``
line and leaves no manifest; skip mode keeps + rejects every record; literal special-token text stays text; a 50 MB
line costs no memory blow-up; run time is linear in the input. The Ray engine's identical output and errors:
``tests/data_prep/engines/test_ray_bad_input.py``."""

from __future__ import annotations

import json
import re
import resource
import time

import pyarrow.compute as pc
import pytest

from data_prep.config import DataConfig
from data_prep.prep import prepare
from data_prep.schema import DataError
from data_prep.shards import read_manifest, read_rows
from pipeline.cli import main
from tests.data_prep import fuzz_cases

ERROR_CASES = fuzz_cases.one_per_kind(fuzz_cases.record_cases()) + fuzz_cases.file_cases()


def _cfg(**kw) -> DataConfig:
    return DataConfig(**{"seq_len": 64, "engine": "local"} | kw)


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda c: c.name)
def test_error_mode_one_line_file_and_line_no_manifest(case, tmp_path, capsys):
    src = fuzz_cases.write(case, tmp_path)
    out = tmp_path / "out"
    rc = main(["prep", src, "--out", str(out), "--engine", "local", "--format", case.fmt, "data.seq_len=64"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    if case.line is None:
        assert rc == 0 and err == [] and read_manifest(str(out))["counts"]["dialogues"] == case.records
        return
    assert rc == 2 and len(err) == 1, err
    assert re.fullmatch(rf"convsink prep: error: {re.escape(src)}:{case.line}: .*{case.reason}.*", err[0]), err[0]
    assert not out.exists() and not any(p.name.startswith("out.tmp") for p in tmp_path.iterdir()), "nothing left behind"


def check_skip_run(out, paths: dict, cases: list) -> dict:
    """Skip mode over ``cases`` (written at ``paths[name]``): per input kept + rejected = records, and each bad record
    is in rejected.jsonl with its line, code and reason. Returns the manifest."""
    m = read_manifest(str(out))
    by_path = {i["path"]: i for i in m["inputs"]}
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    where = {(r["source"], r["line"]): r for r in rejected}
    for c in cases:
        i = by_path[paths[c.name]]
        assert (i["records"], i["rejected"], i["kept"]) == (c.records, c.rejected, c.records - c.rejected), c.name
        if c.line is not None:
            r = where[(paths[c.name], c.line)]
            assert r["code"] == c.code and re.search(c.reason, r["reason"]), (c.name, r)
    assert m["counts"]["records"] == sum(c.records for c in cases) == m["counts"]["dialogues"] + m["counts"]["rejected"]
    assert len(rejected) == m["counts"]["rejected"] == sum(c.rejected for c in cases)
    return m


def test_skip_mode_keeps_or_rejects_every_record(tmp_path):
    cases = fuzz_cases.record_cases()
    (tmp_path / "in").mkdir()
    paths = {c.name: fuzz_cases.write(c, tmp_path / "in") for c in cases}
    out = tmp_path / "out"
    prepare(list(paths.values()), str(out), _cfg(on_bad_record="skip"), progress=False)
    check_skip_run(out, paths, cases)


def test_literal_special_token_text_stays_text(tmp_path, tokenizer):
    case = next(c for c in fuzz_cases.json_cases() if c.name == "special-token-text")
    out = tmp_path / "out"
    m = prepare([fuzz_cases.write(case, tmp_path)], str(out), _cfg(), progress=False)
    check_special_tokens_are_text(out, m, tokenizer)


def check_special_tokens_are_text(out, manifest, tokenizer) -> None:
    """EoU ids only at EoU positions, BOS ids only at BOS positions, and the utterances decode to their text."""
    bos, eou = manifest["tokenizer"]["bos_id"], manifest["tokenizer"]["eou_id"]
    utterances = []
    for row in read_rows(str(out)).to_pylist():
        for i, (tok, is_eou, utt, doc) in enumerate(zip(row["input_ids"], row["eou"], row["utt_ids"], row["doc_ids"])):
            if doc < 0:
                continue
            assert (tok == eou) == is_eou, f"token {i}: EoU id {eou} only at EoU positions"
            assert (tok == bos) == (utt == 0), f"token {i}: BOS id {bos} only at BOS positions"
        current = []
        for tok, is_eou, utt, doc in zip(row["input_ids"], row["eou"], row["utt_ids"], row["doc_ids"]):
            if doc >= 0 and utt > 0 and not is_eou:
                current.append(tok)
            elif is_eou:
                utterances.append(tokenizer.decode(current))
                current = []
    assert fuzz_cases.SPECIAL_TEXT in utterances and "<|im_end|>" in utterances


def test_huge_line_rejected_by_the_record_limit_without_memory_blow_up(tmp_path):
    case = fuzz_cases.huge_line_case(50)
    src = fuzz_cases.write(case, tmp_path)
    del case
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with pytest.raises(DataError) as e:
        prepare([src], str(tmp_path / "err"), _cfg(), progress=False)
    assert str(e.value).startswith(f"{src}:3: record is ") and e.value.code == "record_too_large"
    m = prepare([src], str(tmp_path / "out"), _cfg(on_bad_record="skip"), progress=False)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert m["counts"]["rejected_by_reason"] == {"record_too_large": 1} and m["counts"]["dialogues"] == 3
    assert grown_mb < 400, f"peak memory grew {grown_mb:.0f} MB for a 50 MB line"


def _mixed_file(path, n: int) -> str:
    """``n`` records: good ones, with every 10th one a wrong-type record and every 25th one malformed JSON."""
    lines = []
    for i in range(n):
        rec = fuzz_cases.good("canonical", i)
        rec["turns"] = rec["turns"] * 4
        if i % 10 == 5:
            rec["turns"][1]["text"] = 7
        lines.append('{"id": "broken' if i % 25 == 7 else json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_read_and_validate_time_is_linear_in_the_input(tmp_path, tokenizer):
    """The step that meets bad input (scan, read, validate, tokenize, window, duplicate check), without the fixed
    costs around it (tokenizer load, shard writing), timed at 1x and 4x the records: best of 3 CPU times each (a
    quadratic step would take 16x)."""
    from data_prep.engines.local import LocalEngine
    from data_prep.prep import collect
    from data_prep.progress import Progress
    from data_prep.reader import input_metas
    from data_prep.tokenizer_loading import prepare_tokenizer

    cfg = _cfg(on_bad_record="skip", seq_len=256)
    ids = prepare_tokenizer(tokenizer)

    def seconds(n: int) -> float:
        src = _mixed_file(tmp_path / f"in{n}.jsonl", n)
        best = float("inf")
        for _ in range(3):
            t = time.process_time()  # CPU time: other jobs on a shared machine do not count
            pieces = collect(LocalEngine(cfg, tokenizer, "", ids).pieces([src], input_metas([src], cfg)), cfg,
                             Progress(enabled=False, desc="test"))
            best = min(best, time.process_time() - t)
        assert pieces.num_rows == n and pieces.filter(pc.not_equal(pieces["error"], "")).num_rows == n // 10 + n // 25
        return best

    one, four = seconds(1000), seconds(4000)
    assert 2.0 < four / one < 8.0, f"4x the records took {four / one:.1f}x the time (1x {one:.2f}s, 4x {four:.2f}s)"
