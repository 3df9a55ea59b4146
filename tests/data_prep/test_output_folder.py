"""Prep never destroys data in use: an output folder of another fingerprint is refused (replaced only with an explicit
overwrite), a folder that is not prep's own is never touched, and reused output is checked against its manifest
(every shard's size and sha256) before it is handed back."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from data_prep.config import DataConfig
from data_prep.prep import prepare
from data_prep.shards import ShardIntegrityError, read_manifest
from pipeline.cli import main


def _src(tmp_path, n=12):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"id": f"g{i}", "turns": [{"text": f"hello number {i}, how was your day at work?"},
                                                                {"text": "hi there"}]}) + "\n" for i in range(n)))
    return str(src)


def _snapshot(folder) -> dict:
    return {p: (os.path.getmtime(os.path.join(folder, p)), open(os.path.join(folder, p), "rb").read())
            for p in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, p))}


CFG = DataConfig(seq_len=64, engine="local", shard_rows=2)


def test_another_fingerprint_is_refused_and_the_folder_left_as_it_was(tmp_path):
    src, out = _src(tmp_path), tmp_path / "out"
    prepare([src], str(out), CFG, progress=False)
    before = _snapshot(out)
    with pytest.raises(FileExistsError) as e:
        prepare([src], str(out), CFG.model_copy(update={"seq_len": 128}), progress=False)
    msg = str(e.value)
    assert msg.startswith(f"{out}: ") and "another fingerprint" in msg and "--out" in msg and "--overwrite" in msg
    assert "\n" not in msg and _snapshot(out) == before, "the folder in use is untouched"


def test_explicit_overwrite_replaces_it(tmp_path):
    src, out = _src(tmp_path), tmp_path / "out"
    m1 = prepare([src], str(out), CFG, progress=False)
    m2 = prepare([src], str(out), CFG.model_copy(update={"seq_len": 128}), progress=False, overwrite=True)
    assert m2["fingerprint"] != m1["fingerprint"] and read_manifest(str(out))["seq_len"] == 128


def test_cli_refuses_without_and_replaces_with_overwrite(tmp_path, capsys):
    src, out = _src(tmp_path), tmp_path / "out"
    assert main(["prep", src, "--out", str(out), "--engine", "local", "data.seq_len=64"]) == 0
    capsys.readouterr()
    assert main(["prep", src, "--out", str(out), "--engine", "local", "data.seq_len=128"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "another fingerprint" in err[0] and read_manifest(str(out))["seq_len"] == 64
    assert main(["prep", src, "--out", str(out), "--engine", "local", "--overwrite", "data.seq_len=128"]) == 0
    assert read_manifest(str(out))["seq_len"] == 128


def test_a_folder_with_an_unreadable_manifest_is_not_removed(tmp_path):
    src, out = _src(tmp_path), tmp_path / "out"
    prepare([src], str(out), CFG, progress=False)
    (out / "manifest.json").write_text("{truncated")
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match="another fingerprint"):
        prepare([src], str(out), CFG, progress=False)
    assert _snapshot(out) == before


def test_manifest_records_size_and_sha256_of_every_shard(tmp_path):
    out = tmp_path / "out"
    m = prepare([_src(tmp_path)], str(out), CFG, progress=False)
    assert len(m["shards"]) > 1
    for s in m["shards"]:
        data = (out / s["file"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove"])
def test_reused_output_is_verified_against_its_manifest(tmp_path, damage):
    src, out = _src(tmp_path), tmp_path / "out"
    m = prepare([src], str(out), CFG, progress=False)
    shard = out / m["shards"][1]["file"]
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[:-10])
    elif damage == "flip":
        shard.write_bytes(data[:20] + bytes([data[20] ^ 1]) + data[21:])
    else:
        shard.unlink()
    with pytest.raises(ShardIntegrityError) as e:
        prepare([src], str(out), CFG, progress=False)
    assert str(e.value).startswith(f"{shard}: ") and "\n" not in str(e.value)
    assert {"truncate": "bytes", "flip": "sha256", "remove": "missing"}[damage] in str(e.value)
