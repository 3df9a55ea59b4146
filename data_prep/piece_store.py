"""Pieces whose token data stays where it was made (the Ray engine): the driver keeps only what counting and the
packing plan need, so its memory hardly grows with the corpus.

A worker task returns two tables per chunk: its items (``items.ITEM_SCHEMA``, kept in the object store, the
driver holds only the reference) and a *lean* pieces table: every scalar column of ``items.PIECE_SCHEMA``, the
token count of each row (``PIECE_TOKENS``) and where its items are (``PIECE_CHUNK``, ``PIECE_ROW``), without the
token columns. ``StoredItems`` stands for the kept items in the driver (lengths, ids, locations); a shard job
carries an ``ItemRefs`` (locations only) that its worker turns back into the very items table the in-memory path
would have taken, so the shards are byte-identical.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.contract import INPUT_IDS
from data_prep.items import ITEM_SCHEMA, PIECE_SCHEMA

PIECE_TOKENS = "piece_tokens"  # tokens of the row (0 for a rejected record)
PIECE_CHUNK = "piece_chunk"  # which chunk task made the row (its index in the engine's item references)
PIECE_ROW = "piece_row"  # the row inside that chunk's items table
TOKEN_COLUMNS = [f.name for f in PIECE_SCHEMA if isinstance(f.type, pa.ListType)]


def split_pieces(table: pa.Table, chunk: int) -> tuple[pa.Table, pa.Table]:
    """(items of every row, lean pieces) of one chunk's pieces table."""
    lean = table.drop_columns(TOKEN_COLUMNS)
    n = table.num_rows
    lean = lean.append_column(PIECE_TOKENS, pc.list_value_length(table[INPUT_IDS]).cast(pa.int64()))
    lean = lean.append_column(PIECE_CHUNK, pa.array(np.full(n, chunk, dtype=np.int32)))
    lean = lean.append_column(PIECE_ROW, pa.array(np.arange(n, dtype=np.int32)))
    return table.select(ITEM_SCHEMA.names).cast(ITEM_SCHEMA), lean


def concat_pieces(tables: list[pa.Table]) -> pa.Table:
    """Pieces tables in order, full or lean (a lean table gains rejected rows from ``duplicate_ids``): columns one
    of them lacks are null there."""
    return pa.concat_tables(tables, promote_options="default")


def piece_lengths(table: pa.Table) -> np.ndarray:
    """Tokens of each row of a pieces (or items) table, full or lean."""
    if PIECE_TOKENS in table.column_names:
        lean = pc.fill_null(table[PIECE_TOKENS], 0).to_numpy(zero_copy_only=False).astype(np.int64)
        if INPUT_IDS not in table.column_names:
            return lean
        full = pc.fill_null(pc.list_value_length(table[INPUT_IDS]), 0).to_numpy(zero_copy_only=False)
        return lean + full.astype(np.int64)  # a row is either lean (no token lists) or full (no PIECE_TOKENS)
    return pc.list_value_length(table[INPUT_IDS]).to_numpy(zero_copy_only=False).astype(np.int64)


class ItemRefs:
    """Where the items of one shard are (chunk, row per item, in placement order); ``table`` fetches them."""

    def __init__(self, chunk: np.ndarray, row: np.ndarray):
        self.chunk, self.row = chunk, row
        self.num_rows = len(row)

    def table(self, refs: list) -> pa.Table:
        """The items table, from the chunks' items in the object store (``refs``: the engine's references)."""
        import ray

        needed = np.unique(self.chunk)
        tables = ray.get([refs[int(c)] for c in needed])
        starts = np.concatenate([[0], np.cumsum([t.num_rows for t in tables])[:-1]]).astype(np.int64)
        index = starts[np.searchsorted(needed, self.chunk)] + self.row
        return pa.concat_tables(tables).take(pa.array(index))


class StoredItems:
    """The kept dialogue items of a lean pieces table: what the plan needs in the driver, the tokens elsewhere."""

    def __init__(self, kept: pa.Table, refs: list):
        self.refs = refs
        self.num_rows = kept.num_rows
        self.lengths = piece_lengths(kept)
        self.dialogue_ids = kept["dialogue_id"]
        self.chunk = kept[PIECE_CHUNK].to_numpy().astype(np.int64)
        self.row = kept[PIECE_ROW].to_numpy().astype(np.int64)

    def __getitem__(self, name: str):
        if name != "dialogue_id":
            raise KeyError(f"{name}: a stored item's tokens stay in the object store (materialize() to read them)")
        return self.dialogue_ids

    def take(self, order) -> ItemRefs:
        order = np.asarray(order, dtype=np.int64)
        return ItemRefs(self.chunk[order], self.row[order])

    def materialize(self) -> pa.Table:
        """Every item in the driver (the memory tasks sample from the whole corpus)."""
        return ItemRefs(self.chunk, self.row).table(self.refs)


def item_lengths(items) -> list[int]:
    """Tokens of each item of an items table or of ``StoredItems``."""
    if isinstance(items, StoredItems):
        return items.lengths.tolist()
    return pc.list_value_length(items[INPUT_IDS]).to_numpy(zero_copy_only=False).tolist()


def dialogue_items(kept: pa.Table, refs: list | None):
    """The items of the kept rows: an in-memory table (full pieces) or ``StoredItems`` (lean pieces)."""
    if PIECE_CHUNK in kept.column_names and refs is not None:
        return StoredItems(kept, refs)
    return kept.select(ITEM_SCHEMA.names).cast(ITEM_SCHEMA)


def resolve_items(items, refs: list | None) -> pa.Table:
    """A shard job's items as a table (``ItemRefs`` fetched from the object store)."""
    return items.table(refs) if isinstance(items, ItemRefs) else items
