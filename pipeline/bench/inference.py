"""``convsink bench inference``: K/V bytes held and per-token decode latency of each cache policy against the
number of utterances, on one model and one long conversation (MSC episodes back to back).

Protocol (one ``Conversation`` per policy, same model, same conversation; the policies advance together from
checkpoint to checkpoint and their timed parts are interleaved, so a change of machine load hits all alike):
- the conversation is teacher-forced one utterance per forward (user and model turns alike); ``recompute`` is
  fast-forwarded through the history (exact: its state at an utterance start is rebuilt from the history alone),
  and only the last ``utterance_samples`` utterances before a checkpoint run through the model;
- at each checkpoint (``utterances``): ``kv_bytes`` / ``cached_positions`` held, ``utterance_ms`` (mean time to
  take in one utterance, its policy work at the start included: the per-utterance cost), and a reply of exactly
  ``decode_tokens`` greedy tokens (EoU suppressed until then) + its closing EoU, decoded ``repeats`` times from
  copies of the same state. ``ms_per_token`` = median over repeats of reply time / (decode_tokens + 1); the reply
  time includes what the policy does when the reply starts (recompute re-encodes its window, without logits);
- a policy whose elapsed time passes ``time_budget_s`` after a checkpoint skips its remaining checkpoints (the
  first always runs); they are listed in ``skipped`` with the reason, never dropped silently.
Timings are wall-clock on a shared CPU: the 1-minute ``load_average`` at each checkpoint is recorded.
``threads`` (if given) sets torch's intra-op threads for the run (1 suits a tiny model on a shared CPU)."""

from __future__ import annotations

import json
import os
import statistics
import time

import torch

from data_prep.paths import shared_data_dir
from data_prep.tokenizer_loading import encode_utterances
from pipeline.contract import DENSE_CACHE, RECOMPUTE_CACHE, STREAMINGDIALOGUE_CACHE, STREAMINGLLM_CACHE

DEFAULT_UTTERANCES = (100, 200, 500, 1000, 2000)
DEFAULT_POLICIES = (DENSE_CACHE, RECOMPUTE_CACHE, STREAMINGLLM_CACHE, STREAMINGDIALOGUE_CACHE)


def long_conversation(tokenizer, data_dir: str, n_utterances: int) -> list[list[int]]:
    """Utterance token ids of MSC episodes (previous sessions + current, files in name order) back to back."""
    from data_prep.adapters import iter_dialogues

    msc = os.path.join(data_dir, "msc")
    if not os.path.isdir(msc):
        raise FileNotFoundError(f"{msc}: MSC data folder not found")
    texts: list[str] = []
    for name in sorted(os.listdir(msc)):
        for d in iter_dialogues(os.path.join(msc, name), "msc"):
            if isinstance(d, Exception):
                continue
            texts += [t.text for t in d.turns]
            if len(texts) >= n_utterances:
                return encode_utterances(tokenizer, texts[:n_utterances])
    raise ValueError(f"{msc}: only {len(texts)} utterances, {n_utterances} asked for")


def _time_replies(conv, decode_tokens: int, repeats: int) -> list[float]:
    """Seconds per forward of a reply of exactly ``decode_tokens`` tokens + EoU, from ``repeats`` copies."""
    out = []
    for _ in range(repeats):
        fork = conv.fork()
        t0 = time.perf_counter()
        fork.generate(None, decode_tokens, min_new_tokens=decode_tokens)
        out.append((time.perf_counter() - t0) / (decode_tokens + 1))
    return out


