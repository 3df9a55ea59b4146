"""Hugging Face datasets as prep inputs, read through ``datasets`` (imported only when such an input is given).

An input is a dataset when it is ``hf://OWNER/NAME`` (a Hub id, resolved from the local Hub cache only: nothing is
downloaded), a ``save_to_disk`` folder (it holds ``state.json``/``dataset_info.json``/``dataset_dict.json``), a
``.parquet`` or ``.arrow`` file, or any file with ``data.format: hf`` (JSON lines, JSON, CSV). A dataset of several
splits gives its ``train`` split (or its only one); a selector after the id or folder picks another split and, for a
Hub id, a configuration: ``hf://OWNER/NAME?split=test&name=CONFIG`` (``datasets.load_dataset(..., name=, split=)``;
a split or configuration that is not there is one line listing those that are). Each row is one record in a record format (``data.format``, or
detected from the column names) and goes through the same adapters as a JSON line; its place in errors is
``DATASET[row N]`` (N from 0, as ``dataset[N]``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import pyarrow as pa

from data_prep.adapters import HF, RECORD_FORMATS, record_format_of
from data_prep.chat_records import NO_MAPPING, ChatMapping
from data_prep.schema import DataError
from data_prep.sources import HUB_PREFIX, dataset_base, is_saved_dataset

DATASETS_READER = "datasets"  # ``reader`` of a dataset input in the manifest
DATASET_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}  # read as datasets whatever data.format says
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", **DATASET_SUFFIXES}  # data.format: hf
ROWS_PER_BATCH = 1024  # rows converted to Python objects at a time


def is_dataset_input(path: str, fmt: str) -> bool:
    """Whether ``path`` is read through ``datasets`` (see the module docstring)."""
    base = dataset_base(path)
    return (fmt == HF or path.startswith(HUB_PREFIX) or is_saved_dataset(base)
            or os.path.splitext(base)[1].lower() in DATASET_SUFFIXES)


SELECTOR_KEYS = ("split", "name")  # what may follow ``?`` in a dataset input


def selector_of(spec: str) -> dict[str, str]:
    """The selector of a dataset input (``?split=S&name=C`` → {"split": S, "name": C}); a one-line DataError for
    an unknown key or an empty value."""
    base = dataset_base(spec)
    if base == spec:
        return {}
    out = {}
    for part in spec[len(base) + 1:].split("&"):
        key, eq, value = part.partition("=")
        if key not in SELECTOR_KEYS or not eq or not value or key in out:
            raise DataError(spec, "", f"dataset selector {part!r}: use ?split=SPLIT, &name=CONFIG (a Hub id's "
                            "configuration), each once", "dataset_selector")
        out[key] = value
    if "name" in out and not spec.startswith(HUB_PREFIX):
        raise DataError(spec, "", "name= (a configuration) applies to hf://ID only; a save_to_disk folder holds one",
                        "dataset_selector")
    return out


def _cache_dirs() -> tuple[str, str]:
    """(Hub cache, datasets cache) of the environment now: ``HF_HUB_CACHE``/``HF_DATASETS_CACHE``, else under HF_HOME."""
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return (os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub"),
            os.environ.get("HF_DATASETS_CACHE") or os.path.join(home, "datasets"))


def _hub_snapshot(spec: str) -> str:
    """The local snapshot folder of ``hf://ID``; a one-line DataError when the local Hub cache lacks it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, hub_cache = dataset_base(spec)[len(HUB_PREFIX):].strip("/"), _cache_dirs()[0]
    try:
        return snapshot_download(repo_id, repo_type="dataset", cache_dir=hub_cache, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise DataError(spec, "", f"not in the local Hugging Face cache (HF_HOME={home}, hub cache {hub_cache}); "
                        f"nothing is downloaded — download it first with `hf download {repo_id} --repo-type "
                        "dataset` on a machine with network access", "dataset_not_cached") from None


def _one_split(spec: str, loaded, split: str | None = None):
    """A Dataset: ``loaded`` itself, or the chosen (else the train, else the only) split of a DatasetDict."""
    if not hasattr(loaded, "keys"):
        if split is not None and split != (str(loaded.split) if loaded.split is not None else None):
            raise DataError(spec, "", f"dataset is a single split ({loaded.split or 'unnamed'}), not {split!r}; drop "
                            "?split=", "dataset_split")
        return loaded
    splits = list(loaded.keys())
    if split is not None:
        if split not in splits:
            raise DataError(spec, "", f"dataset has no split {split!r}; its splits: {splits}", "dataset_split")
        return loaded[split]
    if "train" in splits or len(splits) == 1:
        return loaded["train" if "train" in splits else splits[0]]
    raise DataError(spec, "", f"dataset has splits {splits} and none is 'train'; choose one with ?split=",
                    "dataset_split")


def _load(spec: str, fmt: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before the first import: datasets reads these once
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()  # prep reports its own progress
    cache, sel, base = _cache_dirs()[1], selector_of(spec), dataset_base(spec)
    if spec.startswith(HUB_PREFIX):
        return _one_split(spec, datasets.load_dataset(_hub_snapshot(spec), name=sel.get("name"), cache_dir=cache),
                          sel.get("split"))
    if is_saved_dataset(base):
        return _one_split(spec, datasets.load_from_disk(base), sel.get("split"))
    ext = os.path.splitext(spec)[1].lower()
    if ext == ".arrow":
        return datasets.Dataset.from_file(spec)
    if ext not in BUILDERS:
        raise DataError(spec, "", f"data.format hf reads {', '.join(sorted(BUILDERS))} files, save_to_disk folders "
                        f"and hf://ID, not {ext or 'a file without extension'}", "unreadable_dataset")
    return datasets.load_dataset(BUILDERS[ext], data_files=spec, split="train", cache_dir=cache)


def _source_files(spec: str) -> list[str]:
    """The files a dataset is read from (their bytes make its sha256)."""
    root = _hub_snapshot(spec) if spec.startswith(HUB_PREFIX) else dataset_base(spec)
    if not os.path.isdir(root):
        return [root]
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)


def _sha256(spec: str) -> str:
    h, sel = hashlib.sha256(), selector_of(spec)
    if sel:  # another split or configuration of the same files: another fingerprint
        h.update(json.dumps(sorted(sel.items())).encode())
    root = _hub_snapshot(spec) if spec.startswith(HUB_PREFIX) else os.path.dirname(dataset_base(spec))
    for path in _source_files(spec):
        h.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


REQUIRED = {"canonical": ("turns", None), "msc": ("dialog", None)}  # chat formats: data.columns.messages


@dataclass
class DatasetRecords:
    """A loaded dataset: its rows as records of ``fmt``."""

    spec: str
    fmt: str
    dataset: object  # datasets.Dataset (memory-mapped Arrow)
    rows: int
    sha256: str

    def arrow_rows(self, start: int, end: int) -> pa.Table:
        """Rows ``[start, end)`` as an Arrow table."""
        return self.dataset.with_format("arrow")[start:end]

    def rows_as_objects(self, start: int, end: int):
        """(``"row N"``, row as a JSON-like dict) for rows ``[start, end)``, converted a batch at a time."""
        for a in range(start, end, ROWS_PER_BATCH):
            yield from rows_of_table(self.arrow_rows(a, min(a + ROWS_PER_BATCH, end)), a)


def rows_of_table(table: pa.Table, first_row: int):
    """(``"row N"``, dict) for each row of ``table`` (rows from ``first_row`` on)."""
    for k, row in enumerate(table.to_pylist()):
        yield f"row {first_row + k}", row


def _record_format(spec: str, fmt: str, columns: list[str]) -> str:
    if fmt in RECORD_FORMATS:
        return fmt
    if fmt not in ("auto", HF):
        raise DataError(spec, "", f"data.format {fmt} is a whole-file format; a dataset's rows are records of "
                        f"{', '.join(RECORD_FORMATS)}", "unreadable_dataset")
    found = record_format_of(dict.fromkeys(columns))
    if found is None:
        raise DataError(spec, "", f"cannot detect the record format from the columns {columns}; pass --format "
                        f"{'|'.join(RECORD_FORMATS)} (and data.columns for other names)", "unreadable_dataset")
    return found


def dataset_records(spec: str, fmt: str, mapping: ChatMapping = NO_MAPPING) -> DatasetRecords:
    """Load ``spec`` (offline) and check it has the record format's columns; one-line DataErrors naming it."""
    try:
        ds = _load(spec, fmt)
    except DataError:
        raise
    except Exception as e:  # datasets raises many kinds: say which, in one line
        reason = (str(e).strip().splitlines() or [""])[0]
        raise DataError(spec, "", f"cannot read as a Hugging Face dataset: {type(e).__name__}: {reason}",
                        "unreadable_dataset") from None
    columns = list(ds.column_names)
    rec_fmt = _record_format(spec, fmt, columns)
    column, key = REQUIRED.get(rec_fmt) or (mapping.column(rec_fmt, "messages"), "data.columns.messages")
    if column not in columns:
        via = f" ({key})" if key else f" (format {rec_fmt})"
        raise DataError(spec, "", f"dataset has no column {column!r}{via}; its columns: {columns}", "missing_column")
    return DatasetRecords(spec, rec_fmt, ds, len(ds), _sha256(spec))
