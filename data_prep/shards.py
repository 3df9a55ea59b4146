"""The public shard format: Parquet, one row per packed training sequence, plus ``manifest.json``.

Columns (all lists have ``seq_len`` entries): ``input_ids``, ``labels`` (-100 = no loss), ``position_ids``
(restart at 0 per dialogue), ``doc_ids`` (-1 = padding), ``utt_ids``, ``eou`` (bool), ``blk`` (block index for
SMR/LMR, else equal to ``utt_ids``), ``mask_kind`` (string), ``dialogue_ids`` (source ids of the packed dialogues).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.contract import (
    BLK,
    DIALOGUE_IDS,
    DOC_IDS,
    EOU,
    INPUT_IDS,
    LABELS,
    MASK_KIND,
    PAD_VALUES,
    POSITION_IDS,
    SHARD_SCHEMA,
    UTT_IDS,
)

MANIFEST = "manifest.json"


class ShardIntegrityError(ValueError):
    """A shard that is missing or differs from its manifest entry (size or sha256): one line naming the file."""


def parquet_bytes(table: pa.Table) -> bytes:
    """The one way shards are encoded (same options everywhere, so the bytes depend on the rows only)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", write_statistics=False)
    return sink.getvalue().to_pybytes()




def _values(items: pa.Table, col: str) -> np.ndarray:
    arr = items[col].combine_chunks()
    return arr.flatten().to_numpy(zero_copy_only=False) if len(arr) else np.zeros(0)


def pack_table(items: pa.Table, row_of_item: np.ndarray, seq_len: int, pad_id: int) -> pa.Table:
    """Packed rows from items (an ``items.ITEM_SCHEMA`` table, grouped by row and in placement order inside a
    row; ``row_of_item[i]`` is item i's row). Vectorized (tested against the list-based ``tests/data_prep/reference_packing.build_row``)."""
    row_of_item = np.asarray(row_of_item, dtype=np.int64)
    n_items = items.num_rows
    if n_items == 0:
        return SHARD_SCHEMA.empty_table()
    if np.any(np.diff(row_of_item) < 0):
        raise ValueError("items must be grouped by row, rows in order")
    n_rows = int(row_of_item[-1]) + 1
    lengths = np.diff(items[INPUT_IDS].combine_chunks().offsets.to_numpy()).astype(np.int64)
    row_len = np.bincount(row_of_item, weights=lengths, minlength=n_rows).astype(np.int64)
    if row_len.max() > seq_len:
        raise ValueError(f"a row of {int(row_len.max())} tokens exceeds seq_len={seq_len}")
    items_per_row = np.bincount(row_of_item, minlength=n_rows)
    row_first = np.concatenate([[0], np.cumsum(items_per_row)[:-1]])
    doc = np.arange(n_items) - row_first[row_of_item]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    total = int(lengths.sum())
    filled = np.arange(seq_len)[None, :] < row_len[:, None]
    flat = {
        INPUT_IDS: _values(items, INPUT_IDS),
        LABELS: _values(items, LABELS),
        POSITION_IDS: np.arange(total) - np.repeat(starts, lengths),
        DOC_IDS: np.repeat(doc, lengths),
        UTT_IDS: _values(items, UTT_IDS),
        EOU: _values(items, EOU),
        BLK: _values(items, BLK),
    }
    offsets = pa.array(np.arange(0, (n_rows + 1) * seq_len, seq_len, dtype=np.int32))
    columns = {}
    for name, values in flat.items():
        field = SHARD_SCHEMA.field(name)
        dtype = np.bool_ if field.type.value_type == pa.bool_() else np.int32
        pad = PAD_VALUES.get(name, pad_id)  # input_ids: the tokenizer's pad id
        out = np.full((n_rows, seq_len), pad, dtype=dtype)
        out[filled] = values.astype(dtype, copy=False)
        columns[name] = pa.ListArray.from_arrays(offsets, pa.array(out.reshape(-1), type=field.type.value_type))
    kinds = items[MASK_KIND].to_pylist()
    row_kind = [None] * n_rows
    for r, k in zip(row_of_item.tolist(), kinds):
        if row_kind[r] is not None and row_kind[r] != k:
            raise ValueError(f"one packed row must hold one mask kind, got {row_kind[r]} and {k}")
        row_kind[r] = k
    columns[MASK_KIND] = pa.array(row_kind, type=pa.string())
    doc_offsets = pa.array(np.concatenate([row_first, [n_items]]).astype(np.int32))
    columns[DIALOGUE_IDS] = pa.ListArray.from_arrays(doc_offsets, items["dialogue_id"].combine_chunks().cast(pa.string()))
    return pa.Table.from_arrays([columns[f.name] for f in SHARD_SCHEMA], schema=SHARD_SCHEMA)


