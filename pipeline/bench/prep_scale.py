"""``convsink bench prep --scale N``: prep at corpus scale. N copies of the shipped dialogues (fresh ids,
``data_prep.scaled_corpus``; the default, 17, is 211 MB of JSON lines), then in one run, interleaved with the
effective-cores probe: the single-process reference (``engine: local``) and Ray with ``workers`` workers, each
prep in its own process (``prep_child``: its driver's peak RSS and its Ray workers' apart).

Ray also runs with 1 worker: ``scaling_efficiency`` = (Ray W workers / Ray 1 worker tokens/s) / effective cores (the
mean of the probes taken around the runs) compares the same code path; ``efficiency`` = (Ray / local tokens/s) /
effective cores compares with the reference loop (which at this scale is slower per core than a Ray worker: it holds
every item in one process). The target, >= 0.85, must hold for both (``meets_target``). Tokens/s count the pipeline only: the one-off Ray start is recorded apart. The Ray driver's
peak RSS is also measured at about N/4 and N/2 copies, and reported per 100 MB of corpus.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from data_prep.paths import shared_data_dir
from data_prep.scaled_corpus import DEFAULT_COPIES, write_scaled_corpus
from pipeline.bench.prep import effective_cores, write_result

TARGET_EFFICIENCY = 0.85
PROGRESS_BYTES = 50_000_000
CORPUS_RECORD = "corpus.json"  # in --corpus-dir: what was generated there (reused when copies and sha match)


def _say(msg: str) -> None:
    print(f"bench prep: {msg}", file=sys.stderr, flush=True)


def corpus_at(data_dir: str, folder: str, copies: int) -> dict:
    """The scaled corpus of ``copies`` copies in ``folder``: reused when its record says so and the files are there
    with the recorded sizes, else (re)generated (a progress line per copy)."""
    record = os.path.join(folder, CORPUS_RECORD)
    if os.path.isfile(record):
        with open(record) as f:
            known = json.load(f)
        if known.get("copies") == copies and all(os.path.isfile(p) for p in known["files"]) and \
                sum(os.path.getsize(p) for p in known["files"]) == known["bytes"]:
            _say(f"reusing the corpus in {folder} ({known['bytes'] / 1e6:,.0f} MB)")
            return known
    t0, said = time.perf_counter(), [0]

    def progress(done: int) -> None:  # a line per 50 MB written
        if done // PROGRESS_BYTES > said[0]:
            said[0] = done // PROGRESS_BYTES
            _say(f"corpus {folder}: {done / 1e6:,.0f} MB written")

    info = write_scaled_corpus(data_dir, folder, copies, progress=progress)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    with open(record, "w") as f:
        json.dump(info, f, indent=2)
    return info


def run_child(files: list[str], engine: str, workers: int, seq_len: int, tmp: str) -> dict:
    """One prep in its own process (``pipeline.bench.prep_child``); its figures."""
    out, result = os.path.join(tmp, f"shards-{engine}"), os.path.join(tmp, f"result-{engine}.json")
    cmd = [sys.executable, "-m", "pipeline.bench.prep_child", *files, "--engine", engine, "--workers", str(workers),
           "--seq-len", str(seq_len), "--out", out, "--result", result]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"prep ({engine}) failed with exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    with open(result) as f:
        r = json.load(f)
    shutil.rmtree(out, ignore_errors=True)
    return r


def memory_slope(points: list[dict]) -> dict:
    """Driver peak RSS per 100 MB of corpus between the smallest and the largest corpus, and their ratio."""
    a, b = min(points, key=lambda p: p["corpus_mb"]), max(points, key=lambda p: p["corpus_mb"])
    span = b["corpus_mb"] - a["corpus_mb"]
    return {"driver_rss_mb_per_100mb_corpus": round(100 * (b["driver_peak_rss_mb"] - a["driver_peak_rss_mb"]) / span, 2)
            if span > 0 else None,
            "driver_rss_ratio_largest_to_smallest": round(b["driver_peak_rss_mb"] / a["driver_peak_rss_mb"], 3),
            "corpus_ratio_largest_to_smallest": round(b["corpus_mb"] / a["corpus_mb"], 3)}


def bench_prep_scale(out: str, scale: int = DEFAULT_COPIES, data_dir: str | None = None, corpus_dir: str | None = None,
                     workers: int = 2, seq_len: int = 2048, command: str = "") -> dict:
    """Run the bench at ``scale`` copies; write and return its JSON (see the module docstring)."""
    data_dir = data_dir or shared_data_dir()
    tmp = tempfile.mkdtemp(prefix="bench-prep-scale-")
    result = {"command": command, "scale": scale, "workers": workers, "seq_len": seq_len, "cpus": os.cpu_count(),
              "target_efficiency": TARGET_EFFICIENCY, "load_average_before": list(os.getloadavg())}
    try:
        corpus = corpus_at(data_dir, corpus_dir or os.path.join(tmp, "corpus"), scale)
        result["corpus"] = {k: corpus[k] for k in ("bytes", "records", "copies", "sha256", "files")} | {
            "mb": round(corpus["bytes"] / 2**20, 1)}
        probes, engines = [effective_cores()], {}
        for name, engine, n in (("local", "local", 1), ("ray_1_worker", "ray", 1), (f"ray_{workers}_workers", "ray", workers)):
            _say(f"{engine} prep of {corpus['bytes'] / 1e6:,.0f} MB ({n} worker{'s' * (n > 1)}) ...")
            engines[name] = run_child(corpus["files"], engine, n, seq_len, tmp)
            probes.append(effective_cores())
        local, ray1, ray = engines["local"], engines["ray_1_worker"], engines[f"ray_{workers}_workers"]
        cores = sum(probes) / len(probes)
        speedup, scaling = ray["tokens_per_s"] / local["tokens_per_s"], ray["tokens_per_s"] / ray1["tokens_per_s"]
        result.update(engines=engines, effective_cores_probes=probes, effective_cores=round(cores, 3),
                      ray_speedup_vs_single_process=round(speedup, 3), efficiency=round(speedup / cores, 3),
                      ray_speedup_vs_ray_1_worker=round(scaling, 3), scaling_efficiency=round(scaling / cores, 3),
                      identical_output_across_engines=local["output"] == ray["output"] == ray1["output"])
        result["meets_target"] = min(result["efficiency"], result["scaling_efficiency"]) >= TARGET_EFFICIENCY
        points = [{"copies": scale, "corpus_mb": result["corpus"]["mb"], "driver_peak_rss_mb": ray["driver_peak_rss_mb"],
                   "workers_peak_rss_sum_mb": ray["workers_peak_rss_sum_mb"]}]
        for copies in sorted({max(1, scale // 4), max(1, scale // 2)} - {scale}):
            small = corpus_at(data_dir, os.path.join(tmp, f"corpus-{copies}"), copies)
            _say(f"driver memory point: ray prep of {small['bytes'] / 1e6:,.0f} MB ...")
            r = run_child(small["files"], "ray", workers, seq_len, tmp)
            points.append({"copies": copies, "corpus_mb": round(small["bytes"] / 2**20, 1),
                           "driver_peak_rss_mb": r["driver_peak_rss_mb"], "workers_peak_rss_sum_mb": r["workers_peak_rss_sum_mb"]})
            shutil.rmtree(os.path.join(tmp, f"corpus-{copies}"), ignore_errors=True)
        points.sort(key=lambda p: p["copies"])
        result["driver_memory"] = {"points": points, **(memory_slope(points) if len(points) > 1 else {})}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return write_result(out, result)
