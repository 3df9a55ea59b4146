"""The command line's contract for bad input: one clear line, a non-zero exit, and nothing that looks complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.repo import REPO


def convsink(*args, cwd=REPO):
    env = dict(os.environ, WANDB_MODE="offline")
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def one_line_error(proc) -> str:
    """Exactly one line says what is wrong, on a line of its own, and no traceback is shown."""
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if "error" in l.lower()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("convsink ") and ": error: " in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


GOOD = {"id": "a", "turns": [{"speaker": "A", "text": "hello there"}, {"speaker": "B", "text": "hi, how are you?"}]}


# the Ray engine (the default) once; the same checks on the local engine for the other cases (the engines' errors are
# compared case by case in tests/data_prep/engines/test_ray_bad_input.py)
@pytest.mark.parametrize("bad, expect, engine", [
    ('{"id": "b", "turns": [', "malformed JSON", "ray"),
    ({"id": "b", "turns": [{"speaker": "A", "text": "  "}]}, "empty", "local"),
    ({"id": "b", "turns": [{"speaker": "A", "text": ""}]}, "empty", "local"),
    ({"id": "b", "turns": [{"speaker": "A", "text": 42}]}, "must be a string", "local"),
])
def test_prep_bad_record_names_file_and_line(tmp_path, bad, expect, engine):
    src = tmp_path / "dialogues.jsonl"
    write_jsonl(src, [GOOD, GOOD | {"id": "c"}, bad])
    out = tmp_path / "out"
    proc = convsink("prep", str(src), "--out", str(out), "--format", "canonical", "--engine", engine)
    line = one_line_error(proc)
    assert f"{src}:3:" in line and expect in line
    assert proc.returncode == 2
    assert not (out / "manifest.json").exists()


def test_prep_missing_input_file(tmp_path):
    proc = convsink("prep", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "out"))
    assert "nope.jsonl" in one_line_error(proc) and "not found" in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_unknown_config_key_names_key_and_file(tmp_path):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("train:\n  max_stepz: 3\n")
    proc = convsink("train", "--config", str(cfg), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"))
    line = one_line_error(proc)
    assert str(cfg) in line and "train.max_stepz" in line and "unknown key" in line
    assert not (tmp_path / "o").exists()


def test_bad_override_type(tmp_path):
    proc = convsink("run", "configs/quickstart.yaml", "train.max_steps=many")
    line = one_line_error(proc)
    assert "train.max_steps" in line and "command line" in line


def test_resume_without_checkpoint(tmp_path, shared_data):
    data = tmp_path / "data"
    proc = convsink("prep", str(shared_data / "personachat" / "valid.json"), "--out", str(data), "data.max_dialogues=5",
                    "data.seq_len=256", "data.engine=local")
    assert proc.returncode == 0, proc.stderr
    assert (data / "manifest.json").exists()
    out = tmp_path / "run"
    out.mkdir()
    proc = convsink("train", "--config", "configs/quickstart.yaml", "--data", str(data), "--out", str(out), "--resume")
    line = one_line_error(proc)
    assert "no complete checkpoint" in line
    assert not (out / "checkpoints" / "latest").exists()


def test_tokenizer_command_and_its_bad_input(tmp_path):
    src = tmp_path / "dialogues.jsonl"
    write_jsonl(src, [GOOD, GOOD | {"id": "c"}])
    proc = convsink("tokenizer", str(src), "--out", str(tmp_path / "tok"), "--vocab-size", "300", "--format", "canonical")
    assert proc.returncode == 0, proc.stderr
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>") and len(tok) <= 300
    with open(src, "a") as f:
        f.write('{"id": "b", "turns": [\n')
    proc = convsink("tokenizer", str(src), "--out", str(tmp_path / "tok2"), "--format", "canonical")
    assert f"{src}:3:" in one_line_error(proc) and proc.returncode == 2


def test_memory_stage_on_shards_without_memory_samples_stops_before_launch(tmp_path, shared_data):
    data = tmp_path / "shards"
    proc = convsink("prep", str(shared_data / "msc" / "session_2_valid.jsonl"), "--out", str(data), "data.max_dialogues=5",
                    "data.seq_len=256", "--engine", "local")
    assert proc.returncode == 0, proc.stderr
    proc = convsink("train", "--config", "configs/quickstart.yaml", "--data", str(data), "--out", str(tmp_path / "run"),
                    "--stage", "memory")
    line = one_line_error(proc)
    assert f"{data}: no lmr/smr rows for the memory stage" in line and "data.smr.samples" in line
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
