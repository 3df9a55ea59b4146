"""``convsink bench memory``: peak memory, step time and tokens/s of ONE full training step (forward, backward,
AdamW step) of a random-init model of a real architecture (``smollm2`` = SmolLM2-135M's config, ``tiny``, or any
model folder's ``config.json``) on one long real conversation (MSC utterances back to back, SmolLM2 tokenizer,
cycled to reach T), for each attention/memory configuration, at T doubling from 2,048 until a step no longer fits.

Every point runs in its own process. The cap is enforced from outside: a watcher thread polls the child's resident
set size (``/proc/PID/status`` VmRSS, every ``POLL_S``) and kills it once it passes the cap; the child also
reports its own peak (VmHWM) and a point whose peak passed the cap counts as not fitting too. (``RLIMIT_AS`` caps
virtual address space, which torch reserves far beyond what it touches, so it is not used.) A configuration stops
doubling at its first point that does not fit. The JSON is rewritten after every point; ``resume`` keeps the
points already there, so a stopped sweep continues where it ended.

Throughput (same runs): tokens/s of the sink configuration against causal SDPA, both checkpointed with the tiled
loss, at the lengths where both ran.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import threading
import time

import torch

from data_prep.paths import REPO_ROOT, shared_data_dir, write_text_atomic
from pipeline.bench.attention import _peak_rss_gb, _rss_gb
from pipeline.contract import (BLK, DENSE, DIALOGUE, DOC_IDS, EOU, INPUT_IDS, LABELS, MASK_KIND, POSITION_IDS, SINK,
                               TARGETS, UTT_IDS, targets_from_labels)

SINK_CKPT_TILED, SINK_ONLY, CAUSAL_CKPT_TILED, DENSE_MASK = "sink_ckpt_tiled", "sink", "causal_ckpt_tiled", "dense_mask"
SINK_CKPT_TILED_MLP = "sink_ckpt_tiled_mlp"
CONFIGS = {  # name: (attention, activation checkpointing, tiled loss, tiled MLP)
    SINK_CKPT_TILED: (SINK, True, True, False),
    SINK_ONLY: (SINK, False, False, False),  # the path before issue 12
    CAUSAL_CKPT_TILED: ("causal_sdpa", True, True, False),
    DENSE_MASK: (DENSE, False, False, False),  # SDPA with the T×T dialogue mask
    SINK_CKPT_TILED_MLP: (SINK, True, True, True),  # and each MLP in chunks of the loss chunk's tokens (asked for by name)
}
DEFAULT_CONFIGS = (SINK_CKPT_TILED, SINK_ONLY, CAUSAL_CKPT_TILED, DENSE_MASK)
THROUGHPUT_LENS = (8192, 16384, 32768)
MMAP_THRESHOLD = 128 * 1024  # bytes: glibc's initial mmap threshold, kept fixed (see ``release_freed_memory``)
POLL_S = 0.05
MSC_UTTERANCES = 4000


class CausalSDPA:
    """Plain causal SDPA (``is_causal=True``): the baseline that ignores the sink mask."""

    def __call__(self, query, key, value, scaling):
        import torch.nn.functional as F

        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                              enable_gqa=key.shape[1] != query.shape[1])


def model_folder(model: str) -> str:
    """The folder whose ``config.json`` gives the architecture: ``smollm2``, ``tiny`` or a model folder."""
    from pipeline.modeling.loader import resolve_model_path, tiny_model_dir

    return tiny_model_dir() if model == "tiny" else resolve_model_path(model)


def conversation_source(data_dir: str | None = None, n_utterances: int = MSC_UTTERANCES) -> dict:
    """The bench conversation's ingredients: token ids of real MSC utterances (all sessions of each episode, episodes
    back to back, SmolLM2 tokenizer) and the layout's special ids, as JSON-ready lists (``bench gpu`` caches them
    in a file, so a machine without the data or the tokenizer can build the same rows)."""
    from data_prep.tokenizer_loading import load_tokenizer, prepare_tokenizer
    from pipeline.bench.inference import long_conversation

    tok = load_tokenizer("smollm2")
    ids = prepare_tokenizer(tok)
    return {"utterances": long_conversation(tok, data_dir or shared_data_dir(), n_utterances),
            "special_ids": {name: value for name, value in vars(ids).items() if isinstance(value, int)}}  # bos, eou, pad


def row_from_source(source: dict, T: int) -> dict:
    """A batch of one row of exactly T tokens, ``[BOS] u1 EoU u2 EoU ...`` of ``source``'s utterances (cycled), with
    its metadata and next-token targets."""
    from data_prep.layout import layout_dialogue
    from data_prep.tokenizer_loading import SpecialIds

    utts = source["utterances"]
    tokens = sum(len(u) + 1 for u in utts)
    row = layout_dialogue("bench", utts * (T // tokens + 1), SpecialIds(**source["special_ids"]))
    cut = {c: torch.tensor([getattr(row, c)[:T]]) for c in (INPUT_IDS, LABELS, UTT_IDS, EOU, BLK)}
    return {**cut, DOC_IDS: torch.zeros(1, T, dtype=torch.long), POSITION_IDS: torch.arange(T)[None],
            TARGETS: targets_from_labels(cut[LABELS]), MASK_KIND: [DIALOGUE]}


def conversation_row(T: int, data_dir: str | None = None) -> dict:
    """A batch of one row of exactly T tokens: ``[BOS] u1 EoU u2 EoU ...`` of real MSC utterances (all sessions of
    each episode, episodes back to back, cycled), with its metadata and next-token targets."""
    return row_from_source(conversation_source(data_dir, min(MSC_UTTERANCES, T // 4 + 8)), T)


def step_loss(model, batch: dict, config: str, loss_chunk: int) -> torch.Tensor:
    """Mean next-token NLL of ``batch`` under ``config`` (its attention built here, once per batch, as in training)."""
    from pipeline.attention.masks import MaskParams
    from pipeline.attention.registry import prepare_attention

    impl, _, tiled, _ = CONFIGS[config]
    attn = CausalSDPA() if impl == "causal_sdpa" else prepare_attention(batch, impl, MaskParams())
    return loss_with(model, batch, attn, tiled, loss_chunk)


def loss_with(model, batch: dict, attn, tiled: bool, loss_chunk: int) -> torch.Tensor:
    """Mean next-token NLL of ``batch`` with the per-batch attention callable ``attn``; ``tiled``: the output layer
    and cross-entropy in chunks of ``loss_chunk`` tokens (``tiled_token_nll``), else on the whole (T, V) logits."""
    from pipeline.training.losses import token_nll
    from pipeline.training.tiled_loss import tiled_token_nll

    none = torch.zeros(0, dtype=torch.long, device=batch[INPUT_IDS].device)
    extra = {"logits_to_keep": none, "output_hidden_states": True} if tiled else {}
    out = model(input_ids=batch[INPUT_IDS], position_ids=batch[POSITION_IDS], convsink_attn=attn, use_cache=False, **extra)
    if tiled:
        nll, valid = tiled_token_nll(model.get_output_embeddings(), out.hidden_states[-1], batch[TARGETS], loss_chunk)
    else:
        nll, valid = token_nll(out.logits, batch[TARGETS])
    return nll.sum() / valid.sum()


def release_freed_memory(threshold: int = MMAP_THRESHOLD) -> str:
    """Have glibc's malloc serve blocks of ``threshold`` bytes or more by ``mmap`` and trim its heap past that much
    free memory (``mallopt`` M_MMAP_THRESHOLD, M_TRIM_THRESHOLD), so freed activations go back to the OS. By default
    glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after which the per-layer
    activations of a step (a few MiB each) come from the heap and stay in the process's RSS once freed: measured
    here (bench/memory_smollm2_default_malloc.json vs bench/memory_smollm2.json), one causal checkpointed step at
    T = 4,096 peaked at 4.00 GB by default and 2.64 GB with this (2,048: 2.84 / 2.64).
    Returns what was set (``"default"`` where libc is not glibc)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, threshold) == 1 and libc.mallopt(-1, threshold) == 1  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return "default"
    return f"glibc mallopt: mmap and trim thresholds {threshold} B" if ok else "default"


