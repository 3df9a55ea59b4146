"""The DeepSpeed training loop, run once per rank (by torchrun, the deepspeed launcher, or a Ray Train worker).

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m pipeline.training.loop \\
        --config-json OUT/config.json --data DATA --out OUT [--resume]

One optimizer step: read this rank's micro-batches, count the loss tokens of the whole global batch, then for
each micro-batch: sink-masked forward → per-task NLL sums → loss scaled so the gradient is the per-token mean
over the global batch → DeepSpeed backward/step. Checkpoints every ``save_every`` steps and at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist

from data_prep.tokenizer_loading import SpecialIds
from pipeline.attention.masks import MaskParams
from pipeline.attention.ulysses import SequenceParallel
from pipeline.config import RunConfig
from pipeline.contract import CAUSAL, EOU, TARGETS, TASKS
from pipeline.modeling.forward import attention_impl, enable_activation_checkpointing, row_kinds
from pipeline.modeling.tiled_mlp import enable_tiled_mlp
from pipeline.modeling.loader import build_model
from pipeline.training import checkpoint
from pipeline.training.flops import flops_per_token, mask_stats, non_embedding_params, peak_memory_gb, peak_tflops
from pipeline.training.heldout_eval import eval_batches, evaluate
from pipeline.training.preemption import StopRequest
from pipeline.training.resume_guard import run_identity
from pipeline.training.safe_checkpoint import UnsafeCheckpointError, use_safe_loading
from pipeline.training.shard_loader import load_shards, micro_batch
from pipeline.training.tiled_loss import batch_task_sums, batch_token_stats
from pipeline.training.tracking import init_wandb, progress

warnings.filterwarnings("ignore", message=r".*is deprecated. Please use.*", category=FutureWarning)


def deepspeed_config(cfg: RunConfig, world_size: int, bf16: bool) -> dict:
    """The DeepSpeed config: ``train.ds_config`` with 'auto' values filled, or one built from the recipe."""
    t = cfg.train
    filled = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
    }
    if t.ds_config:
        with open(t.ds_config) as f:
            ds = json.load(f)
        for k, v in filled.items():
            if ds.get(k, "auto") == "auto":
                ds[k] = v
        ds.setdefault("bf16", {})["enabled"] = bf16
        return ds
    zero = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=False)
        if t.offload:
            zero.update(offload_param={"device": "cpu", "pin_memory": True}, offload_optimizer={"device": "cpu", "pin_memory": True})
    return dict(filled, zero_optimization=zero, bf16={"enabled": bf16}, zero_allow_untested_optimizer=True,
                steps_per_print=1 << 30, wall_clock_breakdown=False)


def lr_lambda(cfg: RunConfig):
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        progress_ = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))
    return f


def skip_shm_comm_build(device: torch.device) -> None:
    """On CPU, tell DeepSpeed its shared-memory comm op is unavailable: else its first launch JIT-builds it for
    minutes. Call before ``deepspeed.init_distributed``."""
    import deepspeed

    if device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _init_distributed(device: torch.device) -> None:
    import deepspeed

    skip_shm_comm_build(device)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


def train(cfg: RunConfig, data_dir: str, out_dir: str, resume: bool = False, on_checkpoint=None) -> dict:
    """Train on this rank; returns the result with the engine (rank 0 also writes OUT/result.json).

    ``on_checkpoint(tag_dir, step, metrics)`` is called on every rank after each complete save (Ray Train reports
    the folder from every rank, so all ranks' ZeRO shards reach the run's checkpoint)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _init_distributed(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    t = cfg.train
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    torch.manual_seed(t.seed)

    from data_prep.shards import read_manifest
    manifest = read_manifest(data_dir)
    ids = SpecialIds(**{k: manifest["tokenizer"][f"{k}_id"] for k in ("bos", EOU, "pad")})
    ds_config = deepspeed_config(cfg, world, bf16)
    keep = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None  # noqa: F841 (zero.Init)
    model = build_model(cfg.model, manifest["tokenizer"]["vocab_size"], ids, path=t.init_from)
    if t.activation_checkpointing:
        enable_activation_checkpointing(model)
    if t.mlp_chunk:
        enable_tiled_mlp(model, t.mlp_chunk)
    trainable = [p for p in model.parameters() if p.requires_grad]
    schedule = lr_lambda(cfg)
    if "offload_optimizer" in ds_config["zero_optimization"] or "optimizer" in ds_config:
        # ZeRO-Offload needs DeepSpeed's own (JIT-built) optimizer: declared in the DeepSpeed config
        ds_config.setdefault("optimizer", {"type": "AdamW", "params": {"lr": t.lr, "betas": [0.9, 0.95], "weight_decay": t.weight_decay}})
        optimizer = None
    else:  # torch's AdamW as the client optimizer: no JIT build (measured: config optimizers take 68-84 s on CPU)
        optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.95))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    n_params = non_embedding_params(engine.module)
    peak = peak_tflops(t.peak_tflops, device)

    root = checkpoint.checkpoint_root(out_dir)
    start = 0
    if resume:
        tag = checkpoint.latest_tag(root)
        if tag is None:
            raise ValueError(f"{out_dir}: no complete checkpoint to resume from")
        use_safe_loading(engine)  # every file is read with weights_only=True (safe_checkpoint)
        engine.load_checkpoint(root, tag=tag)
        start = checkpoint.read_state(root, tag)["step"]

    data = load_shards(data_dir, t.stage)
    impl = attention_impl(cfg.model, device)
    sp = SequenceParallel.create(t.sequence_parallel_size)  # head counts checked before launch
    dp_rank, dp_size = rank // sp.size, world // sp.size
    run = init_wandb(cfg, out_dir, rank, resume)
    eval_set = (eval_batches(load_shards(t.eval_data, t.stage), t.eval_rows, t.micro_batch_size, dp_rank, dp_size)
                if t.eval_every else None)
    bar = progress(t.max_steps, start, enabled=rank == 0)
    history = []
    if rank == 0:  # one writer per run folder: any .tmp-* in it is what an interrupted save left
        checkpoint.remove_partial_saves(root)
    last = min(t.max_steps, t.stop_at_step or t.max_steps)
    stop, stopped_at = StopRequest.from_env(), None  # a Slurm --signal trap asks to save and stop (preemption.py)
    for step in range(start, last):
        t0 = time.time()
        micro = [micro_batch(data, step, m, micro_size=t.micro_batch_size, grad_accum=t.grad_accum,
                             dp_rank=dp_rank, dp_size=dp_size, seed=t.seed) for m in range(t.grad_accum)]
        n_tokens = torch.tensor(float(sum(int((sp.local(b)[TARGETS] != -100).sum()) for b in micro)))
        dist.all_reduce(n_tokens)  # loss tokens of the global batch
        lr = scheduler.get_last_lr()[0]
        task_nll: dict[str, list[float]] = {}
        for b in micro:
            b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
            sums = batch_task_sums(engine, b, cfg.model, impl, sp, t.loss_chunk)  # this rank's T / sp tokens
            loss = sum(s for s, _ in sums.values()) * (world * t.grad_accum / n_tokens.item())
            engine.backward(loss)
            engine.step()
            for task, (s, n) in sums.items():
                acc = task_nll.setdefault(task, [0.0, 0.0])
                acc[0] += float(s.detach())
                acc[1] += n
        metrics = _reduce_task_losses(task_nll)
        dt = time.time() - t0
        grad_norm = engine.get_global_grad_norm()
        metrics.update(lr=lr, grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                       step_time=dt, tokens_per_s=n_tokens.item() / dt,
                       samples_per_s=t.micro_batch_size * t.grad_accum * world / dt)
        if (step + 1) % t.log_every == 0:
            metrics.update(_throughput(micro, cfg, engine, n_params, dt, world, peak, device, sp.size))
        if eval_set is not None and ((step + 1) % t.eval_every == 0 or step + 1 == t.max_steps):
            engine.eval()
            metrics.update(evaluate(lambda b: batch_token_stats(engine, b, cfg.model, impl, sp, t.loss_chunk), eval_set, device))
            engine.train()
        history.append({"step": step + 1, **metrics})
        if run is not None and ((step + 1) % t.log_every == 0 or any(k.startswith("eval/") for k in metrics)):
            run.log(metrics, step=step + 1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.update(1)
        stopped_at = step + 1 if stop.poll() and step + 1 < last else None
        if (step + 1) % t.save_every == 0 or step + 1 == last or stopped_at:
            state = {"step": step + 1, **run_identity(cfg, manifest.get("fingerprint"), world),  # what a resume must keep
                     "samples_seen": (step + 1) * t.micro_batch_size * t.grad_accum * dp_size}  # the stream's position
            tag = checkpoint.save(engine, root, step + 1, state, t.keep_last)
            if on_checkpoint is not None:
                on_checkpoint(os.path.join(root, tag), step + 1, metrics)
        if stopped_at:
            break
    bar.close()
    result = {"checkpoint": os.path.join(root, checkpoint.latest_tag(root) or ""), "history": history, "engine": engine,
              "wandb_dir": run.dir.rsplit("/files", 1)[0] if run is not None else None, "stopped_at": stopped_at}
    if run is not None:
        run.finish()
    if rank == 0:
        with open(os.path.join(out_dir, f"history-rank0-from{start}.json"), "w") as f:
            json.dump(history, f, indent=1)
        if stopped_at:  # not finished: no result.json (the batch script requeues the job)
            print(f"stopped after step {stopped_at} on request ({stop.path}); checkpoint saved", flush=True)
        else:
            with open(os.path.join(out_dir, "result.json"), "w") as f:
                json.dump({k: v for k, v in result.items() if k not in ("history", "engine")}, f, indent=2)
    dist.barrier()
    return result


def _throughput(micro: list, cfg: RunConfig, engine, n_params: int, dt: float, world: int, peak, device, sp_size: int = 1) -> dict:
    """Mask density, model TFLOP/s (attention counted as computed under the mask), MFU, peak memory."""
    attended = causal = queries = 0.0
    for b in micro:
        kinds = row_kinds(b, cfg.model)
        a, q = mask_stats(b, kinds, cfg.model.mask.params())
        c, _ = mask_stats(b, [CAUSAL] * len(kinds), MaskParams())
        attended, causal, queries = attended + a, causal + c, queries + q
    buf = torch.tensor([attended, causal, queries], dtype=torch.float64)
    dist.all_reduce(buf)
    attended, causal, queries = (v / sp_size for v in buf.tolist())  # each SP rank counted the whole sample
    keys = attended / max(queries, 1.0)
    tflops = flops_per_token(engine.module.config, n_params, keys) * queries / dt / 1e12 / world  # per device
    out = {"mask_density": attended / max(causal, 1.0), "keys_per_query": keys, "tflops_per_device": tflops,
           "peak_memory_gb": peak_memory_gb(device)}
    if peak:
        out["mfu"] = tflops / peak
    return out


def _reduce_task_losses(task_nll: dict) -> dict:
    """All-reduce per-task (sum, count) so logged losses are exact global token means."""
    buf = torch.tensor([v for task in TASKS for v in task_nll.get(task, [0.0, 0.0])], dtype=torch.float64)
    dist.all_reduce(buf)
    out, tot_s, tot_n = {}, 0.0, 0.0
    for i, task in enumerate(TASKS):
        s, n = buf[2 * i].item(), buf[2 * i + 1].item()
        if n > 0:
            out[f"loss/{task}"] = s / n
            tot_s += s
            tot_n += n
    out["loss"] = tot_s / max(tot_n, 1.0)
    out["tokens"] = tot_n
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="one training rank (started by a launcher)")
    p.add_argument("--config-json", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = p.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    with open(args.config_json) as f:
        cfg = RunConfig.model_validate(json.load(f))
    try:
        train(cfg, args.data, args.out, resume=args.resume)
    except UnsafeCheckpointError as e:  # one line per rank, not a traceback; the launcher then fails the run
        print(f"convsink train (rank {os.environ.get('RANK', '?')}): error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
