"""First-fit-decreasing packing of whole dialogues (or windows, or memory samples) into fixed-length sequences.

A packed row of ``seq_len`` tokens holds several items back to back and padding only at its end:

    doc_ids   0 0 0 0 0  1 1 1  2 2 2 2  -1 -1
    position  0 1 2 3 4  0 1 2  0 1 2 3   0  0

First fit is found with a max segment tree over the free capacity of the bins (leaves not yet opened hold
``seq_len``, so "the first bin with room" is also "open a new bin" when no open bin has room): O(n log n),
the same bins as the quadratic scan (kept as ``pack_first_fit_decreasing_naive`` for the tests).
"""

from __future__ import annotations

from .tokenize import IGNORE, TokenizedDialogue

COLUMNS = ("input_ids", "labels", "position_ids", "doc_ids", "utt_ids", "eou", "blk")


def _check(n: int, seq_len: int, name) -> None:
    if n > seq_len:
        raise ValueError(f"item {name} has {n} tokens > seq_len={seq_len}; split it first")
    if n <= 0:
        raise ValueError(f"item {name} is empty")


def ffd_bins(lengths: list[int], seq_len: int, names=None) -> list[list[int]]:
    """Bins (lists of item indices) by first-fit-decreasing. Items go longest first (ties by index, so it is
    deterministic) into the first bin with room. Bins keep their creation order, items their placement order."""
    n = len(lengths)
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    size = 1
    while size < max(n, 1):
        size *= 2
    tree = [seq_len] * (2 * size)  # tree[size + b] = free room of bin b; internal nodes hold the max of children
    bins: list[list[int]] = []
    for i in order:
        need = lengths[i]
        _check(need, seq_len, names[i] if names is not None else i)
        node = 1
        while node < size:  # descend to the leftmost leaf with room >= need
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        tree[node] -= need
        node //= 2
        while node:
            left, right = tree[2 * node], tree[2 * node + 1]
            tree[node] = left if left >= right else right
            node //= 2
    return bins


def pack_first_fit_decreasing(items: list[TokenizedDialogue], seq_len: int) -> list[list[int]]:
    return ffd_bins([len(it) for it in items], seq_len, [it.dialogue_id for it in items])


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
