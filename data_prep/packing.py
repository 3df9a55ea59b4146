"""First-fit-decreasing packing of whole dialogues (or windows) into fixed-length sequences.

A packed row of ``seq_len`` tokens holds several dialogues back to back and padding only at its end:

    doc_ids   0 0 0 0 0  1 1 1  2 2 2 2  -1 -1
    position  0 1 2 3 4  0 1 2  0 1 2 3   0  0
"""

from __future__ import annotations

from .tokenize import IGNORE, TokenizedDialogue

COLUMNS = ("input_ids", "labels", "position_ids", "doc_ids", "utt_ids", "eou", "blk")


def pack_first_fit_decreasing(items: list[TokenizedDialogue], seq_len: int) -> list[list[int]]:
    """Return bins as lists of item indices. Longest first (ties by index, so it is deterministic); each item
    goes into the first bin with room. Bins keep their creation order, items their placement order."""
    order = sorted(range(len(items)), key=lambda i: (-len(items[i]), i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(items[i])
        if n > seq_len:
            raise ValueError(f"item {items[i].dialogue_id} has {n} tokens > seq_len={seq_len}; split it first")
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
    """Concatenate items into one row of exactly ``seq_len`` tokens (padding at the end)."""
    row = {c: [] for c in COLUMNS}
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
