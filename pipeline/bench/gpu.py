"""``convsink bench gpu``: the long-row benches on one CUDA GPU in bf16, the sink attention through compiled
FlexAttention (``FlexSinkAttention``) against causal SDPA, in one process (every phase writes the JSON as it ends):

1. ``check``: FlexAttention's sink attention against the dense-mask SDPA reference (fp32) on the bench conversation,
   output and the three input gradients, in fp32 and bf16;
2. ``attention``: forward + backward of one attention call with the model's heads (``(1, H, T, D)`` views of
   ``(1, T, H, D)`` memory), the sink's BlockMask (built once per batch, shared by every layer) timed apart;
3. ``steps``: one training step (forward, backward, AdamW) of a random-init model (default ``llama1b``: Llama-3.2-1B's
   shape) on one conversation row, checkpointed, tiled loss (and MLP, ``--mlp-chunk``): sink and causal at
   ``compare_lens``, then the sink alone doubling until out of memory or the time budget ends. Per point: peak memory
   (``torch.cuda.max_memory_allocated``), the last step's time, tokens/s and MFU.

MFU = model FLOPs per step / step time / peak rate. Model FLOPs = 6·N·T + 12·L·H·D·P: N = parameters in matrix
products (the output layer counted, the input embedding not), P = (query, key) pairs the mask allows (causal:
T(T+1)/2); checkpointing's recomputation is not counted (PaLM's MFU). Peak: 989 TFLOP/s, the H100/H200 SXM dense
bf16 datasheet figure; the JSON also holds this GPU's measured bf16 matrix-product rate.
"""

from __future__ import annotations

import gc
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask

from data_prep.paths import write_text_atomic
from pipeline.attention.masks import MaskParams, batch_dense_mask
from pipeline.attention.registry import DenseMaskAttention, prepare_attention
from pipeline.attention.sink_kernel import flex_attention_fn
from pipeline.attention.sink_plan import band_start, batch_meta, row_meta, sink_keys
from pipeline.bench.memory import conversation_source, doubling, loss_with, row_from_source
from pipeline.contract import DIALOGUE, DOC_IDS, MASK_KIND
from pipeline.modeling.tiled_mlp import enable_tiled_mlp, tiled_mlp_layers

PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM, dense bf16 (datasheet)
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                tie_word_embeddings=True, max_position_embeddings=1 << 21)  # Llama-3.2-1B, without its rope scaling
SINK_FLEX, CAUSAL, FLEX_CAUSAL = "sink", "causal_sdpa", "flex_causal"


class CausalRepeatKV:
    """Causal SDPA, key/value heads repeated to the query heads (grouped-query attention), restricted to the fused
    backends (flash, cuDNN, memory-efficient): the math fallback would build the T×T scores."""

    def __call__(self, query, key, value, scaling):
        if key.shape[1] != query.shape[1]:  # (B, Hkv, T, D) -> (B, H, T, D)
            key, value = (x.repeat_interleave(query.shape[1] // x.shape[1], 1) for x in (key, value))
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)


def sink_attention(batch: dict, impl: str):
    """The per-batch sink attention: 'flex' (``FlexSinkAttention``, compiled on CUDA) or 'sink' (the CPU kernel)."""
    return prepare_attention(batch, impl, MaskParams())


def allowed_pairs(batch: dict) -> int:
    """(query, key) pairs the dialogue mask allows in a one-conversation row: per query its band ``[band_start, q]``
    plus the sink keys (BOS, every EoU) before the band."""
    if batch[MASK_KIND] != [DIALOGUE] or int(batch[DOC_IDS].max()) != 0:
        raise ValueError("allowed_pairs counts one dialogue-mask conversation (batch of one row, one document)")
    row = row_meta(batch_meta(batch, MaskParams()), 0)
    start = band_start(DIALOGUE, row, MaskParams())  # (T,)
    sinks_before = torch.cat([torch.zeros(1, dtype=torch.long, device=start.device),
                              sink_keys(DIALOGUE, row, MaskParams()).long().cumsum(0)])[start]  # sinks at keys < start
    return int((torch.arange(len(start), device=start.device) - start + 1 + sinks_before).sum())


def model_flops(n_matmul: int, layers: int, heads: int, head_dim: int, T: int, pairs: int) -> float:
    """Model FLOPs of one training step (forward + backward, no recomputation) of T tokens."""
    return 6.0 * n_matmul * T + 12.0 * layers * heads * head_dim * pairs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of ``fn()`` per run (wall clock around a device synchronisation), after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _qkv(T: int, heads: int, kv_heads: int, head_dim: int, dtype, device):
    """(1, H, T, D) / (1, Hkv, T, D) leaf views of (1, T, H, D) memory, as a Llama layer passes them, and a gradient."""
    torch.manual_seed(0)
    q = torch.randn(1, T, heads, head_dim, device=device).to(dtype).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(1, T, kv_heads, head_dim, device=device).to(dtype).transpose(1, 2).requires_grad_() for _ in range(2))
    return q, k, v, torch.randn(1, T, heads, head_dim, device=device).to(dtype).transpose(1, 2)


