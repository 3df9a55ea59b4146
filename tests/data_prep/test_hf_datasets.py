"""Hugging Face datasets as inputs: a ``save_to_disk`` folder, local Parquet/Arrow/JSON read through ``datasets``,
and ``hf://ID`` resolved from the local Hub cache only (nothing downloaded); each row is one record; errors name
``DATASET[row N]``; the Ray engine writes the local engine's bytes."""

from __future__ import annotations

import json
import shutil

import pytest

from data_prep.adapters import iter_dialogues
from data_prep.config import DataConfig
from data_prep.contract import ASSISTANT, SYSTEM, USER
from data_prep.hf_datasets import dataset_records
from data_prep.prep import prepare
from data_prep.schema import DataError

ROWS = [{"id": f"s{i}", "system": "be kind" if i % 2 else None,
         "conversations": [{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": f"answer {i}"}]}
        for i in range(40)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same ShareGPT rows as a save_to_disk folder, a Parquet file, an Arrow file and a JSON-lines file."""
    from datasets import Dataset

    d = tmp_path_factory.mktemp("hf")
    ds = Dataset.from_list(ROWS)
    ds.save_to_disk(str(d / "saved"))
    ds.to_parquet(str(d / "rows.parquet"))
    [arrow] = (d / "saved").glob("*.arrow")
    shutil.copy(arrow, d / "rows.arrow")
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return d


@pytest.fixture(autouse=True)
def private_hf_home(tmp_path, monkeypatch):
    """Caches ``datasets`` writes (a Parquet file's Arrow copy) go to a temporary HF_HOME, never the user's."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for name in ("HF_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(name, raising=False)


def _turns(dialogues):
    return [[(t.speaker, t.text) for t in d.turns] for d in dialogues]


EXPECTED = [([(SYSTEM, "be kind")] if i % 2 else []) + [(USER, f"question {i}"), (ASSISTANT, f"answer {i}")]
            for i in range(40)]


@pytest.mark.parametrize("name, fmt", [("saved", "auto"), ("rows.parquet", "auto"), ("rows.arrow", "sharegpt"),
                                       ("rows.jsonl", "hf")])
def test_each_dataset_source_gives_one_dialogue_per_row(sources, name, fmt):
    spec = str(sources / name)
    records = dataset_records(spec, fmt)
    assert records.fmt == "sharegpt" and records.rows == 40 and len(records.sha256) == 64
    dialogues = list(iter_dialogues(spec, fmt))
    assert _turns(dialogues) == EXPECTED
    assert [d.id for d in dialogues] == [f"s{i}" for i in range(40)] and dialogues[3].line == "row 3"


def test_prepare_reads_a_saved_dataset_on_the_local_engine(sources, tmp_path):
    cfg = DataConfig(engine="local", seq_len=64)
    manifest = prepare([str(sources / "saved")], str(tmp_path / "out"), cfg, progress=False)
    [meta] = manifest["inputs"]
    assert meta["format"] == "sharegpt" and meta["reader"] == "datasets" and meta["kept"] == 40


def test_bad_row_error_names_dataset_row_and_key(tmp_path):
    from datasets import Dataset

    rows = [dict(r) for r in ROWS[:3]]
    rows[1] = {**rows[1], "conversations": [{"from": "narrator", "value": "x"}]}
    Dataset.from_list(rows).to_parquet(str(tmp_path / "bad.parquet"))
    [err] = [r for r in iter_dialogues(str(tmp_path / "bad.parquet")) if isinstance(r, DataError)]
    assert str(err).startswith(f"{tmp_path / 'bad.parquet'}[row 1]: conversations[0].from: unknown role 'narrator'")


def test_dataset_without_the_mapped_column_is_one_line(sources, tmp_path):
    cfg = DataConfig(engine="local", format="sharegpt", columns={"messages": "dialog"})
    with pytest.raises(DataError) as e:
        prepare([str(sources / "rows.parquet")], str(tmp_path / "out"), cfg, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(sources / "rows.parquet"))
    assert "no column 'dialog' (data.columns.messages)" in msg and "conversations" in msg


def test_hub_id_missing_from_the_local_cache_is_one_line(tmp_path):
    with pytest.raises(DataError) as e:
        dataset_records("hf://someone/not-here", "auto")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("hf://someone/not-here: not in the local Hugging Face cache")
    assert str(tmp_path / "hf_home") in msg and "nothing is downloaded" in msg


def test_hub_id_is_read_from_the_local_hub_cache(tmp_path):
    """The Hub cache layout (``datasets--OWNER--NAME/refs/main`` -> ``snapshots/REV/``), as huggingface_hub writes it."""
    repo = tmp_path / "hf_home" / "hub" / "datasets--someone--chats"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snap = repo / "snapshots" / ("0" * 40) / "data"
    snap.mkdir(parents=True)
    (snap / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:5]))
    dialogues = list(iter_dialogues("hf://someone/chats", "auto"))
    assert _turns(dialogues) == EXPECTED[:5]


@pytest.mark.slow
def test_ray_reads_datasets_in_parallel_with_the_local_engines_bytes(sources, tmp_path):
    from datasets import Dataset

    rows = [dict(r) for r in ROWS[:20]]
    rows[13] = {**rows[13], "conversations": [{"from": "narrator", "value": "x"}]}
    Dataset.from_list(rows).to_parquet(str(tmp_path / "bad.parquet"))
    inputs = [str(sources / "saved"), str(sources / "rows.parquet"), str(tmp_path / "bad.parquet")]
    kw = dict(seq_len=32, chunk_records=8, shard_rows=4, on_bad_record="skip")
    outs = {}
    for name, cfg in (("ray", DataConfig(engine="ray", workers=2, **kw)), ("local", DataConfig(engine="local", **kw))):
        outs[name] = tmp_path / name
        prepare(inputs, str(outs[name]), cfg, progress=False)
    files = sorted(p.name for p in outs["local"].iterdir() if p.is_file() and p.name != "run.json")
    assert "manifest.json" in files and "rejected.jsonl" in files and len([f for f in files if f.startswith("dialogue-")]) >= 2
    [rejected] = [json.loads(l) for l in (outs["ray"] / "rejected.jsonl").read_text().splitlines()]
    assert rejected["line"] == "row 13" and rejected["code"] == "unknown_role"
    for name in files:
        assert (outs["ray"] / name).read_bytes() == (outs["local"] / name).read_bytes(), name
