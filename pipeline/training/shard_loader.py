"""Shard loader: each data-parallel rank reads a disjoint, deterministic slice; resumable at the exact sample.

The sample stream is an endless sequence of seeded epochs per mask kind, the kinds taking turns (so memory-stage
batches mix SMR and LMR). Optimizer step s
consumes global samples ``[s * G, (s + 1) * G)`` with ``G = micro_batch * grad_accum * dp_size``; inside a step,
micro-step m of rank r takes the ``micro_batch`` samples starting at ``s*G + (m * dp_size + r) * micro_batch``.
So the position in the data is a function of the step alone: a resume at step s reads exactly what an
uninterrupted run would have read.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from data_prep.shards import read_manifest, read_rows
from pipeline.contract import (
    DIALOGUE_STAGE,
    INPUT_IDS,
    MASK_KIND,
    STAGE_KINDS,
    TENSOR_COLUMNS,
    batch_from_rows,
    targets_from_labels,  # noqa: F401  (importers move to pipeline.contract)
)


@dataclass
class ShardData:
    """All rows of the shards for one stage, as numpy arrays ``(N, T)`` plus the mask kind per row."""

    arrays: dict
    mask_kind: list
    seq_len: int
    order: dict = field(default_factory=dict, repr=False)
    order_key: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.mask_kind)

    @property
    def kinds(self) -> list:
        """The mask kinds present, sorted."""
        return sorted(self.rows_of)

    @functools.cached_property
    def rows_of(self) -> dict:
        """Row indices per mask kind."""
        kinds = np.asarray(self.mask_kind)
        return {k: np.flatnonzero(kinds == k) for k in sorted(set(self.mask_kind))}


def load_shards(data_dir: str, stage: str = DIALOGUE_STAGE) -> ShardData:
    """The rows of the stage's mask kinds; every shard opened is first checked against its manifest entry (size and
    sha256: ``data_prep.shards.ShardIntegrityError``, one line naming the shard, on a mismatch)."""
    kinds = STAGE_KINDS[stage]
    manifest = read_manifest(data_dir)
    table = read_rows(data_dir, kinds)
    if table.num_rows == 0:
        have = sorted({k for s in manifest["shards"] for k in s.get(MASK_KIND, [])})
        raise ValueError(f"{data_dir}: no {'/'.join(kinds)} rows for stage '{stage}' (the shards hold: {', '.join(have) or 'nothing'})")
    arrays = {}
    for c in TENSOR_COLUMNS:
        flat = table[c].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        arrays[c] = flat.reshape(table.num_rows, -1)
    return ShardData(arrays, table[MASK_KIND].to_pylist(), arrays[INPUT_IDS].shape[1])


def kind_order(rows: np.ndarray, seed: int, kind: int, epoch: int) -> np.ndarray:
    """One epoch of one mask kind's rows: a permutation seeded by (seed, kind, epoch)."""
    return np.random.default_rng([seed, kind, epoch]).permutation(rows)


def global_index(sample: int, data: "ShardData", seed: int) -> int:
    """Row of the ``sample``-th sample of the endless stream.

    The K mask kinds of a stage take turns: sample i is of kind ``i % K``, the ``i // K``-th sample of that
    kind's own endless stream of seeded epochs. So any K consecutive samples hold every kind, and a memory-stage
    micro-batch of two or more samples always mixes SMR and LMR (the tasks weigh equally, whatever their row
    counts)::

        sample   0    1    2    3    4    5   ...
        kind     lmr  smr  lmr  smr  lmr  smr
    """
    kinds = data.kinds
    k = sample % len(kinds)
    rows = data.rows_of[kinds[k]]
    epoch, within = divmod(sample // len(kinds), len(rows))
    if data.order_key.get(k) != (seed, epoch):  # one epoch per kind kept at a time
        data.order[k], data.order_key[k] = kind_order(rows, seed, k, epoch), (seed, epoch)
    return int(data.order[k][within])



def micro_batch(data: ShardData, step: int, micro: int, *, micro_size: int, grad_accum: int, dp_rank: int,
                dp_size: int, seed: int) -> dict:
    """The batch of rank ``dp_rank`` for micro-step ``micro`` of optimizer step ``step``."""
    per_step = micro_size * grad_accum * dp_size
    start = step * per_step + (micro * dp_size + dp_rank) * micro_size
    rows = [global_index(start + i, data, seed) for i in range(micro_size)]
    return batch_from_rows(data.arrays, data.mask_kind, rows)