def shard_entry(name: str, table: pa.Table, data: bytes, seq_len: int) -> dict:
    """The manifest entry of one shard (``data``: its Parquet bytes)."""
    doc = table[DOC_IDS].combine_chunks().flatten().to_numpy()
    tokens = int((doc >= 0).sum())
    slots = table.num_rows * seq_len
    return {
        "file": name,
        "rows": table.num_rows,
        "tokens": tokens,
        "padding_fraction": round(1 - tokens / slots, 6) if slots else 0.0,
        "dialogues": int(sum(len(d) for d in table[DIALOGUE_IDS].to_pylist())),
        MASK_KIND: sorted(set(table[MASK_KIND].to_pylist())),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def encode_shard(name: str, items: pa.Table, row_of_item, seq_len: int, pad_id: int) -> tuple[bytes, dict]:
    """Pack, encode and describe one shard: (Parquet bytes, manifest entry)."""
    table = pack_table(items, row_of_item, seq_len, pad_id)
    data = parquet_bytes(table)
    return data, shard_entry(name, table, data, seq_len)




def read_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{data_dir}: no {MANIFEST}; run `convsink prep` first (or the prep was interrupted)")
    with open(path) as f:
        return json.load(f)


def verified_shard_bytes(data_dir: str, entry: dict) -> bytes:
    """The bytes of the shard of manifest entry ``entry``, checked against its recorded size and sha256."""
    path = os.path.join(data_dir, entry["file"])
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ShardIntegrityError(f"{path}: missing, but listed in {MANIFEST}; re-run `convsink prep` into a new "
                                  "--out") from None
    if "bytes" in entry and len(data) != entry["bytes"]:
        raise ShardIntegrityError(f"{path}: {len(data)} bytes, but {MANIFEST} says {entry['bytes']} bytes (changed or "
                                  "truncated after prep); re-run `convsink prep` into a new --out")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ShardIntegrityError(f"{path}: its sha256 differs from {MANIFEST}'s (changed after prep); re-run "
                                  "`convsink prep` into a new --out")
    return data


def verify_shards(data_dir: str, manifest: dict) -> dict:
    """``manifest``, once every shard it lists matches its size and sha256 (else ShardIntegrityError)."""
    for entry in manifest["shards"]:
        verified_shard_bytes(data_dir, entry)
    return manifest


def read_rows(data_dir: str, mask_kinds: tuple[str, ...] | None = None) -> pa.Table:
    """All rows of the shards (optionally only of some mask kinds), in manifest order; each shard read is first
    checked against its manifest entry (size and sha256)."""
    import pyarrow.compute as pc

    manifest = read_manifest(data_dir)
    tables = []
    for entry in manifest["shards"]:
        if mask_kinds is not None and MASK_KIND in entry and not set(entry[MASK_KIND]) & set(mask_kinds):
            continue  # a shard of other kinds only is not opened
        data = verified_shard_bytes(data_dir, entry)
        tables.append(pq.read_table(pa.BufferReader(data), schema=SHARD_SCHEMA))
    table = pa.concat_tables(tables) if tables else SHARD_SCHEMA.empty_table()
    if mask_kinds is not None:
        table = table.filter(pc.is_in(table[MASK_KIND], value_set=pa.array(list(mask_kinds))))
    return table
