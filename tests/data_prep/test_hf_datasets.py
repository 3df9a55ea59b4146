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


def _hub_repo(tmp_path, files: dict[str, str]):
    """A dataset in the local Hub cache (``datasets--someone--chats/snapshots/REV``) holding ``files``."""
    repo = tmp_path / "hf_home" / "hub" / "datasets--someone--chats"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("1" * 40)
    snap = repo / "snapshots" / ("1" * 40)
    for name, text in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_text(text)


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


CONFIGS_README = """---
configs:
- config_name: short
  data_files:
  - split: train
    path: short/train.jsonl
  - split: test
    path: short/test.jsonl
- config_name: long
  data_files:
  - split: train
    path: long/train.jsonl
---
"""


def test_a_selector_picks_a_hub_datasets_split_and_configuration(tmp_path):
    _hub_repo(tmp_path, {"README.md": CONFIGS_README, "short/train.jsonl": _jsonl(ROWS[:3]),
                         "short/test.jsonl": _jsonl(ROWS[10:12]), "long/train.jsonl": _jsonl(ROWS[20:27])})
    assert _turns(iter_dialogues("hf://someone/chats?name=short&split=test", "auto")) == EXPECTED[10:12]
    assert _turns(iter_dialogues("hf://someone/chats?name=short", "auto")) == EXPECTED[:3]  # train by default
    assert _turns(iter_dialogues("hf://someone/chats?split=train&name=long", "auto")) == EXPECTED[20:27]
    fingerprints = {dataset_records(s, "auto").sha256 for s in
                    ("hf://someone/chats?name=short", "hf://someone/chats?name=short&split=test", "hf://someone/chats?name=long")}
    assert len(fingerprints) == 3
    for spec, words in (("hf://someone/chats?name=short&split=dev", "no split 'dev'; its splits: ['train', 'test']"),
                        ("hf://someone/chats?name=nope", "cannot read as a Hugging Face dataset"),
                        ("hf://someone/chats?spilt=test", "dataset selector 'spilt=test'")):
        with pytest.raises(DataError) as e:
            dataset_records(spec, "auto")
        assert str(e.value).startswith(spec + ": ") and words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_selector_picks_a_saved_dataset_dicts_split_and_prep_reads_it(tmp_path):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "dd"
    DatasetDict({"validation": Dataset.from_list(ROWS[:4]), "test": Dataset.from_list(ROWS[30:33])}).save_to_disk(str(folder))
    with pytest.raises(DataError, match="none is 'train'; choose one with \\?split="):
        dataset_records(str(folder), "auto")
    assert _turns(iter_dialogues(f"{folder}?split=test", "auto")) == EXPECTED[30:33]
    man = prepare([f"{folder}?split=validation"], str(tmp_path / "out"), DataConfig(engine="local", seq_len=64),
                  progress=False)
    assert man["counts"]["dialogues"] == 4 and man["counts"]["rejected"] == 0, man["counts"]