def bench_inference(model_dir: str = "tiny", out: str = "bench/inference_tiny.json", utterances=DEFAULT_UTTERANCES,
                    policies=DEFAULT_POLICIES, decode_tokens: int = 16, repeats: int = 5, window: int = 256,
                    sink_tokens: int = 4, utterance_samples: int = 5, data_dir: str | None = None,
                    time_budget_s: float = 900.0, threads: int | None = None,
                    recompute_window: int | None = None) -> dict:
    """Run the protocol above; write ``out`` (JSON) and ``<out stem>.png``; return the result dict.

    ``window`` is streamingllm's recent window; ``recompute_window`` (default: ``window``) is how many recent tokens
    ``recompute`` re-encodes at every utterance. The papers' "dense attention with recomputation" attends to all
    the context the model holds; the README reports recompute at w = 2048 as well as at w = 256."""
    from pipeline.inference.conversation import Conversation
    from pipeline.modeling.loader import load_chat_model

    if threads:
        torch.set_num_threads(threads)

    utterances = sorted({int(n) for n in utterances})
    model, tok, info = load_chat_model(model_dir)
    convo = long_conversation(tok, data_dir or shared_data_dir(), utterances[-1])
    recompute_window = recompute_window or window
    convs = {p: Conversation(model, info.bos_token_id, info.eou_token_id, p, sink_tokens=sink_tokens,
                             window=recompute_window if p == RECOMPUTE_CACHE else window)
             for p in policies}
    spent = {p: 0.0 for p in policies}  # seconds each policy has taken so far (its time budget)
    rows, skipped, loads, done = [], [], [], 0
    for k, target in enumerate(utterances):
        live = []
        for p in policies:
            if k > 0 and spent[p] > time_budget_s:  # the first checkpoint always runs
                skipped.append({"policy": p, "utterances": target,
                                "reason": f"time budget: {spent[p]:.0f} s spent > {time_budget_s:.0f} s per policy"})
                print(json.dumps(skipped[-1]), flush=True)
            else:
                live.append(p)
        todo, done = convo[done:target], target
        untimed, timed = todo[:-utterance_samples], todo[-utterance_samples:]
        for p in live:  # untimed fast part of the way
            t0 = time.perf_counter()
            for u in untimed:
                if p == RECOMPUTE_CACHE:
                    convs[p].record_utterance(u)
                else:
                    convs[p].add_utterance(u, all_logits=False)
            spent[p] += time.perf_counter() - t0
        # timed parts interleaved across policies, so a change of machine load hits every policy alike
        utt_s = {p: 0.0 for p in live}
        for u in timed:
            for p in live:
                t0 = time.perf_counter()
                convs[p].add_utterance(u, all_logits=False)
                utt_s[p] += time.perf_counter() - t0
        per_token = {p: [] for p in live}
        for _ in range(repeats):
            for p in live:
                per_token[p] += _time_replies(convs[p], decode_tokens, 1)
        load = os.getloadavg()[0]
        loads.append({"utterances": target, "load_1min": load})
        for p in live:
            spent[p] += utt_s[p] + sum(per_token[p]) * (decode_tokens + 1)
            conv = convs[p]
            rows.append({"policy": p, "utterances": target, "conversation_tokens": conv.next_position,
                         "cached_positions": len(conv.store), "kv_bytes": conv.store.nbytes(),
                         "ms_per_token": 1000 * statistics.median(per_token[p]),
                         "ms_per_token_repeats": [1000 * x for x in per_token[p]],
                         "utterance_ms": 1000 * utt_s[p] / len(timed)})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "ms_per_token_repeats"}), flush=True)
    result = {"model": model_dir if model_dir in ("tiny", "smollm2") else os.path.abspath(model_dir),
              "model_config": {k: getattr(model.config, k) for k in ("hidden_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads", "vocab_size")},
              "setting": {"utterances": utterances, "policies": list(policies), "decode_tokens": decode_tokens,
                          "repeats": repeats, "window": window, "recompute_window": recompute_window,
                          "sink_tokens": sink_tokens,
                          "utterance_samples": utterance_samples, "time_budget_s": time_budget_s,
                          "conversation": "MSC episodes (previous sessions + current) back to back, files in name order",
                          "dtype": str(next(model.parameters()).dtype), "device": str(model.device),
                          "torch_threads": torch.get_num_threads()},
              "load_average": loads, "seconds_per_policy": spent, "rows": rows, "skipped": skipped}
    result["ratios"], result["summary"] = _ratios(rows, utterances)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    plot_inference(result, os.path.splitext(out)[0] + ".png")
    return result


def _ratios(rows: list[dict], utterances: list[int]) -> tuple[dict, dict]:
    """Ratios against streamingdialogue at every checkpoint, and the flatness of each policy's costs."""
    by = {(r["policy"], r["utterances"]): r for r in rows}
    ratios = {}
    for n in utterances:
        sd = by.get((STREAMINGDIALOGUE_CACHE, n))
        if sd is None:
            continue
        r = {}
        for other in (DENSE_CACHE, RECOMPUTE_CACHE, STREAMINGLLM_CACHE):
            o = by.get((other, n))
            if o is not None:
                r[f"memory_{other}_over_streamingdialogue"] = o["kv_bytes"] / sd["kv_bytes"]
                r[f"latency_{other}_over_streamingdialogue"] = o["ms_per_token"] / sd["ms_per_token"]
        ratios[str(n)] = r
    summary = {}
    for policy in sorted({r["policy"] for r in rows}):
        pts = [r for r in rows if r["policy"] == policy]
        first, last = pts[0], pts[-1]
        summary[policy] = {"from_utterances": first["utterances"], "to_utterances": last["utterances"],
                           "ms_per_token_growth": last["ms_per_token"] / first["ms_per_token"],
                           "utterance_ms_growth": last["utterance_ms"] / first["utterance_ms"],
                           "kv_bytes_growth": last["kv_bytes"] / first["kv_bytes"]}
    return ratios, summary


def plot_inference(result: dict, path: str) -> None:
    """Memory held and per-token latency (and per-utterance cost) against utterances, one curve per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for policy in result["setting"]["policies"]:
        pts = [r for r in result["rows"] if r["policy"] == policy]
        if not pts:
            continue
        x = [r["utterances"] for r in pts]
        axes[0].plot(x, [r["kv_bytes"] / 2**20 for r in pts], marker="o", label=policy)
        axes[1].plot(x, [r["ms_per_token"] for r in pts], marker="o", label=policy)
        axes[2].plot(x, [r["utterance_ms"] for r in pts], marker="o", label=policy)
    cfg = result["model_config"]
    axes[0].set(xlabel="utterances", ylabel="K/V cache held (MiB)", title="memory", xscale="log", yscale="log")
    axes[1].set(xlabel="utterances", ylabel="ms per decoded token (median)",
                title=f"decode latency ({result['setting']['decode_tokens']}-token replies)", xscale="log", yscale="log")
    axes[2].set(xlabel="utterances", ylabel="ms per teacher-forced utterance", title="per-utterance cost",
                xscale="log", yscale="log")
    axes[0].legend()
    st = result["setting"]
    fig.suptitle(f"cache policies on {os.path.basename(str(result['model']))} (hidden {cfg['hidden_size']}, "
                 f"{cfg['num_hidden_layers']} layers), {st['device']}, streamingllm window {st['window']}, "
                 f"recompute window {st.get('recompute_window') or st['window']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
