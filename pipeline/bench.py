"""Benchmarks (not timed tests): ``convsink bench attention``.

Ratios are measured side by side in one run; absolute times on this machine are noisy. Each method × length runs
in its own subprocess so its peak memory (max RSS) is its own.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import torch

DEFAULT_SEQ_LENS = (2048, 4096, 8192, 16384)


def default_data_dir() -> str:
    """``$CONVSINK_SHARED_DATA``, else ``../shared/data`` beside the repository."""
    return os.environ.get("CONVSINK_SHARED_DATA") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


def msc_utterance_lengths(data_dir: str, limit: int = 4000) -> list[int]:
    """Real utterance token lengths (SmolLM2 tokenizer) from the MSC files, in conversation order."""
    from data_prep.adapters import iter_dialogues
    from data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer("smollm2")
    lengths: list[int] = []
    for name in sorted(os.listdir(os.path.join(data_dir, "msc"))):
        for d in iter_dialogues(os.path.join(data_dir, "msc", name), "msc"):
            if isinstance(d, Exception):
                continue
            lengths += [len(x) for x in tok([t.text for t in d.turns], add_special_tokens=False)["input_ids"]]
            if len(lengths) >= limit:
                return lengths
    return lengths


def conversation_row(lengths: list[int], T: int) -> dict:
    """One conversation of T tokens built from real utterance lengths: [BOS] u1 EoU u2 EoU ..."""
    utt, eou = [0], [False]
    i = 0
    while len(utt) < T:
        n = lengths[i % len(lengths)]
        i += 1
        u = len([x for x in utt if x >= 0]) and utt[-1] + 1
        utt += [u] * (n + 1)
        eou += [False] * n + [True]
    utt, eou = utt[:T], eou[:T]
    t = torch.tensor([utt])
    return {"doc_ids": torch.zeros(1, T, dtype=torch.long), "utt_ids": t, "blk": t.clone(), "eou": torch.tensor([eou]),
            "position_ids": torch.arange(T)[None], "mask_kind": ["dialogue"]}


def _measure(method: str, T: int, heads: int, head_dim: int, lengths: list[int], repeats: int) -> dict:
    """Forward+backward time of one attention method (runs inside its own subprocess)."""
    import torch.nn.functional as F

    from .attention import DenseMaskAttention
    from .masks import dense_mask
    from .sink_attention import SinkAttention

    torch.manual_seed(0)
    row = conversation_row(lengths, T)
    q = torch.randn(1, heads, T, head_dim, requires_grad=True)
    k = torch.randn(1, heads, T, head_dim, requires_grad=True)
    v = torch.randn(1, heads, T, head_dim, requires_grad=True)
    times, extra = [], {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        if method == "sink":
            attn = SinkAttention(row)
            extra["key_fraction_computed"] = attn.keys_computed / attn.keys_dense
            out = attn(q, k, v, head_dim ** -0.5)
        elif method == "dense_mask":
            out = DenseMaskAttention(dense_mask("dialogue", row))(q, k, v, head_dim ** -0.5)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.sum().backward()
        times.append(time.perf_counter() - t0)
        q.grad = k.grad = v.grad = None
    return {"method": method, "T": T, "seconds": min(times), "all_seconds": times,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, **extra}


def bench_attention(out: str, seq_lens=DEFAULT_SEQ_LENS, heads: int = 2, head_dim: int = 32, repeats: int = 2,
                    data_dir: str | None = None) -> dict:
    """Sink attention vs dense-mask SDPA vs plain causal SDPA, forward+backward, on MSC-shaped conversations."""
    data_dir = data_dir or default_data_dir()
    lengths = msc_utterance_lengths(data_dir)
    rows = []
    for T in seq_lens:
        for method in ("sink", "dense_mask", "causal"):
            payload = json.dumps({"method": method, "T": T, "heads": heads, "head_dim": head_dim, "lengths": lengths, "repeats": repeats})
            proc = subprocess.run([sys.executable, "-m", "pipeline.bench", "_measure"], input=payload, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"method": method, "T": T, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1] | {"all_seconds": None}), flush=True)
    by = {(r["method"], r["T"]): r for r in rows}
    summary = []
    for T in seq_lens:
        s, d, c = by[("sink", T)], by[("dense_mask", T)], by[("causal", T)]
        if all("seconds" in r for r in (s, d, c)):
            summary.append({"T": T, "sink_s": s["seconds"], "dense_mask_s": d["seconds"], "causal_s": c["seconds"],
                            "speedup_vs_dense_mask": d["seconds"] / s["seconds"], "speedup_vs_causal": c["seconds"] / s["seconds"],
                            "sink_peak_rss_gb": s["peak_rss_gb"], "dense_mask_peak_rss_gb": d["peak_rss_gb"],
                            "key_fraction_computed": s.get("key_fraction_computed")})
    result = {"setting": {"heads": heads, "head_dim": head_dim, "batch": 1, "dtype": "float32", "repeats": repeats,
                          "utterance_lengths": "real MSC utterances (SmolLM2 tokens), one conversation per row",
                          "mean_utterance_tokens": sum(lengths) / len(lengths), "torch_threads": torch.get_num_threads(),
                          "device": "cpu"}, "rows": rows, "summary": summary}
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    return result


def bench_prep(out: str, data_dir: str | None = None, workers: int | None = None) -> dict:
    """Tokens/s of the Ray pipeline and of the single-process loop over the same files (side by side, one run),
    and packing efficiency at seq_len 2048 and 8192 on the MSC data."""
    import glob
    import tempfile

    from data_prep.config import DataConfig
    from data_prep.prep import prepare

    data_dir = data_dir or default_data_dir()
    msc = sorted(glob.glob(os.path.join(data_dir, "msc", "*.jsonl")))
    inputs = [os.path.join(data_dir, "personachat", "valid.json")] + msc
    result = {"inputs": inputs, "engines": {}, "packing": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ("local", "ray"):
            t0 = time.perf_counter()
            m = prepare(inputs, os.path.join(tmp, engine), DataConfig(seq_len=2048, engine=engine, workers=workers), progress=False)
            dt = time.perf_counter() - t0
            result["engines"][engine] = {"seconds": dt, "tokens": m["counts"]["tokens_in"], "tokens_per_s": m["counts"]["tokens_in"] / dt,
                                         "tokenize_seconds": m["timing"]["tokenize_seconds"]}
        for seq_len in (2048, 8192):
            m = prepare(msc, os.path.join(tmp, f"pack{seq_len}"), DataConfig(seq_len=seq_len, engine="local"), progress=False)
            result["packing"][str(seq_len)] = {"packing_efficiency": m["counts"]["packing_efficiency"],
                                               "sequences": m["counts"]["sequences"], "split_dialogues": m["counts"]["split_dialogues"]}
    e = result["engines"]
    result["ray_speedup_vs_single_process"] = e["ray"]["tokens_per_s"] / e["local"]["tokens_per_s"]
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    return result


def long_conversation(tokenizer, data_dir: str, n_utterances: int) -> list[list[int]]:
    """Utterances of MSC episodes back to back, as one conversation of ``n_utterances`` utterances."""
    from data_prep.adapters import iter_dialogues

    texts = []
    for name in sorted(os.listdir(os.path.join(data_dir, "msc"))):
        for d in iter_dialogues(os.path.join(data_dir, "msc", name), "msc"):
            texts += [t.text for t in d.turns]
            if len(texts) >= n_utterances:
                return tokenizer(texts[:n_utterances], add_special_tokens=False)["input_ids"]
    raise ValueError(f"only {len(texts)} utterances available")


def bench_inference(model_dir: str, out: str, utterances=(100, 200, 500, 1000, 2000), policies=None,
                    decode_tokens: int = 8, window: int = 256, sink_tokens: int = 4, data_dir: str | None = None,
                    time_budget_s: float = 900.0) -> dict:
    """K/V bytes held and per-token decode latency of each cache policy on the same model and conversation.

    The conversation is teacher-forced utterance by utterance; at each checkpoint a reply of ``decode_tokens``
    tokens is decoded (greedy, then closed with EoU) and timed per token, including the re-encoding a policy does
    when the reply starts (recompute re-encodes its window). A policy that exceeds ``time_budget_s`` stops and the
    skipped points are listed in the JSON."""
    from .cache import Conversation
    from .chat import load_chat_model

    data_dir = data_dir or default_data_dir()
    policies = policies or ["dense", "recompute", "streamingllm", "streamingdialogue"]
    model, tok, info = load_chat_model(model_dir)
    convo = long_conversation(tok, data_dir, max(utterances))
    rows, skipped = [], []
    for policy in policies:
        conv = Conversation(model, info["bos_token_id"], info["eou_token_id"], policy, sink_tokens=sink_tokens, window=window)
        t_start, done = time.perf_counter(), 0
        for target in sorted(utterances):
            if time.perf_counter() - t_start > time_budget_s:
                skipped.append({"policy": policy, "utterances": target, "reason": f"time budget {time_budget_s}s"})
                continue
            last = None
            todo = convo[done:target]
            if policy == "recompute":  # its state is rebuilt from the history at every utterance: skip the rest
                for u in todo[:-1]:
                    conv.record_utterance(u)
                todo = todo[-1:]
            for u in todo:
                last = conv.add_utterance(u)[-1]
            done = target
            kv_bytes, positions = conv.store.nbytes(), len(conv.store)
            t0 = time.perf_counter()
            reply = conv.generate(last, decode_tokens)
            per_token = (time.perf_counter() - t0) / (len(reply) + 1)
            rows.append({"policy": policy, "utterances": target, "kv_bytes": kv_bytes, "cached_positions": positions,
                         "ms_per_token": 1000 * per_token, "conversation_tokens": conv.next_position})
            print(json.dumps(rows[-1]), flush=True)
    by = {(r["policy"], r["utterances"]): r for r in rows}
    ratios = {}
    for n in utterances:
        sd = by.get(("streamingdialogue", n))
        if sd is None:
            continue
        if ("dense", n) in by:
            ratios.setdefault(str(n), {})["memory_dense_over_streamingdialogue"] = by[("dense", n)]["kv_bytes"] / sd["kv_bytes"]
        if ("recompute", n) in by:
            ratios.setdefault(str(n), {})["latency_recompute_over_streamingdialogue"] = by[("recompute", n)]["ms_per_token"] / sd["ms_per_token"]
            ratios[str(n)]["memory_recompute_over_streamingdialogue"] = by[("recompute", n)]["kv_bytes"] / sd["kv_bytes"]
    result = {"model": os.path.abspath(model_dir), "setting": {"decode_tokens": decode_tokens, "window": window,
              "sink_tokens": sink_tokens, "threads": torch.get_num_threads(), "device": "cpu"},
              "rows": rows, "ratios": ratios, "skipped": skipped}
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    _plot_inference(result, os.path.splitext(out)[0] + ".png")
    return result


def _plot_inference(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for policy in sorted({r["policy"] for r in result["rows"]}):
        pts = [r for r in result["rows"] if r["policy"] == policy]
        a.plot([r["utterances"] for r in pts], [r["kv_bytes"] / 2**20 for r in pts], marker="o", label=policy)
        b.plot([r["utterances"] for r in pts], [r["ms_per_token"] for r in pts], marker="o", label=policy)
    a.set(xlabel="utterances", ylabel="K/V cache (MiB)", title="memory held", yscale="log")
    b.set(xlabel="utterances", ylabel="ms per decoded token", title="decode latency", yscale="log")
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__" and sys.argv[1:] == ["_measure"]:
    args = json.loads(sys.stdin.read())
    print(json.dumps(_measure(**args)))
