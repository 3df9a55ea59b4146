"""`convsink prep` end to end on a small generated file: exit 0 and a manifest; a bad file: exit 2, one error
line naming FILE:LINE, no manifest left."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.repo import REPO


def convsink(*args):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def _dialogues(path, n, bad_at=None):
    with open(path, "w") as f:
        for i in range(n):
            if i == bad_at:
                f.write('{"id": "broken", "turns": [{"text": 3}]}\n')
            else:
                f.write(json.dumps({"id": f"d{i}", "turns": [{"speaker": "A", "text": f"how was day {i}?"},
                                                             {"speaker": "B", "text": "fine, thanks"}]}) + "\n")


def test_cli_prep_small_file(tmp_path):
    src = tmp_path / "small.jsonl"
    _dialogues(src, 12)
    out = tmp_path / "out"
    proc = convsink("prep", str(src), "--out", str(out), "--engine", "local", "data.seq_len=64", "data.shard_rows=2")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["dialogues"] == 12 and m["seq_len"] == 64 and len(m["shards"]) > 1
    assert [s["file"] for s in m["shards"]] == [f"dialogue-{k:05d}.parquet" for k in range(len(m["shards"]))]
    assert "12 dialogues" in proc.stdout and (out / "tokenizer").is_dir()
    assert "\r" not in proc.stderr, "no progress bar redraws when stderr is not a terminal"


def test_cli_prep_bad_file_exit_2_one_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    _dialogues(src, 5, bad_at=3)
    out = tmp_path / "out"
    proc = convsink("prep", str(src), "--out", str(out), "--engine", "local")
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"convsink prep: error: {src}:4: ") and "must be a string" in lines[0]
    assert not (out / "manifest.json").exists() and not out.exists()
