"""One prep run in its own process, for ``convsink bench prep --scale``: wall time, the driver's peak RSS
(``getrusage``: this process only) and the Ray worker processes' peak RSS (sampled), written as JSON.

    python -m pipeline.bench.prep_child --engine ray --workers 2 --out DIR --result FILE INPUT...
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import threading
import time

import psutil

SAMPLE_SECONDS = 0.25


def _ray_workers(me: psutil.Process) -> list[psutil.Process]:
    """This process's descendants that are Ray worker processes (``ray::...`` titles)."""
    out = []
    for p in me.children(recursive=True):
        try:
            if p.name().startswith("ray::") or "default_worker.py" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


class WorkerRss:
    """Samples the Ray workers' RSS in a thread: the peak of their sum and of the largest one, in MB."""

    def __init__(self):
        self.peak_sum = self.peak_one = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(SAMPLE_SECONDS):
            rss = []
            for p in _ray_workers(me):
                try:
                    rss.append(p.memory_info().rss / 2**20)
                except psutil.Error:
                    pass
            if rss:
                self.peak_sum, self.peak_one = max(self.peak_sum, sum(rss)), max(self.peak_one, max(rss))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"workers_peak_rss_sum_mb": round(self.peak_sum, 1), "worker_peak_rss_mb": round(self.peak_one, 1)}


def run_one(inputs: list[str], out: str, engine: str, workers: int, seq_len: int) -> dict:
    """Prep ``inputs`` into ``out`` with ``engine`` in this process; the figures the bench records."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from data_prep.config import DataConfig
    from data_prep.prep import prepare

    cfg = DataConfig(seq_len=seq_len, engine=engine, workers=workers)
    sampler = WorkerRss()
    t0 = time.perf_counter()
    manifest = prepare(inputs, out, cfg, progress=False)
    seconds = time.perf_counter() - t0
    with open(os.path.join(out, "run.json")) as f:
        run = json.load(f)
    c = manifest["counts"]
    init = run.get("ray_init_seconds", 0.0)
    pipeline = run["seconds"] - init  # read → tokenize → pack → write (not the tokenizer load, not the Ray start)
    return {"engine": engine, "workers": workers, "seconds": round(seconds, 3), "ray_init_seconds": init,
            "pipeline_seconds": round(pipeline, 3), "tokens": c["tokens_out"], "records": c["records"],
            "tokens_per_s": round(c["tokens_out"] / max(pipeline, 1e-9), 1),
            "stages": {k: v for k, v in run.items() if k.endswith("_seconds")},
            "output": manifest["fingerprint"] + "".join(s["sha256"] for s in manifest["shards"]),
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            **sampler.stop()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+")
    p.add_argument("--engine", choices=["local", "ray"], required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--out", required=True, help="shard folder (removed by the caller)")
    p.add_argument("--result", required=True, help="JSON file for the figures")
    a = p.parse_args(argv)
    result = run_one(a.inputs, a.out, a.engine, a.workers, a.seq_len)
    with open(a.result, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