def measure_point(folder: str, config: str, T: int, loss_chunk: int, steps: int, threads: int | None,
                  data_dir: str | None, release_memory: bool = True) -> dict:
    """One point, in this process: build the model (random init, seed 0) and the row, run ``steps`` training steps;
    the step time is the last step's (the first also allocates the optimizer state)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.attention.registry import register
    from pipeline.modeling.forward import enable_activation_checkpointing
    from pipeline.modeling.tiled_mlp import enable_tiled_mlp, tiled_mlp_layers

    allocator = release_freed_memory() if release_memory else "default"
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    register()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), attn_implementation="convsink").train()
    if CONFIGS[config][1]:
        enable_activation_checkpointing(model)
    if CONFIGS[config][3]:
        enable_tiled_mlp(model, loss_chunk)
    batch = conversation_row(T, data_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    base = _rss_gb()
    times, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step_loss(model, batch, config, loss_chunk)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # all threads' CPU seconds: steadier than wall time on a shared CPU
    return {"config": config, "T": T, "peak_rss_gb": _peak_rss_gb(), "rss_before_step_gb": base,
            "step_seconds": times[-1], "step_cpu_seconds": cpu[-1], "all_step_seconds": times, "tokens_per_s": T / times[-1], "loss": float(loss),
            "torch_threads": torch.get_num_threads(), "allocator": allocator, "tiled_mlp_layers": tiled_mlp_layers(model)}


def _vm_rss_gb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def run_capped(args: dict, cap_gb: float) -> dict:
    """``measure_point(**args)`` in a child process, killed once its RSS passes ``cap_gb``; ``fits`` says whether
    the step finished under the cap (a killed, crashed or over-cap point is reported with its reason)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.bench.memory", "_point"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    seen = {"max_rss_gb": 0.0, "killed": False}

    def watch():
        while proc.poll() is None:
            rss = _vm_rss_gb(proc.pid)
            seen["max_rss_gb"] = max(seen["max_rss_gb"], rss)
            if rss > cap_gb:
                seen["killed"] = True
                proc.kill()
                return
            time.sleep(POLL_S)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = proc.communicate(json.dumps(args))
    watcher.join()
    point = {"config": args["config"], "T": args["T"], "cap_gb": cap_gb, "wall_seconds": time.perf_counter() - t0,
             "max_rss_seen_gb": seen["max_rss_gb"]}
    if seen["killed"]:
        return {**point, "fits": False, "reason": f"RSS passed the {cap_gb} GB cap (killed)"}
    if proc.returncode != 0:
        tail = err.strip().splitlines()
        return {**point, "fits": False, "reason": tail[-1] if tail else f"exit {proc.returncode}"}
    result = {**point, **json.loads(out.strip().splitlines()[-1])}
    over = result["peak_rss_gb"] > cap_gb
    return {**result, "fits": not over, **({"reason": f"peak {result['peak_rss_gb']:.2f} GB over the cap"} if over else {})}


