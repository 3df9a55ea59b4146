"""The public shard format: Parquet, one row per packed training sequence, plus ``manifest.json``.

Columns (all lists have ``seq_len`` entries): ``input_ids``, ``labels`` (-100 = no loss), ``position_ids``
(restart at 0 per dialogue), ``doc_ids`` (-1 = padding), ``utt_ids``, ``eou`` (bool), ``blk`` (block index for
SMR/LMR, else equal to ``utt_ids``), ``mask_kind`` (string), ``dialogue_ids`` (source ids of the packed dialogues).
"""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("position_ids", pa.list_(pa.int32())),
    ("doc_ids", pa.list_(pa.int32())),
    ("utt_ids", pa.list_(pa.int32())),
    ("eou", pa.list_(pa.bool_())),
    ("blk", pa.list_(pa.int32())),
    ("mask_kind", pa.string()),
    ("dialogue_ids", pa.list_(pa.string())),
])
MANIFEST = "manifest.json"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shard(rows: list[dict], path: str) -> dict:
    """Write rows to one Parquet file (deterministic bytes) and return its manifest entry."""
    table = pa.Table.from_pydict({f.name: [r[f.name] for r in rows] for f in SCHEMA}, schema=SCHEMA)
    pq.write_table(table, path, compression="zstd", write_statistics=False)
    tokens = sum(sum(1 for d in r["doc_ids"] if d >= 0) for r in rows)
    slots = sum(len(r["input_ids"]) for r in rows)
    return {
        "file": os.path.basename(path),
        "rows": len(rows),
        "tokens": tokens,
        "padding_fraction": round(1 - tokens / slots, 6) if slots else 0.0,
        "dialogues": sum(r["num_docs"] for r in rows),
        "mask_kind": sorted({r["mask_kind"] for r in rows}),
        "sha256": sha256_file(path),
    }


def read_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{data_dir}: no {MANIFEST}; run `convsink prep` first (or the prep was interrupted)")
    with open(path) as f:
        return json.load(f)


def read_rows(data_dir: str, mask_kinds: tuple[str, ...] | None = None) -> pa.Table:
    """All rows of all shards, in manifest order (optionally only some mask kinds)."""
    manifest = read_manifest(data_dir)
    tables = [pq.read_table(os.path.join(data_dir, s["file"]), schema=SCHEMA) for s in manifest["shards"]]
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    if mask_kinds is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.is_in(table["mask_kind"], value_set=pa.array(list(mask_kinds))))
    return table
