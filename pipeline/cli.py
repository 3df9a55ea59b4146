"""The ``convsink`` command line: one subcommand per stage, each a thin call into one typed function.

Errors a user can fix (bad config, bad data, missing files) print one line and exit 2; nothing else is shown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from data_prep.adapters import FORMATS as INPUT_FORMATS
from data_prep.scaled_corpus import DEFAULT_COPIES as DEFAULT_SCALE_COPIES
from pipeline.config import OVERRIDE, split_overrides
from pipeline.contract import CACHE_POLICIES, DIALOGUE, DIALOGUE_ROW_MASKS, STAGES


OVERRIDES_HELP = "config overrides as key=value, e.g. train.lr=3e-4 data.seq_len=512"


def cmd_prep(args) -> int:
    from data_prep.prep import prepare
    from pipeline.config import load_config

    args.inputs, overrides = split_overrides(args.inputs)
    overrides += args.overrides
    if not args.inputs:
        raise ValueError("no input files given")
    if args.format:
        overrides.append(f"data.format={args.format}")
    if args.engine:
        overrides.append(f"data.engine={args.engine}")
    if args.workers:
        overrides.append(f"data.workers={args.workers}")
    cfg = load_config(args.config, overrides)
    manifest = prepare(args.inputs, args.out, cfg.data, overwrite=args.overwrite)
    c = manifest["counts"]
    print(f"prep: {c['dialogues']} dialogues, {c['utterances']} utterances, {c['tokens_out']} tokens in "
          f"{c['sequences']} sequences (packing efficiency {c['packing_efficiency']:.2%}, {c['rejected']} rejected) -> {args.out}")
    return 0


def cmd_train(args) -> int:
    from pipeline.config import load_config
    from pipeline.training.launch import launch_training

    cfg = load_config(args.config, train_overrides(args))
    result = launch_training(cfg, args.data, args.out, resume=args.resume)
    print(f"train: checkpoint {result['checkpoint']}")
    if result.get("wandb_dir"):
        print(f"train: W&B run {result['wandb_dir']}")
    return 0


def train_overrides(args) -> list[str]:
    """The overrides of a training command line: key=value items, then --stage and --allow-batch-change."""
    return (list(args.overrides) + ([f"train.stage={args.stage}"] if args.stage else [])
            + (["train.allow_batch_change=true"] if args.allow_batch_change else []))


def add_allow_batch_change(parser: argparse.ArgumentParser) -> None:
    """``--allow-batch-change``, shared by ``convsink train`` and ``python -m ray_jobs.train``."""
    parser.add_argument("--allow-batch-change", action="store_true",
                        help="with --resume: accept another train.micro_batch_size / grad_accum than the checkpoint's "
                             "(step s then reads samples [s*G, (s+1)*G) of the new global batch G: the same samples when G "
                             "is unchanged; see pipeline/training/resume_guard.py)")


def cmd_export(args) -> int:
    from pipeline.modeling.export import export_checkpoint

    out = export_checkpoint(args.checkpoint_dir, args.out, tag=args.tag)
    print(f"export: Hugging Face model -> {out}")
    return 0


def cmd_chat(args) -> int:
    from pipeline.config import load_config
    from pipeline.inference.chat import run_chat

    overrides = list(args.overrides)
    if args.cache:
        overrides.append(f"chat.cache={args.cache}")
    cfg = load_config(args.config, overrides)
    if args.system is not None:
        cfg.chat.system = args.system
    turns = None
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            raise FileNotFoundError(f"{args.prompt_file}: prompt file not found")
        with open(args.prompt_file) as f:
            turns = [line.rstrip("\n") for line in f if line.strip()]
    run_chat(args.model, turns, cfg.chat, show_cache=args.show_cache)
    return 0


def cmd_bench_attention(args) -> int:
    from pipeline.bench.attention import bench_attention, summary_line

    names = ("heads", "head_dim", "repeats", "chunk", "threads", "layout", "kv_heads", "rounds", "min_seconds")
    result = bench_attention(args.out, seq_lens=tuple(args.seq_lens), **{n: getattr(args, n) for n in names})
    for r in result["summary"]:
        print(summary_line(r))
    print(f"bench: wrote {args.out}")
    return 0


def cmd_bench_prep(args) -> int:
    if args.scale is not None:
        return cmd_bench_prep_scale(args)
    from pipeline.bench.prep import bench_prep

    args.out = args.out or "bench/prep_cpu.json"
    r = bench_prep(args.out, workers=args.workers)
    for name, e in r["engines"].items():
        print(f"{name:>10}: {e['tokens_per_s']:,.0f} tokens/s ({e['seconds']:.1f} s)")
    print(f"ray / single process: {r['ray_speedup_vs_single_process']:.2f}x")
    for seq_len, p in r["packing"].items():
        print(f"packing efficiency at {seq_len}: {p['packing_efficiency']:.2%}")
    print(f"bench: wrote {args.out}")
    return 0


def cmd_bench_prep_scale(args) -> int:
    import shlex

    from pipeline.bench.prep_scale import bench_prep_scale

    args.out = args.out or "bench/prep_scale_cpu.json"
    r = bench_prep_scale(args.out, scale=args.scale, corpus_dir=args.corpus_dir, workers=args.workers or 2,
                         command=shlex.join(["convsink", *sys.argv[1:]]))
    for name, e in r["engines"].items():
        print(f"{name:>13}: {e['tokens_per_s']:,.0f} tokens/s ({e['pipeline_seconds']:.1f} s + Ray start "
              f"{e['ray_init_seconds']:.1f} s), driver peak RSS {e['driver_peak_rss_mb']:,.0f} MB")
    print(f"corpus {r['corpus']['mb']:,.0f} MB, effective cores {r['effective_cores']:.2f}: Ray / single process "
          f"{r['ray_speedup_vs_single_process']:.2f}x, efficiency {r['efficiency']:.0%}; Ray / Ray 1 worker "
          f"{r['ray_speedup_vs_ray_1_worker']:.2f}x, efficiency {r['scaling_efficiency']:.0%} (target {r['target_efficiency']:.0%})")
    m = r["driver_memory"]
    if "driver_rss_mb_per_100mb_corpus" in m:
        print(f"Ray driver peak RSS: {m['driver_rss_mb_per_100mb_corpus']} MB per 100 MB of corpus "
              f"(x{m['driver_rss_ratio_largest_to_smallest']} for x{m['corpus_ratio_largest_to_smallest']} the corpus)")
    print(f"bench: wrote {args.out}")
    return 0


def cmd_bench_inference(args) -> int:
    from pipeline.bench.inference import DEFAULT_POLICIES, bench_inference

    r = bench_inference(args.model, args.out, utterances=tuple(args.utterances), window=args.window,
                        time_budget_s=args.time_budget, decode_tokens=args.decode_tokens, repeats=args.repeats,
                        threads=args.threads, recompute_window=args.recompute_window,
                        policies=tuple(args.policies or DEFAULT_POLICIES))
    for n, ratio in r["ratios"].items():
        print(f"{n} utterances: " + ", ".join(f"{k} {v:.1f}x" for k, v in ratio.items()))
    for s in r["skipped"]:
        print(f"skipped: {s['policy']} at {s['utterances']} utterances ({s['reason']})")
    print(f"bench: wrote {args.out} and {os.path.splitext(args.out)[0]}.png")
    return 0


def cmd_bench_memory(args) -> int:
    from pipeline.bench.memory import DEFAULT_CONFIGS, bench_memory, format_tables

    r = bench_memory(args.model, args.out, seq_lens=args.seq_lens, configs=tuple(args.configs or DEFAULT_CONFIGS),
                     cap_gb=args.cap_gb, loss_chunk=args.loss_chunk, steps=args.steps, threads=args.threads,
                     resume=args.resume, max_seq_len=args.max_seq_len, release_memory=not args.keep_freed_memory)
    print(format_tables(r))
    for config, s in r["summary"].items():
        print(f"{config}: longest T that fit {s['longest_T_fit']}, first that did not {s['first_T_not_fit']}")
    print(f"bench: wrote {args.out} and {os.path.splitext(args.out)[0]}.png")
    return 0


def _bench_parser(sub) -> argparse._SubParsersAction:
    """``convsink bench <what>``: benchmarks that write JSON (siblings: attention, prep, inference)."""
    bench = sub.add_parser("bench", help="benchmarks (write JSON)")
    inner = bench.add_subparsers(dest="bench_command", required=True)
    s = inner.add_parser("attention", help="sink attention vs dense-mask SDPA vs causal SDPA, forward+backward")
    s.add_argument("--out", required=True, help="JSON output file")
    s.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384], help="sequence lengths")
    s.add_argument("--heads", type=int, default=2, help="attention heads")
    s.add_argument("--kv-heads", type=int, help="key/value heads (grouped-query attention, e.g. SmolLM2-135M: --heads 9 --kv-heads 3)")
    s.add_argument("--head-dim", type=int, default=32, help="head dimension")
    s.add_argument("--repeats", type=int, default=3, help="timed repeats per round (the minimum is reported)")
    s.add_argument("--rounds", type=int, default=1, help="the methods take turns this many times per length (runs spread over the same minutes)")
    s.add_argument("--min-seconds", type=float, help="per method and round, runs until they add up to this (default 3; at least --repeats runs)")
    s.add_argument("--chunk", type=int, help="sink attention query chunk (default: pipeline.attention.sink_kernel.CHUNK)")
    s.add_argument("--threads", type=int, help="torch threads per measurement (default: torch's; 1 is steadier on a shared CPU)")
    s.add_argument("--layout", choices=["conversation", "packed"], default="conversation", help="conversation = one MSC-shaped "
                   "conversation of T tokens; packed = real MSC episodes packed into T (as in training)")
    s.set_defaults(fn=cmd_bench_attention)
    s = inner.add_parser("prep", help="Ray pipeline vs single-process loop (tokens/s), packing efficiency; --scale N: at corpus scale")
    s.add_argument("--out", help="JSON output file (default: bench/prep_cpu.json, with --scale bench/prep_scale_cpu.json)")
    s.add_argument("--workers", type=int, help="Ray workers (default: all CPUs; with --scale 2)")
    s.add_argument("--scale", type=int, nargs="?", const=DEFAULT_SCALE_COPIES, metavar="N",
                   help=f"prep N copies of the shipped dialogues with fresh ids (--scale alone: {DEFAULT_SCALE_COPIES}, "
                        "211 MB of JSON lines), local vs Ray in their own processes, driver memory at N/4, N/2, N")
    s.add_argument("--corpus-dir", help="with --scale: generate the corpus here and keep it (reused when it matches)")
    s.set_defaults(fn=cmd_bench_prep)
    s = inner.add_parser("inference", help="K/V bytes and per-token decode latency per cache policy vs utterances")
    s.add_argument("--model", required=True, help="exported model folder (or tiny / smollm2)")
    s.add_argument("--out", required=True, help="JSON output (a PNG plot is written next to it)")
    s.add_argument("--utterances", type=int, nargs="+", default=[100, 200, 500, 1000, 2000], help="checkpoints")
    s.add_argument("--window", type=int, default=256, help="streamingllm window (and recompute's unless --recompute-window)")
    s.add_argument("--recompute-window", type=int, help="tokens recompute re-encodes every utterance (default: --window; "
                   "the papers' dense-recompute baseline holds the model's whole context)")
    s.add_argument("--policies", nargs="+", choices=CACHE_POLICIES,
                   help="cache policies to run (default: dense recompute streamingllm streamingdialogue)")
    s.add_argument("--time-budget", type=float, default=900.0, help="seconds per policy before skipping points")
    s.add_argument("--decode-tokens", type=int, default=16, help="tokens per timed reply")
    s.add_argument("--repeats", type=int, default=5, help="timed replies per point (the median is reported)")
    s.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; 1 suits a tiny model)")
    s.set_defaults(fn=cmd_bench_inference)
    s = inner.add_parser("memory", help="one training step per configuration: peak memory, step time, tokens/s vs T")
    s.add_argument("--model", required=True, help="smollm2, tiny or a model folder (its architecture, random init)")
    s.add_argument("--out", required=True, help="JSON output (a PNG plot is written next to it)")
    s.add_argument("--seq-lens", type=int, nargs="+", help="lengths (default: doubling from 2048 to --max-seq-len)")
    s.add_argument("--max-seq-len", type=int, default=131072, help="longest default length")
    s.add_argument("--configs", nargs="+", help="configurations of pipeline.bench.memory.CONFIGS (default: its DEFAULT_CONFIGS)")
    s.add_argument("--cap-gb", type=float, default=20.0, help="memory cap per point (RSS, GB)")
    s.add_argument("--loss-chunk", type=int, default=1024, help="tokens per tiled-loss chunk (and tiled-MLP chunk)")
    s.add_argument("--steps", type=int, default=1, help="training steps per point (the last one is timed)")
    s.add_argument("--threads", type=int, help="torch threads per point (default: torch's)")
    s.add_argument("--resume", action="store_true", help="keep the points already in --out and run the rest")
    s.add_argument("--keep-freed-memory", action="store_true", help="leave glibc's malloc at its defaults (see README)")
    s.set_defaults(fn=cmd_bench_memory)
    from pipeline.bench import gpu, method  # `convsink bench gpu`, `convsink bench method`

    method.add_method_parser(inner)
    gpu.add_gpu_parser(inner)
    return inner


def cmd_eval(args) -> int:
    from pipeline.evaluation.report import evaluate_model, score_files

    if args.predictions:
        if not args.references:
            raise ValueError("--predictions needs --references INPUT")
        result = score_files(args.predictions, args.references, args.out)
        print(json.dumps(result["scores"], indent=1))
    else:
        if not args.model or not args.data:
            raise ValueError("give --model DIR --data INPUT..., or --predictions FILE --references INPUT...")
        from pipeline.config import load_config

        cfg = load_config(args.config, list(args.overrides))
        r = evaluate_model(args.model, args.data, args.out, cache=args.cache, mask=args.mask, limit=args.limit,
                           max_new_tokens=cfg.chat.max_new_tokens, max_tokens=args.max_tokens,
                           recall_after=args.recall_after, chat_cfg=cfg.chat, batch_size=args.batch_size)
        p, pc, g, rp = r["perplexity"], r["perplexity_cache"], r["generation"], r["recall_probe"]
        print(f"ppl ({args.mask} mask) {p['ppl']:.3f}; ppl ({pc['cache']} cache) {pc['ppl']:.3f}; "
              f"BLEU-1/2/avg {g['bleu1']:.2f}/{g['bleu2']:.2f}/{g['bleu_avg']:.2f}; ROUGE-L {g['rougeL']:.2f}; "
              f"Distinct-3 {g['distinct3']:.3f}; recall EM {rp['exact_match']:.3f} F1 {rp['token_f1']:.3f} (n={rp['n']})")
    print(f"eval: wrote {args.out} and {os.path.splitext(args.out)[0]}.md")
    return 0


def cmd_tokenizer(args) -> int:
    from data_prep.sources import resolve_inputs
    from data_prep.tokenizer_loading import train_bpe_tokenizer

    paths = resolve_inputs(list(args.inputs))
    out = train_bpe_tokenizer(paths, args.out, vocab_size=args.vocab_size, fmt=args.format)
    print(f"tokenizer: {args.vocab_size} tokens from {len(paths)} file(s) -> {out} (use it with data.tokenizer={out})")
    return 0


def cmd_run(args) -> int:
    from pipeline.config import load_config
    from pipeline.training.two_stage import run_recipe

    cfg = load_config(args.config, list(args.overrides))
    run_recipe(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convsink", description="Conversational attention sinks: prep → train → export → chat")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prep", help="dialogue files → packed Parquet shards + manifest.json")
    s.add_argument("inputs", nargs="+", help="dialogue files (canonical/PersonaChat/MSC/messages JSON[L]), then optional "
                   + OVERRIDES_HELP)
    s.add_argument("--out", required=True, help="output shard folder")
    s.add_argument("--config", help="YAML recipe (its data: section is used)")
    s.add_argument("--format", choices=["auto", *INPUT_FORMATS], help="input format (default auto)")
    s.add_argument("--engine", choices=["ray", "local"], help="ray = Ray Data pipeline (default), local = single-process reference loop")
    s.add_argument("--workers", type=int, help="Ray workers (default: all CPUs)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an --out that holds shards of another fingerprint (default: refuse; it may be in use)")
    s.set_defaults(fn=cmd_prep, overrides=[])

    s = sub.add_parser("train", help="DeepSpeed ZeRO-3 training on prepared shards")
    s.add_argument("--config", required=True, help="YAML recipe")
    s.add_argument("--data", required=True, help="shard folder from `convsink prep`")
    s.add_argument("--out", required=True, help="run folder (checkpoints, W&B run)")
    s.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    s.add_argument("--stage", choices=STAGES, help="memory = SMR+LMR samples, dialogue = dialogue fine-tuning (default: the recipe's train.stage)")
    add_allow_batch_change(s)
    s.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("export", help="ZeRO-3 checkpoint → merged Hugging Face folder (safetensors)")
    s.add_argument("checkpoint_dir", help="the run folder of `convsink train` (or its checkpoints/ folder)")
    s.add_argument("--out", required=True, help="output model folder")
    s.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("chat", help="multi-turn chat with the StreamingDialogue cache")
    s.add_argument("--model", required=True, help="exported model folder (or smollm2 / tiny)")
    s.add_argument("--prompt-file", help="user turns, one per line (non-interactive)")
    s.add_argument("--config", help="YAML recipe (its chat: section is used)")
    s.add_argument("--cache", choices=CACHE_POLICIES,
                   help="KV cache policy (default: chat.cache if set, else the model's convsink.json)")
    s.add_argument("--show-cache", action="store_true", help="print the cache size after every turn")
    s.add_argument("--system", help="system prompt (default: chat.system, else the template's own; pinned with BOS "
                   "on a chat-layout model, never evicted)")
    s.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    s.set_defaults(fn=cmd_chat)

    s = sub.add_parser("eval", help="perplexity, generation metrics and a recall probe (or score existing predictions)")
    s.add_argument("--model", help="exported model folder (or smollm2 / tiny)")
    s.add_argument("--data", nargs="+", help="dialogue files")
    s.add_argument("--cache", choices=CACHE_POLICIES,
                   help="cache policy for generation (default: chat.cache if set, else the model's convsink.json)")
    s.add_argument("--mask", default=DIALOGUE, choices=DIALOGUE_ROW_MASKS, help="mask for perplexity")
    s.add_argument("--limit", type=int, default=20, help="dialogues to evaluate (first N of the files)")
    s.add_argument("--max-tokens", type=int, default=2048, help="truncate dialogues to this many tokens for perplexity")
    s.add_argument("--recall-after", type=int, default=10, help="recall probe: turns before asking for the first utterance")
    s.add_argument("--batch-size", type=int, default=8, help="conversations decoded together")
    s.add_argument("--predictions", help="JSON list of generated strings to score (no model needed)")
    s.add_argument("--references", nargs="+", help="dialogue files whose last utterances are the references")
    s.add_argument("--config", help="YAML recipe (its chat: section is used)")
    s.add_argument("--out", required=True, help="JSON output (a Markdown table is written next to it)")
    s.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("tokenizer", help="train a small byte-level BPE tokenizer on dialogue files (for models trained from scratch)")
    s.add_argument("inputs", nargs="+", help="dialogue files (any input format)")
    s.add_argument("--out", required=True, help="output tokenizer folder (then data.tokenizer=FOLDER)")
    s.add_argument("--vocab-size", type=int, default=2048, help="vocabulary size, <bos> <eos> <pad> included")
    s.add_argument("--format", default="auto", choices=["auto", *INPUT_FORMATS], help="input format")
    s.set_defaults(fn=cmd_tokenizer)

    s = sub.add_parser("run", help="prep → train → export → one chat reply, from one recipe")
    s.add_argument("config", help="YAML recipe, e.g. configs/quickstart.yaml")
    s.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    s.set_defaults(fn=cmd_run)

    _bench_parser(sub)
    return p


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def _close_progress_bars() -> None:
    """End any live progress bar so the error starts on its own line."""
    try:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", [])):
            bar.close()
    except Exception:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    for item in extra:  # overrides (and, for prep, inputs) may follow options
        if OVERRIDE.match(item) and hasattr(args, "overrides"):
            args.overrides.append(item)
        elif args.command == "prep" and not item.startswith("-"):
            args.inputs.append(item)
        else:
            parser.error(f"unrecognized argument: {item}")
    try:
        return args.fn(args)
    except USER_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _close_progress_bars()
        print(f"convsink {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from pipeline.training.launch import TrainingFailed

        if not isinstance(e, TrainingFailed):
            raise
        print(f"convsink {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"convsink {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