def _file_sha(*paths: str) -> str:
    h = hashlib.sha1()
    for path in paths:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def doubling(start: int, stop: int) -> list[int]:
    """start, 2·start, ... up to ``stop``."""
    out = [start]
    while out[-1] * 2 <= stop:
        out.append(out[-1] * 2)
    return out


def bench_memory(model: str, out: str, seq_lens=None, configs=DEFAULT_CONFIGS, cap_gb: float = 20.0,
                 loss_chunk: int = 1024, steps: int = 1, threads: int | None = None, data_dir: str | None = None,
                 resume: bool = False, max_seq_len: int = 131072, release_memory: bool = True) -> dict:
    """Sweep every configuration over ``seq_lens`` (default: doubling 2,048 .. ``max_seq_len``) in order, stopping a
    configuration at its first point that does not fit; write ``out`` (JSON, after every point) and its PNG."""
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; expected some of {list(CONFIGS)}")
    folder = model_folder(model)
    seq_lens = list(seq_lens or doubling(2048, max_seq_len))
    old = json.load(open(out)) if resume and os.path.isfile(out) else {"points": []}
    if old["points"] and old["setting"].get("release_freed_memory", False) != release_memory:
        raise ValueError(f"{out}: its points were measured with release_freed_memory="
                         f"{old['setting'].get('release_freed_memory', False)}; resume with the same allocator setting")
    old = old["points"]
    kernel = [os.path.join(REPO_ROOT, "pipeline", "attention", f) for f in ("sink_kernel.py", "sink_plan.py", "lse_attention.py")]
    result = {"setting": {"model": model, "model_config": json.load(open(os.path.join(folder, "config.json"))),
                          "init": "random (seed 0)", "dtype": "float32", "optimizer": "torch AdamW",
                          "step": "forward + backward + optimizer step, one conversation row (batch 1)",
                          "text": "real MSC utterances back to back (all sessions of each episode), SmolLM2 tokenizer, cycled to T",
                          "configs": {c: dict(zip(("attention", "checkpointing", "tiled_loss", "tiled_mlp"), CONFIGS[c])) for c in configs},
                          "cap_gb": cap_gb, "cap_method": f"child VmRSS polled every {POLL_S}s, killed past the cap; VmHWM checked",
                          "release_freed_memory": release_memory, "loss_chunk": loss_chunk, "steps": steps, "cpu_count": os.cpu_count(), "torch": torch.__version__},
              "points": list(old)}
    done = {(p["config"], p["T"]) for p in old}
    for config in configs:
        for T in seq_lens:
            prior = [p for p in result["points"] if p["config"] == config and p["T"] <= T]
            if any(not p["fits"] for p in prior):
                break
            if (config, T) in done:
                continue
            sha = _file_sha(*kernel)  # the kernel the point's process imports (its three files)
            point = run_capped({"folder": folder, "config": config, "T": T, "loss_chunk": loss_chunk, "steps": steps,
                                "threads": threads, "data_dir": data_dir, "release_memory": release_memory}, cap_gb)
            point.update(load_average=os.getloadavg()[0], sink_kernel_sha=sha,
                         finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            result["points"].append(point)
            print(json.dumps({k: v for k, v in point.items() if k != "all_step_seconds"}), flush=True)
            _write(result, out)
            if not point["fits"]:
                break
    _write(result, out)
    return result


def _write(result: dict, out: str) -> None:
    result["summary"], result["throughput"] = summarize(result["points"])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=2))
    plot_memory(result, os.path.splitext(out)[0] + ".png")


