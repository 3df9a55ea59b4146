"""Parallel tokenization on Ray Data: blocks of dialogues → tokenizer actors → token ids, in block order.

Blocks have a fixed size (``data.block_dialogues``) and results are reassembled by block index with
``preserve_order``, so the output is byte-identical whatever the number of workers.
"""

from __future__ import annotations

import os
import pickle


def ensure_ray(workers: int | None = None):
    """Join the cluster of RAY_ADDRESS (e.g. inside `ray job submit`), or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False, configure_logging=False)
    else:
        tmp = f"/tmp/ray-cs-{os.getpid()}"  # short: AF_UNIX socket paths are limited to 107 bytes
        ray.init(address="local", num_cpus=max(workers or os.cpu_count() or 1, 1), include_dashboard=False,
                 _temp_dir=tmp, log_to_driver=False, configure_logging=False)
    return ray


class _Tokenize:
    """Ray Data actor: holds one tokenizer, maps a block of dialogues' texts to token ids."""

    def __init__(self, tokenizer_dir: str):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(tokenizer_dir)

    def __call__(self, batch: dict) -> dict:
        out = []
        for payload in batch["texts"]:
            dialogues = pickle.loads(payload)
            flat = [t for d in dialogues for t in d]
            ids = self.tok(flat, add_special_tokens=False)["input_ids"] if flat else []
            res, k = [], 0
            for d in dialogues:
                res.append(ids[k:k + len(d)])
                k += len(d)
            out.append(pickle.dumps(res))
        return {"block": batch["block"], "ids": out}


def tokenize_blocks(blocks: list[list[list[str]]], tokenizer_dir: str, workers: int | None) -> list[list[list[list[int]]]]:
    """``blocks[b][d][u]`` utterance texts → token ids of the same shape, tokenized by Ray Data actors."""
    ray = ensure_ray(workers)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    n = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.from_items([{"block": i, "texts": pickle.dumps(b)} for i, b in enumerate(blocks)], override_num_blocks=max(1, min(len(blocks), 4 * n)))
    ds = ds.map_batches(_Tokenize, fn_constructor_args=(tokenizer_dir,), batch_size=1, compute=ray.data.ActorPoolStrategy(size=n), num_cpus=1)
    rows = sorted(ds.take_all(), key=lambda r: r["block"])
    return [pickle.loads(r["ids"]) for r in rows]
