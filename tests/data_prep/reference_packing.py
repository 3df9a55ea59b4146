"""Reference implementations the library's fast paths are tested against (list-based, quadratic)."""

from __future__ import annotations

from data_prep.contract import IGNORE, TENSOR_COLUMNS
from data_prep.layout import TokenizedDialogue
from data_prep.packing import _check


def pack_first_fit_decreasing_naive(lengths: list[int], seq_len: int) -> list[list[int]]:
    """The O(n * bins) reference: scan the bins in order for the first with room."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        _check(n, seq_len, i)
        for b, room in enumerate(free):
            if room >= n:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(seq_len - n)
    return bins


def build_row(items: list[TokenizedDialogue], seq_len: int, pad_id: int) -> dict:
    """Concatenate items into one row of exactly ``seq_len`` tokens (padding at the end), as Python lists."""
    row = {c: [] for c in TENSOR_COLUMNS}
    kinds = {it.mask_kind for it in items}
    if len(kinds) != 1:
        raise ValueError(f"one packed row must hold one mask kind, got {sorted(kinds)}")
    for doc, it in enumerate(items):
        row["input_ids"] += it.input_ids
        row["labels"] += it.labels
        row["position_ids"] += list(range(len(it)))
        row["doc_ids"] += [doc] * len(it)
        row["utt_ids"] += it.utt_ids
        row["eou"] += it.eou
        row["blk"] += it.blk
    pad = seq_len - len(row["input_ids"])
    if pad < 0:
        raise ValueError(f"row of {len(row['input_ids'])} tokens exceeds seq_len={seq_len}")
    row["input_ids"] += [pad_id] * pad
    row["labels"] += [IGNORE] * pad
    row["position_ids"] += [0] * pad
    row["doc_ids"] += [-1] * pad
    row["utt_ids"] += [-1] * pad
    row["eou"] += [False] * pad
    row["blk"] += [-1] * pad
    row["mask_kind"] = kinds.pop()
    row["num_docs"] = len(items)
    row["dialogue_ids"] = [it.dialogue_id for it in items]
    return row