def fitted_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x (1 = linear growth); None under two points."""
    if len(xs) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def summarize(points: list[dict]) -> tuple[dict, list[dict]]:
    """Per configuration: longest T that fit, first T that did not, fitted growth exponents of peak memory (the
    whole process, and the step's own part above the RSS before the step); and the sink / causal throughput table."""
    summary = {}
    for config in CONFIGS:
        pts = sorted((p for p in points if p["config"] == config), key=lambda p: p["T"])
        if not pts:
            continue
        fit = [p for p in pts if p["fits"]]
        summary[config] = {"longest_T_fit": max((p["T"] for p in fit), default=None),
                           "first_T_not_fit": min((p["T"] for p in pts if not p["fits"]), default=None),
                           "peak_exponent": fitted_exponent([p["T"] for p in fit], [p["peak_rss_gb"] for p in fit]),
                           "step_memory_exponent": fitted_exponent(
                               [p["T"] for p in fit if p["peak_rss_gb"] > p["rss_before_step_gb"]],
                               [p["peak_rss_gb"] - p["rss_before_step_gb"] for p in fit
                                if p["peak_rss_gb"] > p["rss_before_step_gb"]])}
    by = {(p["config"], p["T"]): p for p in points if p["fits"]}
    throughput = []
    for T in sorted({p["T"] for p in points}):
        if (SINK_CKPT_TILED, T) in by and (CAUSAL_CKPT_TILED, T) in by:
            s, c = by[(SINK_CKPT_TILED, T)], by[(CAUSAL_CKPT_TILED, T)]
            cpu = c["step_cpu_seconds"] / s["step_cpu_seconds"] if "step_cpu_seconds" in s and "step_cpu_seconds" in c else None
            throughput.append({"T": T, "sink_tokens_per_s": s["tokens_per_s"], "causal_tokens_per_s": c["tokens_per_s"],
                               "sink_over_causal": s["tokens_per_s"] / c["tokens_per_s"], "sink_over_causal_cpu_time": cpu})
    return summary, throughput


def format_tables(result: dict) -> str:
    """Markdown tables (points; sink vs causal throughput) for the README."""
    lines = ["| configuration | T | fits | peak RSS (GB) | step (s) | tokens/s |", "|---|---|---|---|---|---|"]
    for p in sorted(result["points"], key=lambda p: (list(CONFIGS).index(p["config"]), p["T"])):
        lines.append(f"| {p['config']} | {p['T']} | " + (f"yes | {p['peak_rss_gb']:.2f} | {p['step_seconds']:.1f} | "
                     f"{p['tokens_per_s']:.1f} |" if p["fits"] else f"no ({p['reason']}) | >{p['cap_gb']} | - | - |"))
    lines += ["", "| T | sink tokens/s | causal SDPA tokens/s | sink / causal (wall) | (CPU time) |", "|---|---|---|---|---|"]
    lines += [f"| {r['T']} | {r['sink_tokens_per_s']:.1f} | {r['causal_tokens_per_s']:.1f} | {r['sink_over_causal']:.2f}x | "
              + (f"{r['sink_over_causal_cpu_time']:.2f}x |" if r["sink_over_causal_cpu_time"] else "- |") for r in result["throughput"]]
    return "\n".join(lines)


def plot_memory(result: dict, path: str) -> None:
    """Peak memory and tokens/s against T, one curve per configuration, the cap as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for config in CONFIGS:
        fit = sorted((p for p in result["points"] if p["config"] == config and p["fits"]), key=lambda p: p["T"])
        if fit:
            axes[0].plot([p["T"] for p in fit], [p["peak_rss_gb"] for p in fit], marker="o", label=config)
            axes[1].plot([p["T"] for p in fit], [p["tokens_per_s"] for p in fit], marker="o", label=config)
    axes[0].axhline(result["setting"]["cap_gb"], color="k", linestyle="--", label="cap")
    axes[0].set(xlabel="T (tokens)", ylabel="peak RSS (GB)", title="one training step: peak memory", xscale="log", yscale="log")
    axes[1].set(xlabel="T (tokens)", ylabel="tokens/s", title="one training step: throughput", xscale="log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    lengths = sorted({p["T"] for p in result["points"]})
    for ax in axes:  # ticks at the measured lengths ("2,048"), not matplotlib's overlapping minor labels ("3x10^3")
        ax.set_xticks(lengths, [f"{t:,}" for t in lengths], rotation=30)
        ax.xaxis.set_minor_formatter(NullFormatter())
    axes[0].yaxis.set_major_formatter(ScalarFormatter())
    axes[0].yaxis.set_minor_formatter(ScalarFormatter())
    axes[0].legend()
    fig.suptitle(f"{result['setting']['model']} (random init), fp32, AdamW, cpu x{result['setting']['cpu_count']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__" and sys.argv[1:] == ["_point"]:
    print(json.dumps(measure_point(**json.loads(sys.stdin.read()))))
