"""First-fit-decreasing packing: items intact, capacities respected, same bins as the quadratic reference, fast;
the vectorized shard encoder equals the list-based row builder."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pytest

from data_prep.contract import SHARD_SCHEMA as SCHEMA
from data_prep.items import items_table
from data_prep.layout import layout_dialogue
from data_prep.packing import ffd_bins
from data_prep.shards import pack_table
from data_prep.tokenizer_loading import SpecialIds
from tests.data_prep.reference_packing import build_row, pack_first_fit_decreasing_naive

IDS = SpecialIds(bos=1, eou=2, pad=0)


@pytest.mark.parametrize("seed", range(8))
def test_ffd_property_and_reference(seed):
    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(16, 300))
    lengths = rng.integers(1, seq_len + 1, size=int(rng.integers(1, 400))).tolist()
    bins = ffd_bins(lengths, seq_len)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths))), "every item exactly once"
    assert all(sum(lengths[i] for i in b) <= seq_len for b in bins), "capacity respected"
    assert bins == pack_first_fit_decreasing_naive(lengths, seq_len)
    # first fit: an item never fits an earlier bin (as it was when the item was placed)
    placed = {i: k for k, b in enumerate(bins) for i in b}
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    room = [seq_len] * len(bins)
    for i in order:
        assert all(room[k] < lengths[i] for k in range(placed[i]))
        room[placed[i]] -= lengths[i]


def test_ffd_rejects_items_longer_than_seq_len():
    with pytest.raises(ValueError, match="split it first"):
        ffd_bins([5, 11], 10)


def test_ffd_is_fast_for_tens_of_thousands():
    rng = np.random.default_rng(1)
    lengths = rng.integers(50, 3000, size=50_000).tolist()
    t0 = time.perf_counter()
    bins = ffd_bins(lengths, 8192)
    assert time.perf_counter() - t0 < 15  # the quadratic scan takes minutes here
    assert sum(lengths) / (len(bins) * 8192) > 0.99


def test_pack_table_equals_build_row():
    rng = np.random.default_rng(3)
    seq_len = 40
    items = [layout_dialogue(f"d{k}", [list(rng.integers(3, 50, size=int(rng.integers(1, 6)))) for _ in range(int(rng.integers(1, 4)))], IDS)
             for k in range(25)]
    bins = ffd_bins([len(it) for it in items], seq_len)
    rows = [build_row([items[i] for i in b], seq_len, IDS.pad) for b in bins]
    expected = pa.Table.from_pydict({f.name: [r[f.name] for r in rows] for f in SCHEMA}, schema=SCHEMA)
    order = [i for b in bins for i in b]
    row_of_item = np.repeat(np.arange(len(bins)), [len(b) for b in bins])
    got = pack_table(items_table([items[i] for i in order]), row_of_item, seq_len, IDS.pad)
    assert got.equals(expected)
    for r in got.to_pylist():
        real = [d for d in r["doc_ids"] if d >= 0]
        assert r["doc_ids"][:len(real)] == real and all(d == -1 for d in r["doc_ids"][len(real):]), "padding only at the end"


@pytest.mark.parametrize("seed", range(6))
def test_fill_and_ffd_then_fill_keep_items_intact_and_never_lose_to_ffd(seed):
    from data_prep.packing import ffd_then_fill, fill_bins

    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(64, 2048))
    lengths = rng.integers(1, seq_len + 1, size=int(rng.integers(1, 600))).tolist()
    for bins in (fill_bins(lengths, seq_len), ffd_then_fill(lengths, seq_len)):
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= seq_len for b in bins)
    assert len(ffd_then_fill(lengths, seq_len)) <= len(ffd_bins(lengths, seq_len))
    assert ffd_then_fill(lengths, seq_len) == ffd_then_fill(list(lengths), seq_len), "deterministic"


def test_ffd_then_fill_beats_ffd_where_ffd_leaves_a_sparse_tail():
    from data_prep.packing import ffd_then_fill, pack_bins

    # FFD: 5+4, 4+3+2, 2 -> 3 bins; bin completion: 5+3+2, 4+4+2 -> 2 bins (both full)
    lengths = [5, 4, 4, 3, 2, 2]
    assert len(pack_bins(lengths, 10, "ffd")) == 3
    assert ffd_then_fill(lengths, 10) == pack_bins(lengths, 10) == [[0, 3, 4], [1, 2, 5]]
    with pytest.raises(ValueError, match="unknown packing"):
        pack_bins(lengths, 10, "best")