def check_against_dense(source: dict, T: int, heads: int, kv_heads: int, head_dim: int, device, impl: str) -> dict:
    """Max abs difference of the sink attention's output and input gradients from the dense-mask SDPA reference
    (fp32), in fp32 and in bf16 (inputs rounded to bf16, compared with the fp32 reference), and the reference's scale."""
    batch = _to(row_from_source(source, T), device)

    def run(attn, dtype):
        q, k, v, g = _qkv(T, heads, kv_heads, head_dim, dtype, device)
        out = attn(q, k, v, head_dim ** -0.5)
        out.backward(g)
        return [t.detach().float() for t in (out, q.grad, k.grad, v.grad)]

    ref = run(DenseMaskAttention(batch_dense_mask(batch, MaskParams())), torch.float32)
    result = {"T": T, "reference": "dense-mask SDPA, fp32", "reference_max_abs": [float(r.abs().max()) for r in ref]}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        got = run(sink_attention(batch, impl), dtype)
        result[f"max_abs_diff_{name}"] = dict(zip(("out", "dq", "dk", "dv"), (float((a - b).abs().max()) for a, b in zip(got, ref))))
    return result


def attention_rows(source: dict, lens, heads: int, kv_heads: int, head_dim: int, device, impl: str,
                   dtype=torch.bfloat16, repeats: int = 5) -> list[dict]:
    """Forward + backward seconds (median of ``repeats`` after 2 warm-up runs, the first compiles) of the sink
    attention and causal SDPA at each length; the sink's per-batch BlockMask build timed apart (second build)."""
    return [row for T in lens for row in _attention_at(source, T, heads, kv_heads, head_dim, device, impl, dtype, repeats)]


