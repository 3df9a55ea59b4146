"""``convsink bench attention``: sink attention vs dense-mask SDPA vs plain causal SDPA, forward + backward, on
conversations shaped like Multi-Session Chat (real utterance lengths).

Ratios are measured side by side in one run (the methods alternate at each length); absolute times on a shared CPU
are noisy. Every method × length runs in its own subprocess, so its peak memory (max RSS) is its own; the JSON also
gives the timed work's own peak (the peak RSS is reset just before it, Linux VmHWM) minus the RSS at that point
(inputs already allocated): the memory the method itself needs, which the process-wide peak of the imports hides
at small T.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import torch

from data_prep.paths import REPO_ROOT, shared_data_dir
from pipeline.contract import BLK, CAUSAL, DIALOGUE, DOC_IDS, EOU, MASK_KIND, POSITION_IDS, UTT_IDS

DEFAULT_SEQ_LENS = (2048, 4096, 8192, 16384)
MIN_SECONDS = 3.0  # timed seconds per method and round: the sink's runs span as much of the machine's time as causal's
MAX_RUNS = 1000  # a cap on the runs that min_seconds asks for
METHODS = ("sink", "dense_mask", CAUSAL)


def msc_episode_lengths(data_dir: str | None = None, limit: int = 4000, tokenizer: str = "smollm2") -> list[list[int]]:
    """Token lengths of real MSC utterances, one list per episode (``msc/*.jsonl``; per episode the previous
    sessions' then the current session's ``dialog[].text``, in file and turn order), at most ``limit`` utterances,
    tokenized without special tokens by ``data_prep.tokenizer_loading.load_tokenizer(tokenizer)``."""
    from data_prep.tokenizer_loading import encode_utterances, load_tokenizer

    folder = os.path.join(data_dir or shared_data_dir(), "msc")
    episodes: list[list[str]] = []
    total = 0
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".jsonl"):
            continue
        with open(os.path.join(folder, name)) as f:
            for line in f:
                if line.strip() and total < limit:  # one MSC episode: all sessions, oldest first (as data_prep reads it)
                    rec = json.loads(line)
                    texts = [t["text"] for session in [p.get("dialog", []) for p in rec.get("previous_dialogs") or []]
                             + [rec.get("dialog", [])] for t in session][:limit - total]
                    if texts:
                        episodes.append(texts)
                        total += len(texts)
    if not episodes:
        raise FileNotFoundError(f"{folder}: no MSC utterances found")
    tok = load_tokenizer(tokenizer)
    return [[max(1, len(ids)) for ids in encode_utterances(tok, texts)] for texts in episodes]


def msc_utterance_lengths(data_dir: str | None = None, limit: int = 4000, tokenizer: str = "smollm2") -> list[int]:
    """``msc_episode_lengths`` flattened: the utterance lengths in file and turn order."""
    return [n for ep in msc_episode_lengths(data_dir, limit, tokenizer) for n in ep]


def packed_batch(episodes: list[list[int]], T: int, kind: str = DIALOGUE) -> dict:
    """MSC episodes packed back to back into exactly T tokens, each ``[BOS] u1 EoU u2 EoU ...`` with its own
    ``doc_ids`` (the layout training sees after packing); episodes are taken in order (cycled), the last one cut
    at T. A query then sees at most its own episode's sinks, so the work per token is bounded."""
    doc, utt, eou = [], [], []
    e = 0
    while len(doc) < T:
        lengths = episodes[e % len(episodes)]
        doc += [e]
        utt += [0]
        eou += [False]
        for i, n in enumerate(lengths, start=1):
            doc += [e] * (n + 1)
            utt += [i] * (n + 1)
            eou += [False] * n + [True]
        e += 1
    ids = torch.tensor([utt[:T]])
    return {DOC_IDS: torch.tensor([doc[:T]]), UTT_IDS: ids, BLK: ids.clone(), EOU: torch.tensor([eou[:T]]),
            POSITION_IDS: _positions(doc[:T])[None], MASK_KIND: [kind]}


def _positions(doc: list[int]) -> torch.Tensor:
    """Positions restarting at 0 at every document."""
    d = torch.tensor(doc)
    start = torch.zeros_like(d)
    change = torch.nonzero(d[1:] != d[:-1]).flatten() + 1
    start[change] = change
    return torch.arange(len(doc)) - torch.cummax(start, 0).values


def conversation_batch(lengths: list[int], T: int, kind: str = DIALOGUE) -> dict:
    """One conversation of exactly T tokens, ``[BOS] u1 EoU u2 EoU ...``, utterance lengths taken in order from
    ``lengths`` (cycled); the metadata of a batch of one row."""
    utt, eou = [0], [False]
    i = 0
    while len(utt) < T:
        n = lengths[i % len(lengths)]
        i += 1
        utt += [i] * (n + 1)
        eou += [False] * n + [True]
    ids = torch.tensor([utt[:T]])
    return {DOC_IDS: torch.zeros(1, T, dtype=torch.long), UTT_IDS: ids, BLK: ids.clone(),
            EOU: torch.tensor([eou[:T]]), POSITION_IDS: torch.arange(T)[None], MASK_KIND: [kind]}


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: VmHWM, via /proc/self/clear_refs), so the peak that follows is the
    timed work's own, not the import-time high-water mark. False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_gb() -> float:
    """VmHWM (peak RSS since the last reset) in GiB; ru_maxrss where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # KiB → GiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(method: str, T: int, heads: int, head_dim: int, episodes: list[list[int]], repeats: int,
            chunk: int | None = None, threads: int | None = None, layout: str = "conversation",
            kv_heads: int | None = None, min_seconds: float = 0.0) -> dict:
    """Forward + backward seconds (the minimum over the runs) of one method on one conversation of T tokens: at
    least ``repeats`` runs, and more until the runs add up to ``min_seconds`` (at most ``MAX_RUNS``), so that a fast
    method samples this shared machine for as long as a slow one instead of a fraction of a second (as timeit's
    autorange and Google Benchmark's min_time do). The sink method's time includes building its per-batch plan
    (done once per batch, shared by all layers)."""
    import torch.nn.functional as F

    if threads:
        torch.set_num_threads(threads)

    from pipeline.attention.masks import MaskParams, dense_mask
    from pipeline.attention.registry import DenseMaskAttention
    from pipeline.attention.sink_kernel import CHUNK, SinkAttention

    torch.manual_seed(0)
    if layout == "packed":
        batch = packed_batch(episodes, T)
    else:
        batch = conversation_batch([n for ep in episodes for n in ep], T)
    kv_heads = kv_heads or heads
    # (B, H, T, D) views of (B, T, H, D) memory, as a Llama layer passes them (heads split off the projection, then
    # transposed) and as autograd hands back the output's gradient
    q = torch.randn(1, T, heads, head_dim).transpose(1, 2).requires_grad_()  # (B, H, T, D)
    k, v = (torch.randn(1, T, kv_heads, head_dim).transpose(1, 2).requires_grad_() for _ in range(2))  # (B, Hkv, T, D)
    grad = torch.randn(1, T, heads, head_dim).transpose(1, 2)  # (B, H, T, D)
    scale = head_dim ** -0.5
    params = MaskParams()  # the dialogue mask reads none; the same object for both masked methods
    base_rss = _rss_gb()
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # imports included
    reset = _reset_peak_rss()
    times, plan_times, extra = [], [], {}
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < MAX_RUNS):
        t0 = time.perf_counter()
        if method == "sink":
            attn = SinkAttention(batch, params, chunk=chunk or CHUNK)
            plan_times.append(time.perf_counter() - t0)
            out = attn(q, k, v, scale)
        elif method == "dense_mask":
            out = DenseMaskAttention(dense_mask(DIALOGUE, batch, params))(q, k, v, scale)  # the T×T mask built in the timing
        elif method == CAUSAL:
            kr, vr = (k, v) if kv_heads == heads else (x.repeat_interleave(heads // kv_heads, 1) for x in (k, v))  # GQA: faster here than enable_gqa
            out = F.scaled_dot_product_attention(q, kr, vr, is_causal=True, scale=scale)
        else:
            raise ValueError(f"unknown method {method!r}")
        out.backward(grad)
        times.append(time.perf_counter() - t0)
        if method == "sink" and not extra:  # bench bookkeeping (sums every bucket's mask), outside the timing: the same
            # plan every run, so once (with --min-seconds the sink runs ~80 times)
            extra["key_fraction_computed"] = attn.keys_computed / attn.keys_dense
            extra["mask_fraction"] = attn.pairs_allowed / (T * T)  # allowed pairs
        q.grad = k.grad = v.grad = None
        del out
    if plan_times:
        extra["plan_seconds"] = min(plan_times)
    work_peak = _peak_rss_gb() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peak = max(process_peak, work_peak)
    return {"method": method, "T": T, "layout": layout, "seconds": min(times), "all_seconds": times, "peak_rss_gb": peak,
            "peak_rss_delta_gb": work_peak - base_rss, "peak_reset": reset, **extra}


def _run_isolated(args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pipeline.bench.attention", "_measure"], input=json.dumps(args),
                          capture_output=True, text=True, cwd=REPO_ROOT)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()
        return {"method": args["method"], "T": args["T"], "error": tail[-1] if tail else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def merge_rounds(parts: list[dict]) -> dict:
    """One row from the rounds of one method × length (each its own process): the minimum over every run, the runs
    in order (``all_seconds``), those after each round's first, cold, run (``warm_seconds``), the largest peaks."""
    errors = [p for p in parts if "error" in p]
    if errors:
        return errors[0]
    row = dict(parts[0])
    row["all_seconds"] = [t for p in parts for t in p["all_seconds"]]
    row["warm_seconds"] = [t for p in parts for t in p["all_seconds"][1:]]
    row["seconds"] = min(row["all_seconds"])
    row["rounds"] = len(parts)
    for key in ("peak_rss_gb", "peak_rss_delta_gb"):
        row[key] = max(p[key] for p in parts)
    row["peak_reset"] = all(p["peak_reset"] for p in parts)
    if "plan_seconds" in row:
        row["plan_seconds"] = min(p["plan_seconds"] for p in parts)
    return row


def bench_attention(out: str, seq_lens=DEFAULT_SEQ_LENS, heads: int = 2, head_dim: int = 32, repeats: int = 3,
                    data_dir: str | None = None, chunk: int | None = None, threads: int | None = None,
                    methods=METHODS, layout: str = "conversation", kv_heads: int | None = None, rounds: int = 1,
                    min_seconds: float | None = None) -> dict:
    """Sink attention vs dense-mask SDPA vs plain causal SDPA (``is_causal=True``), forward + backward, fp32, at each
    length of ``seq_lens``; writes and returns the JSON. ``layout``: ``conversation`` = one MSC-shaped conversation
    of T tokens (its EoU sinks grow with T: the sink part of the work is about T²/(2·L) pairs for utterances of L
    tokens); ``packed`` = real MSC episodes packed into T, as training sees them (work per token bounded).
    ``rounds``: at each length the methods run in turn ``rounds`` times (``repeats`` runs each time, a fresh process
    each), so every method's runs are spread over the same minutes instead of one method's few seconds: a slow spell
    of this shared machine then falls on all methods alike. ``min_seconds``: each time, a method runs until its runs
    add up to this many seconds (``measure``; None: ``MIN_SECONDS``), so the fast sink samples the machine as long
    as slow causal SDPA does."""
    if layout not in ("conversation", "packed"):
        raise ValueError(f"layout must be 'conversation' or 'packed', not {layout!r}")
    min_seconds = MIN_SECONDS if min_seconds is None else min_seconds
    if rounds < 1 or repeats < 1 or min_seconds < 0:
        raise ValueError(f"rounds and repeats must be at least 1 and min_seconds at least 0, not {rounds}, {repeats} and {min_seconds}")
    from pipeline.attention.sink_kernel import CHUNK

    episodes = msc_episode_lengths(data_dir)
    lengths = [n for ep in episodes for n in ep]
    load_at_start = os.getloadavg()[0]
    rows = []
    for T in seq_lens:
        parts = {method: [] for method in methods}
        for _ in range(rounds):
            for method in methods:
                parts[method].append(_run_isolated({"method": method, "T": T, "heads": heads, "head_dim": head_dim,
                                                    "episodes": episodes, "repeats": repeats, "chunk": chunk,
                                                    "threads": threads, "layout": layout, "kv_heads": kv_heads,
                                                    "min_seconds": min_seconds}))
        for method in methods:
            rows.append(merge_rounds(parts[method]))
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("all_seconds", "warm_seconds")}), flush=True)
    summary, scaling = summarize(rows, seq_lens)
    mean_len = sum(lengths) / len(lengths)
    result = {"setting": {"heads": heads, "kv_heads": kv_heads or heads, "head_dim": head_dim, "batch": 1, "dtype": "float32", "repeats": repeats, "rounds": rounds, "min_seconds": min_seconds,
                          "inputs": "(B, H, T, D) views of (B, T, H, D) memory, as a Llama layer passes them",
                          "timing": "forward + backward, min over every run (medians: over the runs after each round's first); at least "
                                    "`repeats` runs per round, more until they add up to `min_seconds`; "
                                    "sink includes building its plan; the methods take turns, one round after another",
                          "mask": DIALOGUE, "chunk": chunk or CHUNK, "layout": layout,
                          "episodes_sampled": len(episodes),
                          "mean_episode_tokens": sum(sum(ep) + len(ep) + 1 for ep in episodes) / len(episodes),
                          "utterance_lengths": "real MSC utterances (msc/*.jsonl, all sessions of each episode oldest first, SmolLM2 tokenizer, "
                                               "no special tokens), utterances in file order",
                          "utterances_sampled": len(lengths), "mean_utterance_tokens": mean_len,
                          "torch_threads": threads or torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": "cpu",
                          "load_average_at_start": load_at_start,
                          "torch": torch.__version__},
              "rows": rows, "summary": summary, "scaling": scaling}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    return result


def summarize(rows: list[dict], seq_lens) -> tuple[list[dict], dict]:
    """Per length: times, speedups, computed fraction, time per computed (query, key) pair, peak memory; and the
    growth exponent of each method's time between consecutive lengths (1 = linear, 2 = quadratic)."""
    import math

    import statistics

    def warm_median(r: dict) -> float:  # the median of the runs after each round's first (a cold start for every method)
        if r.get("warm_seconds"):
            return statistics.median(r["warm_seconds"])
        runs = r.get("all_seconds") or [r["seconds"]]
        return statistics.median(runs[1:] or runs)

    by = {(r["method"], r["T"]): r for r in rows}
    summary = []
    for T in seq_lens:
        s, d, c = (by.get((m, T), {}) for m in METHODS)
        if not all("seconds" in r for r in (s, d, c)):
            continue
        frac = s.get("key_fraction_computed")
        summary.append({"T": T, "sink_s": s["seconds"], "dense_mask_s": d["seconds"], "causal_s": c["seconds"],
                        "sink_plan_s": s.get("plan_seconds"),
                        "speedup_vs_dense_mask": d["seconds"] / s["seconds"], "speedup_vs_causal": c["seconds"] / s["seconds"],
                        "sink_median_s": warm_median(s), "causal_median_s": warm_median(c),
                        "speedup_vs_causal_median": warm_median(c) / warm_median(s),
                        "sink_us_per_token": 1e6 * s["seconds"] / T, "key_fraction_computed": frac,
                        "mask_fraction": s.get("mask_fraction"),
                        "sink_ns_per_computed_pair": 1e9 * s["seconds"] / (frac * T * T) if frac else None,
                        "sink_peak_rss_gb": s["peak_rss_gb"], "dense_mask_peak_rss_gb": d["peak_rss_gb"],
                        "causal_peak_rss_gb": c["peak_rss_gb"], "sink_peak_rss_delta_gb": s["peak_rss_delta_gb"],
                        "dense_mask_peak_rss_delta_gb": d["peak_rss_delta_gb"], "causal_peak_rss_delta_gb": c["peak_rss_delta_gb"]})
    scaling = {}
    for a, b in zip(summary, summary[1:]):
        r = math.log(b["T"] / a["T"])
        scaling[f"{a['T']}->{b['T']}"] = {m: math.log(b[f"{m}_s"] / a[f"{m}_s"]) / r for m in METHODS}
    return summary, scaling


def summary_line(r: dict) -> str:
    """One summary row as the command prints it."""
    return (f"T={r['T']:>6}: sink {r['sink_s']:.3f}s  dense-mask {r['dense_mask_s']:.3f}s  causal {r['causal_s']:.3f}s  -> "
            f"{r['speedup_vs_dense_mask']:.1f}x vs dense-mask, {r['speedup_vs_causal']:.1f}x vs causal "
            f"({r['speedup_vs_causal_median']:.1f}x by medians), keys computed {r['key_fraction_computed']:.2%}")


if __name__ == "__main__" and sys.argv[1:] == ["_measure"]:
    print(json.dumps(measure(**json.loads(sys.stdin.read()))))
