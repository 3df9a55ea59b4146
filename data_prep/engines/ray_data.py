"""The Ray Data engine (``engine: ray``): the same steps as the reference loop, spread over Ray workers.

* read + validate + tokenize + window: one Ray task per chunk (at most ``workers`` at a time); each reads
  its byte range (pyarrow filesystems: local paths or URIs), parses and validates its records, tokenizes all of
  their utterances in one batched call of the Rust tokenizer and lays out the windows. It returns two objects
  (``piece_store.split_pieces``): its items, which stay in the object store (``item_refs``), and the lean pieces
  (no token columns), the only part the driver fetches: its memory hardly grows with the corpus;
* SMR/LMR samples: ranges of sample indices, built where the tasks run (each sample has its own seeded RNG);
* pack + write: the driver plans first-fit-decreasing bins over the item lengths (a global decision, cheap),
  then shard tasks (Ray Data) fetch their items from the object store, build the packed rows and encode the
  Parquet bytes; the driver writes them under stable names, then the manifest.

``preserve_order`` keeps every stream in input order, so the output is byte-identical whatever the number of
workers (and identical to the local engine). Runs on an embedded local Ray by default, or joins the cluster of
``RAY_ADDRESS`` (set inside ``ray job submit``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import time
from typing import Iterator

import pyarrow as pa

from data_prep.config import DataConfig
from data_prep.layout import FastEncoder
from data_prep.piece_store import split_pieces
from data_prep.ray_cluster import ensure_ray
from data_prep.reader import chunk_tasks, process_chunk
from data_prep.tokenizer_loading import SpecialIds

_ENCODERS: dict = {}  # per worker process: tokenizer digest -> FastEncoder (loaded once per tokenizer, ~0.2 s)


def _encoder(tokenizer: dict) -> FastEncoder:
    """This worker's encoder for ``tokenizer`` = {digest, json (an ObjectRef to tokenizer.json's text) or dir}."""
    enc = _ENCODERS.get(tokenizer["digest"])
    if enc is None:
        import ray

        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per task: parallelism comes from Ray
        enc = FastEncoder.from_json(ray.get(tokenizer["json"])) if tokenizer.get("json") is not None \
            else FastEncoder(tokenizer["dir"])
        _ENCODERS[tokenizer["digest"]] = enc
    return enc


def _chunk_pieces(row: dict, chunk: int, tokenizer: dict, ids: SpecialIds, cfg: dict) -> tuple[pa.Table, pa.Table]:
    """One chunk task: (its items, its lean pieces)."""
    from data_prep.reader import ChunkTask

    table = process_chunk(ChunkTask(**row), _encoder(tokenizer), ids, DataConfig.model_validate(cfg))
    return split_pieces(table, chunk)


def _apply(batch: pa.Table, fn, shared) -> pa.Table:
    import ray

    kwargs = ray.get(shared) if isinstance(shared, ray.ObjectRef) else shared
    out = [pickle.dumps(fn(pickle.loads(job), **kwargs), protocol=5) for job in batch["job"].to_pylist()]
    return pa.table({"result": pa.array(out, type=pa.large_binary())})


class RayEngine:
    name = "ray"

    def __init__(self, cfg: DataConfig, tokenizer, tokenizer_dir: str, ids: SpecialIds):
        t0 = time.perf_counter()
        self.ray = ensure_ray(num_cpus=cfg.workers or 0, worker_logs=False, temp_tag="cs")
        self.init_seconds = time.perf_counter() - t0
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        if hasattr(ctx, "print_on_execution_start"):
            ctx.print_on_execution_start = False
        self.cfg, self.tokenizer_dir, self.ids = cfg, tokenizer_dir, ids
        # workers get the tokenizer through the object store (a cluster's workers need not see the driver's disk)
        path = os.path.join(tokenizer_dir, "tokenizer.json")
        self.tokenizer = {"dir": tokenizer_dir, "json": None}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            self.tokenizer.update(json=self.ray.put(text), digest=hashlib.sha256(text.encode()).hexdigest())
        else:
            self.tokenizer["digest"] = tokenizer_dir
        self.workers = cfg.workers or max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    def pieces(self, paths: list[str], metas: list[dict]) -> Iterator[pa.Table]:
        """Lean pieces tables in input order, one per chunk task; the items stay in the object store
        (``self.item_refs[chunk]``). At most ``workers`` tasks run at a time."""
        rows = [t.to_row() for t in chunk_tasks(paths, metas, self.cfg, self.workers)]
        task = self.ray.remote(num_returns=2, num_cpus=1, scheduling_strategy="SPREAD")(_chunk_pieces)  # over a cluster's nodes
        kwargs = {"tokenizer": self.tokenizer, "ids": self.ids, "cfg": self.cfg.model_dump(mode="json")}
        self.item_refs, lean, running = [], [], set()
        done = 0
        while done < len(rows):
            while len(lean) < len(rows) and len(running) < self.workers:
                items_ref, lean_ref = task.remote(rows[len(lean)], len(lean), **kwargs)
                self.item_refs.append(items_ref)
                lean.append(lean_ref)
                running.add(lean_ref)
            ready, _ = self.ray.wait(list(running), num_returns=1)
            running.difference_update(ready)
            while done < len(lean) and lean[done] not in running:
                yield self.ray.get(lean[done])
                lean[done] = None  # fetched: the driver keeps no reference to it
                done += 1

    def map(self, fn, jobs: list, **kwargs) -> Iterator:
        """``fn(job, **kwargs)`` for each job on Ray tasks; results in job order."""
        import ray.data

        if not jobs:
            return
        shared = self.ray.put(kwargs)
        ds = ray.data.from_items([{"job": pickle.dumps(j, protocol=5)} for j in jobs], override_num_blocks=len(jobs))
        ds = ds.map_batches(_apply, batch_size=1, batch_format="pyarrow", compute=self._compute(len(jobs)), num_cpus=1,
                            fn_kwargs={"fn": fn, "shared": shared})
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            for blob in batch["result"].to_pylist():
                yield pickle.loads(blob)

    def _compute(self, n_inputs: int):
        import ray.data

        return ray.data.TaskPoolStrategy(size=max(1, min(self.workers, n_inputs)))

    def close(self) -> None:
        self.item_refs = []  # the items in the object store may go
