"""Arrow tables between the steps.

*Pieces* (one row per dialogue window, or one row per rejected record) come out of read → validate → tokenize
→ window, in input order. *Items* are what packing places: laid-out windows or memory samples, with every
per-token column. Both engines (Ray and local) build exactly these tables, so packing and writing are shared.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from data_prep.contract import BLK, EOU, INPUT_IDS, LABELS, MASK_KIND, UTT_IDS
from data_prep.layout import TokenizedDialogue
from data_prep.schema import DataError

_TOKEN_COLUMNS = [
    (INPUT_IDS, pa.list_(pa.int32())),
    (LABELS, pa.list_(pa.int32())),
    (UTT_IDS, pa.list_(pa.int32())),
    (EOU, pa.list_(pa.bool_())),
    (BLK, pa.list_(pa.int32())),
]
ITEM_SCHEMA = pa.schema([("dialogue_id", pa.string()), (MASK_KIND, pa.string()), *_TOKEN_COLUMNS])
PIECE_SCHEMA = pa.schema([
    ("file_index", pa.int32()),  # which input file
    ("ordinal", pa.int64()),  # record number inside that file (0-based, blank lines not counted)
    ("line", pa.string()),  # where the record starts (for messages)
    ("source", pa.string()),
    ("error", pa.string()),  # "" when kept
    ("code", pa.string()),  # error category ("" when kept)
    ("window", pa.int32()),  # window index inside the dialogue (0 unless split)
    ("windows", pa.int32()),  # windows of this dialogue
    ("utterances", pa.int32()),  # utterances in this window
    ("tokens_rejected", pa.int64()),  # tokens of a record rejected after tokenization
    ("dialogue_id", pa.string()),
    (MASK_KIND, pa.string()),
    ("supervised_by_role", pa.string()),  # template=chat: JSON role -> supervised tokens of the window ("" otherwise)
    *_TOKEN_COLUMNS,
])


def items_table(items: list[TokenizedDialogue]) -> pa.Table:
    cols = {"dialogue_id": [it.dialogue_id for it in items], MASK_KIND: [it.mask_kind for it in items]}
    for name, _ in _TOKEN_COLUMNS:
        cols[name] = [getattr(it, name) for it in items]
    return pa.Table.from_pydict(cols, schema=ITEM_SCHEMA)


class PieceBuilder:
    """Collects the outcome of each record of one chunk, in order."""

    def __init__(self):
        self.rows: list[dict] = []

    def _base(self, file_index: int, ordinal: int, line, source: str) -> dict:
        return {"file_index": file_index, "ordinal": ordinal, "line": str(line), "source": source}

    def reject(self, file_index: int, ordinal: int, err: DataError, tokens: int = 0) -> None:
        self.rows.append(self._base(file_index, ordinal, err.line, err.source) | {
            "error": err.reason, "code": err.code, "window": 0, "windows": 0, "utterances": 0,
            "tokens_rejected": tokens, "dialogue_id": "", MASK_KIND: "", "supervised_by_role": "",
            **{name: [] for name, _ in _TOKEN_COLUMNS}})

    def keep(self, file_index: int, ordinal: int, line, source: str, windows: list[TokenizedDialogue]) -> None:
        for w in windows:
            self.rows.append(self._base(file_index, ordinal, line, source) | {
                "error": "", "code": "", "window": w.window, "windows": len(windows), "utterances": w.num_utterances,
                "tokens_rejected": 0, "dialogue_id": w.dialogue_id, MASK_KIND: w.mask_kind,
                "supervised_by_role": w.supervised_by_role,
                **{name: getattr(w, name) for name, _ in _TOKEN_COLUMNS}})

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=PIECE_SCHEMA)


def pieces_from_columns(scalars: list[dict], row_lengths: list[int], cols: dict) -> pa.Table:
    """A pieces table from per-row scalar fields (``scalars``, in row order), the token count of each row
    (0 for rejected records) and the flat token columns of the kept rows (``windows.layout_columns``)."""
    offsets = pa.array(np.concatenate([[0], np.cumsum(np.asarray(row_lengths, dtype=np.int64))]).astype(np.int32))
    arrays = []
    for f in PIECE_SCHEMA:
        if isinstance(f.type, pa.ListType):
            values = cols[f.name] if len(cols[f.name]) else np.zeros(0, dtype=np.bool_ if f.type.value_type == pa.bool_() else np.int32)
            arrays.append(pa.ListArray.from_arrays(offsets, pa.array(values, type=f.type.value_type)))
        else:
            arrays.append(pa.array([r[f.name] for r in scalars], type=f.type))
    return pa.Table.from_arrays(arrays, schema=PIECE_SCHEMA)