def _attention_at(source: dict, T: int, heads: int, kv_heads: int, head_dim: int, device, impl: str, dtype,
                  repeats: int) -> list[dict]:
    """``attention_rows`` at one length (its tensors are freed when it returns)."""
    batch = _to(row_from_source(source, T), device)
    q, k, v, g = _qkv(T, heads, kv_heads, head_dim, dtype, device)
    plan = _timed(lambda: sink_attention(batch, impl), device, 1, 1)[0]
    methods = {SINK_FLEX: sink_attention(batch, impl), CAUSAL: CausalRepeatKV()}
    if impl == "flex":  # the same compiled FlexAttention with a plain causal BlockMask: the kernel's own speed
        methods[FLEX_CAUSAL] = flex_causal(T, device)
    rows = {}
    for name, attn in methods.items():
        def step():
            attn(q, k, v, head_dim ** -0.5).backward(g)
            q.grad = k.grad = v.grad = None
        times = _timed(step, device, 2, repeats)
        rows[name] = {"method": name, "T": T, "seconds": sorted(times)[len(times) // 2], "all_seconds": times}
    rows[SINK_FLEX].update(plan_seconds=plan, speedup_vs_causal=rows[CAUSAL]["seconds"] / rows[SINK_FLEX]["seconds"])
    with torch.no_grad():  # forward alone (no autograd graph)
        forward = _timed(lambda: methods[SINK_FLEX](q, k, v, head_dim ** -0.5), device, 2, repeats)
    rows[SINK_FLEX]["forward_seconds"] = sorted(forward)[repeats // 2]
    return list(rows.values())


def flex_causal(T: int, device):
    """Compiled FlexAttention with a causal BlockMask (``create_block_mask``): ``(q, k, v, scaling) -> out``."""
    mask = create_block_mask(lambda b, h, q, kv: kv <= q, 1, None, T, T, device=device)
    return lambda q, k, v, scaling: flex_attention_fn(True)(q, k, v, block_mask=mask, scale=scaling, enable_gqa=k.shape[1] != q.shape[1])


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def build_model(spec: str, device, dtype, mlp_chunk: int | None = None):
    """A random-init causal LM (seed 0): 'llama1b' (``LLAMA_1B``), 'tiny', 'smollm2' or a folder; MLPs tiled if asked."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from pipeline.attention.registry import register
    from pipeline.bench.memory import model_folder
    from pipeline.modeling.forward import enable_activation_checkpointing

    register()
    config = LlamaConfig(**LLAMA_1B) if spec == "llama1b" else AutoConfig.from_pretrained(model_folder(spec))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="convsink", dtype=dtype)
    enable_activation_checkpointing(model)  # per decoder layer, non-reentrant (active in training mode)
    if mlp_chunk:
        enable_tiled_mlp(model, mlp_chunk)
    return model.train()


def checkpointing_on(model) -> bool:
    """Whether transformers' activation checkpointing is on (``is_activation_checkpointing`` from 5.x, else the old name)."""
    return bool(getattr(model, "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"))


def matmul_params(model) -> int:
    """Parameters that enter matrix products per token: every 2-D weight but the input embedding (a tied output
    layer counted once, as the output layer)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    n = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not embed)
    return n + (head.numel() if head is embed else 0)


def step_point(model, opt, row: dict, method: str, loss_chunk: int, device, impl: str, seconds_left: float) -> dict:
    """One point: up to 2 training steps on the one-row batch ``row`` (the first compiles and allocates the optimizer
    state; the second, run if ``seconds_left`` allows, is timed). Out of memory ends the point."""
    batch, T = _to(row, device), row[DOC_IDS].shape[1]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, point = [], {"method": method, "T": T}
    try:
        for i in range(2):
            if i and times[0] * 1.2 > seconds_left:
                point["note"] = "one step only (time budget): the step time includes compiling"
                break
            _sync(device)
            t0 = time.perf_counter()
            attn = sink_attention(batch, impl) if method == SINK_FLEX else CausalRepeatKV()
            loss = loss_with(model, batch, attn, True, loss_chunk)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - t0)
            seconds_left -= times[-1]
            point["loss"] = float(loss)
    except torch.OutOfMemoryError as e:
        point.update(fits=False, reason="out of memory: " + str(e).splitlines()[0][:200])
    finally:
        opt.zero_grad(set_to_none=True)
        attn = loss = None
        gc.collect()
    if device.type == "cuda":
        point.update(peak_gb=torch.cuda.max_memory_allocated(device) / 2**30,
                     peak_reserved_gb=torch.cuda.max_memory_reserved(device) / 2**30)
        torch.cuda.empty_cache()
    if "fits" in point:
        return point
    return {**point, "fits": True, "all_step_seconds": times, "step_seconds": times[-1], "tokens_per_s": T / times[-1],
            "timed_step_compiled": len(times) == 1}


def matmul_tflops(device, n: int = 8192) -> float | None:
    """Measured bf16 matrix-product rate (TFLOP/s, mean of 10 after 3 warm-ups); None off CUDA."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    times = _timed(lambda: a @ b, device, 3, 10)
    return 2 * n ** 3 / (sum(times) / len(times)) / 1e12


def bench_gpu(out: str, model_spec: str = "llama1b", attention_lens=(16384, 32768, 65536),
              compare_lens=(8192, 16384, 32768, 65536), max_len: int = 1 << 20, loss_chunk: int = 8192,
              time_budget_s: float = 420.0, conversation: str | None = None, check_len: int = 2048,
              device: str = "cuda", impl: str = "flex", dtype: str = "bfloat16", peak_tflops: float = PEAK_BF16_TFLOPS,
              mlp_chunk: int | None = None) -> dict:
    """Run the three phases (module docstring), writing ``out`` after each point. ``conversation``: a JSON file of
    ``conversation_source()`` (written here if missing), so a machine without ../shared or the tokenizer can run
    it. Points the time budget leaves out are listed as not run."""
    t_start = time.perf_counter()
    dev, dt = torch.device(device), getattr(torch, dtype)
    if conversation and os.path.isfile(conversation):
        source = json.load(open(conversation))
    else:
        source = conversation_source()
        if conversation:
            write_text_atomic(conversation, json.dumps(source))
    import torch._dynamo as dynamo

    dynamo.config.cache_size_limit = 64  # one compiled FlexAttention per length (static shapes)
    model = build_model(model_spec, dev, dt, mlp_chunk)
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    n_matmul = matmul_params(model)
    result = {"setting": {"model": model_spec, "model_config": json.loads(cfg.to_json_string()), "init": "random (seed 0)",
                          "dtype": dtype, "parameters": sum(p.numel() for p in model.parameters()),
                          "matmul_parameters": n_matmul, "activation_checkpointing": checkpointing_on(model), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                          "torch": torch.__version__, "transformers": __import__("transformers").__version__,
                          "attention": f"sink: {impl} (FlexSinkAttention on CUDA, compiled); causal: SDPA is_causal, fused backends",
                          "step": "forward + backward + torch AdamW step (weights, gradients and optimizer state in "
                                  f"{dtype}), activation checkpointing per layer, tiled loss (loss_chunk {loss_chunk})"
                                  + (f", tiled MLP (mlp_chunk {mlp_chunk})" if mlp_chunk else ""), "mlp_chunk": mlp_chunk,
                          "tiled_mlp_layers": tiled_mlp_layers(model),
                          "text": "real MSC utterances back to back, SmolLM2 token ids, cycled to T (one conversation row)",
                          "mfu": "6·N·T + 12·L·H·D·(pairs the mask allows), no recomputation counted, over the peak rate",
                          "peak_tflops": peak_tflops, "time_budget_s": time_budget_s},
              "matmul_tflops_measured": matmul_tflops(dev), "check": None, "attention": [], "steps": [], "errors": []}

    def save():
        result["summary"] = summarize(result)
        write_text_atomic(out, json.dumps(result, indent=2))

    def phase(name, fn):
        try:
            fn()
        except Exception as e:  # a failed phase is recorded and the next one runs
            result["errors"].append({"phase": name, "error": f"{type(e).__name__}: {e}"[:2000]})
        save()

    phase("check", lambda: result.update(check=check_against_dense(source, check_len, heads, kv_heads, head_dim, dev, impl)))
    phase("attention", lambda: result["attention"].extend(attention_rows(source, attention_lens, heads, kv_heads, head_dim, dev, impl, dt)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda")
    sweep = [(T, m) for T in compare_lens for m in (SINK_FLEX, CAUSAL)]
    sweep += [(T, SINK_FLEX) for T in doubling(max(compare_lens) * 2, max_len)]
    stopped = set()
    for T, method in sweep:
        left = time_budget_s - (time.perf_counter() - t_start)
        last = [p for p in result["steps"] if p["method"] == method and p.get("fits")]
        guess = 2.2 * sum(last[-1]["all_step_seconds"]) if last else 0.0
        if method in stopped or guess > left:
            result["steps"].append({"method": method, "T": T, "fits": None, "reason": "not run: "
                                    + ("a shorter row did not fit" if method in stopped else "time budget")})
            continue
        def point():
            row = row_from_source(source, T)
            p = step_point(model, opt, row, method, loss_chunk, dev, impl, left)
            if p.get("fits"):
                pairs = T * (T + 1) // 2 if method == CAUSAL else allowed_pairs(row)
                flops = model_flops(n_matmul, cfg.num_hidden_layers, heads, head_dim, T, pairs)
                p.update(allowed_pairs=pairs, model_tflops_per_step=flops / 1e12,
                         mfu=flops / p["step_seconds"] / (peak_tflops * 1e12))
            else:
                stopped.add(method)
            p["finished_s"] = time.perf_counter() - t_start
            result["steps"].append(p)
            print(json.dumps({k: v for k, v in p.items() if k != "all_step_seconds"}), flush=True)
        phase(f"step {method} {T}", point)
    result["total_seconds"] = time.perf_counter() - t_start
    save()
    from pipeline.bench.gpu_plot import plot_gpu

    phase("plot", lambda: plot_gpu(result, os.path.splitext(out)[0] + ".png"))
    return result


def summarize(result: dict) -> dict:
    """The longest row that fit per method and why the next one was not measured (out of memory, or not run: the
    time budget), and the sink / causal ratios at the lengths both ran."""
    steps = [p for p in result["steps"] if p.get("fits")]
    by = {(p["method"], p["T"]): p for p in steps}
    longest = {m: max((p["T"] for p in steps if p["method"] == m), default=None) for m in (SINK_FLEX, CAUSAL)}
    stopped = {m: next(({"T": p["T"], "reason": p["reason"]} for p in result["steps"] if p["method"] == m and not p.get("fits")),
                       None) for m in (SINK_FLEX, CAUSAL)}
    ratios = [{"T": T, "sink_tokens_per_s": by[(SINK_FLEX, T)]["tokens_per_s"], "causal_tokens_per_s": by[(CAUSAL, T)]["tokens_per_s"],
               "sink_over_causal": by[(SINK_FLEX, T)]["tokens_per_s"] / by[(CAUSAL, T)]["tokens_per_s"],
               "sink_mfu": by[(SINK_FLEX, T)].get("mfu"), "causal_mfu": by[(CAUSAL, T)].get("mfu")}
              for T in sorted({T for _, T in by}) if (SINK_FLEX, T) in by and (CAUSAL, T) in by]
    return {"longest_T_fit": longest, "first_T_not_fit": stopped, "step_ratios": ratios,
            "attention_speedups": {r["T"]: r["speedup_vs_causal"] for r in result["attention"] if "speedup_vs_causal" in r}}


def add_gpu_parser(inner) -> None:
    """``convsink bench gpu`` on the bench sub-parsers ``inner``."""
    s = inner.add_parser("gpu", help="one CUDA GPU, bf16: FlexAttention sink vs dense (check), attention vs causal SDPA, "
                         "training steps (checkpointed, tiled loss) doubling T until out of memory; tokens/s and MFU")
    s.add_argument("--out", required=True, help="JSON output file (rewritten after every point)")
    s.add_argument("--model", default="llama1b", help="llama1b (Llama-3.2-1B's shape), tiny, smollm2 or a model folder")
    s.add_argument("--attention-lens", type=int, nargs="*", default=[16384, 32768, 65536], help="attention-only lengths (none: skip)")
    s.add_argument("--compare-lens", type=int, nargs="+", default=[8192, 16384, 32768, 65536], help="step lengths for sink and causal")
    s.add_argument("--max-len", type=int, default=1 << 20, help="the sink's step lengths double up to this")
    s.add_argument("--loss-chunk", type=int, default=8192, help="tokens per tiled-loss chunk")
    s.add_argument("--mlp-chunk", type=int, help="tokens per tiled-MLP chunk (default: MLPs not tiled)")
    s.add_argument("--time-budget", type=float, default=420.0, help="seconds: no step point starts that would end past it")
    s.add_argument("--conversation", help="JSON file of the bench conversation's token ids (written if missing)")
    s.add_argument("--device", default="cuda", help="cuda (cpu runs the CPU sink kernel instead of FlexAttention: for tests)")
    s.set_defaults(fn=run_command)


def run_command(args) -> int:
    """The command: run the bench, print the summary."""
    impl = "flex" if args.device.startswith("cuda") else "sink"
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    r = bench_gpu(args.out, args.model, tuple(args.attention_lens), tuple(args.compare_lens), args.max_len, args.loss_chunk,
                  args.time_budget, args.conversation, device=args.device, impl=impl, dtype=dtype, mlp_chunk=args.mlp_chunk)
    print(json.dumps(r["summary"], indent=1))
    for e in r["errors"]:
        print(f"error in {e['phase']}: {e['error']}")
    print(f"bench: wrote {args.out}")
    return 1 if r["errors"] else 0
