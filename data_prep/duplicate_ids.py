"""Duplicate dialogue ids inside one input file, found on the driver as the pieces stream in (in input order, so
both engines find the same ones): the later record is rejected, naming the line of the first."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.items import PieceBuilder
from data_prep.piece_store import concat_pieces, piece_lengths
from data_prep.schema import DataError
from data_prep.sources import display_name


class DuplicateIds:
    """The first line of every kept dialogue id per input file, across the pieces tables of one prep."""

    def __init__(self):
        self.first_line: dict[tuple[int, str], str] = {}

    def reject_repeats(self, table: pa.Table) -> pa.Table:
        """``table`` (pieces, in input order) with every record whose id an earlier kept record of the same file
        has turned into one rejected row (code ``duplicate_id``)."""
        heads = pc.and_(pc.equal(table["error"], ""), pc.equal(table["window"], 0))
        idx = np.flatnonzero(heads.to_numpy(zero_copy_only=False))
        cols = {c: table[c].take(idx).to_pylist() for c in ("file_index", "ordinal", "line", "source", "dialogue_id")}
        repeats = {}
        for fi, ordinal, line, source, did in zip(*cols.values()):
            key = (fi, did[len(display_name(source)) + 1:])  # the record's own id (dialogue_id is FILE:ID)
            if key in self.first_line:
                first = self.first_line[key]  # a file's line number, or a dataset's "row N"
                repeats[(fi, ordinal)] = DataError(source, int(line) if line.isdigit() else line, f"duplicate id "
                                                   f"{key[1]!r} (first at {'line ' * first.isdigit()}{first})", "duplicate_id")
            else:
                self.first_line[key] = line
        if not repeats:
            return table
        return _as_rejections(table, repeats)


def _as_rejections(table: pa.Table, repeats: dict) -> pa.Table:
    """``table`` with the rows of each record of ``repeats`` ({(file index, ordinal): DataError}) replaced by one
    rejected row carrying the record's token count, still in input order."""
    fi = table["file_index"].to_numpy()
    ordinal = table["ordinal"].to_numpy()
    lengths = piece_lengths(table)  # full or lean pieces
    hit = np.array([(int(f), int(o)) in repeats for f, o in zip(fi, ordinal)], dtype=bool)
    rejected = PieceBuilder()
    for (f, o), err in repeats.items():
        mine = hit & (fi == f) & (ordinal == o)
        tokens = int(lengths[mine].sum()) - (int(mine.sum()) - 1)  # one BOS per extra window is not the record's
        rejected.reject(f, o, err, tokens=tokens)
    kept = table.filter(pa.array(~hit))
    return concat_pieces([kept, rejected.table()]).sort_by(
        [("file_index", "ascending"), ("ordinal", "ascending"), ("window", "ascending")])
