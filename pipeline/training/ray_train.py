"""Training on Ray Train: the same per-rank DeepSpeed loop (``pipeline.training.loop.train``) run by a ``TorchTrainer``,
with Ray's checkpoints and restarts on top.

* every rank reports, after each complete save, the files of ``OUT/checkpoints/stepNNNNNN`` it wrote itself (its
  ``zero_pp_rank_<r>_*`` shards; rank 0 also the rank-less files), so the Ray checkpoint is the union of all ranks';
* a worker group that starts with a Ray checkpoint (a restart after a failure, or ``--resume`` of a Ray run) puts it
  back as ``OUT/checkpoints/<tag>`` + ``latest`` (unless OUT already holds that checkpoint or a newer complete one)
  and resumes from it; the data order is a function of the step, so the restarted run equals an uninterrupted one;
* after the fit, ``OUT/checkpoints`` holds the final checkpoint (copied back from Ray's storage if it differs), so
  ``convsink export OUT`` works as after ``convsink train``.

OUT must be one folder that every worker sees (as for ``convsink train``: rank 0 renames the checkpoint that all
ranks wrote). Ray's storage defaults to ``OUT/ray``. Files written next to the run's own:

    OUT/ray_run.json          Ray run name + storage path (``--resume`` reuses them: Ray resumes that run)
    OUT/ray_checkpoints.json  the checkpoints Ray has committed so far (rank 0 rewrites it after each report)
    OUT/ray_restores.jsonl    one line per worker-group start that resumed from a checkpoint
    OUT/pids/rank<r>          process id of rank r's worker in the current attempt
    OUT/ray_result.json       what ``ray_train`` returned
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

from data_prep.paths import write_text_atomic
from data_prep.ray_cluster import ensure_ray
from pipeline.config import RunConfig
from pipeline.training import checkpoint
from pipeline.training.launch import TrainingFailed, prepare_run_dir
from pipeline.training.run_lock import releases_run_lock

_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")
STATE_FILE = "convsink_state.json"


# --- driver ------------------------------------------------------------------------------------------------



def cpu_share(total_cpus: float, num_workers: int) -> float:
    """CPUs requested per training worker: all workers plus one spare CPU's worth fit in the cluster (2 workers
    on 2 CPUs get 0.66 each). Ray accepts fractions below 1 only, so larger shares are whole numbers."""
    share = total_cpus / (num_workers + 1)
    return float(int(share)) if share >= 1 else max(0.01, int(share * 100) / 100)


@releases_run_lock
def ray_train(cfg: RunConfig, data_dir: str, out_dir: str, resume: bool = False, num_workers: int | None = None,
              storage_path: str | None = None, max_failures: int = 2, cpus_per_worker: float | None = None) -> dict:
    """Validate and prepare OUT (as ``convsink train`` does), run the training on Ray Train and return
    ``{"checkpoint", "ray_checkpoint", "ray_run_dir", "metrics", "wandb_dir", "restores"}``.

    ``max_failures``: worker-group restarts allowed (each resumes from the newest checkpoint).
    ``cpus_per_worker``: Ray CPUs each worker asks for (default ``cpu_share`` of the cluster's CPUs)."""
    data_dir, out_dir = os.path.abspath(data_dir), os.path.abspath(out_dir)
    n = num_workers or cfg.train.nproc * cfg.train.nnodes
    if n % cfg.train.sequence_parallel_size:
        raise ValueError(f"{n} workers are not divisible by train.sequence_parallel_size={cfg.train.sequence_parallel_size}")
    cfg_path = prepare_run_dir(cfg, data_dir, out_dir, resume, world_size=n)  # user errors stop here, before Ray starts
    ray = ensure_ray(temp_tag="ct", dashboard=True)
    import torch
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    for name in ("result.json", "ray_result.json"):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    shutil.rmtree(os.path.join(out_dir, "pids"), ignore_errors=True)
    if not resume:
        for name in ("ray_restores.jsonl", "ray_checkpoints.json"):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    name, storage_path = _run_identity(out_dir, resume, storage_path)

    resources = ray.cluster_resources()
    use_gpu = resources.get("GPU", 0) >= 1 or torch.cuda.is_available()
    cpu = cpus_per_worker or cpu_share(resources.get("CPU", 1.0), n)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # propagated to the controller; reports wait on it

    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config_path": cfg_path, "data_dir": data_dir, "out_dir": out_dir, "resume": resume},
        scaling_config=ScalingConfig(num_workers=n, use_gpu=use_gpu, resources_per_worker={"CPU": cpu}),
        run_config=RayRunConfig(name=name, storage_path=storage_path,
                                failure_config=FailureConfig(max_failures=max_failures),
                                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_last)),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # ray.train.TrainingFailedError (workers failed more than max_failures times)
        raise TrainingFailed(f"Ray Train run {name} failed: {(str(e).strip() or type(e).__name__)[:800]}") from e
    if result.checkpoint is None:
        raise TrainingFailed(f"Ray Train run {name} finished without a checkpoint")
    shutil.rmtree(os.path.join(out_dir, ".ray-staging"), ignore_errors=True)
    final = restore_checkpoint(result.checkpoint, out_dir)  # OUT/checkpoints holds the final checkpoint
    rank0 = _read_json(os.path.join(out_dir, "result.json")) or {}
    out = {"checkpoint": os.path.join(checkpoint.checkpoint_root(out_dir), final["tag"]),
           "ray_checkpoint": result.checkpoint.path, "ray_run_dir": result.path,
           "metrics": result.metrics, "wandb_dir": rank0.get("wandb_dir"), "restores": read_restores(out_dir)}
    _write_json(os.path.join(out_dir, "ray_result.json"), out)
    return out


def _run_identity(out_dir: str, resume: bool, storage_path: str | None) -> tuple[str, str]:
    """The Ray run's name and storage path: reused from OUT/ray_run.json on resume (Ray then resumes that run
    and hands its newest checkpoint to the workers), fresh otherwise (a reused name would resume silently)."""
    path = os.path.join(out_dir, "ray_run.json")
    prev = _read_json(path) if resume else None
    storage_path = os.path.abspath(storage_path) if storage_path and "://" not in storage_path else storage_path
    if prev and (storage_path is None or storage_path == prev["storage_path"]):
        return prev["name"], prev["storage_path"]
    name = f"{os.path.basename(out_dir)}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    ident = {"name": name, "storage_path": storage_path or os.path.join(out_dir, "ray")}
    _write_json(path, ident)
    return ident["name"], ident["storage_path"]


# --- worker ------------------------------------------------------------------------------------------------

def _worker_loop(config: dict) -> None:
    """One Ray Train worker: restore the run's Ray checkpoint if there is one, then ``pipeline.training.loop.train``."""
    import deepspeed  # here, not on the driver
    import ray.train
    import torch
    import torch.distributed as dist

    from pipeline.training.loop import skip_shm_comm_build, train

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    out_dir = config["out_dir"]
    os.environ["LOCAL_RANK"] = str(ctx.get_local_rank())
    # Ray Train already set up torch.distributed; DeepSpeed's own comm layer must wrap that group, or DeepSpeed
    # sees a world of 1 (train() only initializes DeepSpeed's layer when torch.distributed is not initialized)
    skip_shm_comm_build(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    _write_pid(out_dir, rank)
    with open(config["config_path"]) as f:
        cfg = RunConfig.model_validate(json.load(f))

    resume = config["resume"]
    ckpt = ray.train.get_checkpoint()
    if rank == 0:
        if ckpt is not None:
            record = restore_checkpoint(ckpt, out_dir)
            with open(os.path.join(out_dir, "ray_restores.jsonl"), "a") as f:
                f.write(json.dumps(dict(record, pid=os.getpid(), time=time.time())) + "\n")
        elif not resume:
            _drop_local_checkpoints(out_dir)  # a failed attempt of this fresh run saved but never reported
    dist.barrier()
    resume = resume or ckpt is not None

    def on_checkpoint(tag_dir: str, step: int, metrics: dict) -> None:
        staged = _stage_own_files(tag_dir, os.path.join(out_dir, ".ray-staging", f"rank{rank}-{os.path.basename(tag_dir)}"), rank)
        try:
            ray.train.report({"step": step, **{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}},
                             checkpoint=ray.train.Checkpoint.from_directory(staged),
                             checkpoint_dir_name=os.path.basename(tag_dir))
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        if rank == 0:
            _record_committed(out_dir)

    train(cfg, config["data_dir"], out_dir, resume=resume, on_checkpoint=on_checkpoint)


def _stage_own_files(tag_dir: str, dst: str, rank: int) -> str:
    """``dst``: hard links (copies where links fail) to the files of ``tag_dir`` that ``rank`` owns: its
    ``zero_pp_rank_<rank>_*`` shards, and for rank 0 every file that names no rank."""
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    for root, _, files in os.walk(tag_dir):
        for name in files:
            m = _RANK_FILE.search(name)
            if (int(m.group(1)) if m else 0) != rank:
                continue
            src = os.path.join(root, name)
            target = os.path.join(dst, os.path.relpath(src, tag_dir))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                os.link(src, target)
            except OSError:
                shutil.copy2(src, target)
    return dst


def _record_committed(out_dir: str) -> None:
    """Rank 0: wait until Ray has committed the checkpoint just reported, then list Ray's checkpoints in OUT."""
    import ray.train

    try:
        reported = ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED,
                                                          timeout_s=120)
    except Exception as e:  # informational only: training goes on
        print(f"ray_train: could not list Ray's checkpoints: {e}")
        return
    rows = [{"path": r.checkpoint.path, "step": (r.metrics or {}).get("step")} for r in reported]
    _write_json(os.path.join(out_dir, "ray_checkpoints.json"), rows)


def _write_pid(out_dir: str, rank: int) -> None:
    d = os.path.join(out_dir, "pids")
    os.makedirs(d, exist_ok=True)
    write_text_atomic(os.path.join(d, f"rank{rank}"), str(os.getpid()))


# --- checkpoints -------------------------------------------------------------------------------------------

def restore_checkpoint(ckpt, out_dir: str) -> dict:
    """Make ``OUT/checkpoints`` resume from the Ray checkpoint ``ckpt``: copy it to ``OUT/checkpoints/<tag>``
    and point ``latest`` at it, dropping anything newer a failed attempt left. Skipped (nothing copied) when OUT
    already holds that checkpoint (same files and sizes) or a newer complete one. Returns what was done."""
    import pyarrow.fs as pafs

    fs, base = ckpt.filesystem, ckpt.path.rstrip("/")
    with fs.open_input_stream(f"{base}/{STATE_FILE}") as f:
        step = int(json.loads(f.read().decode())["step"])
    tag = checkpoint.tag_for(step)
    root = checkpoint.checkpoint_root(out_dir)
    record = {"tag": tag, "step": step, "source": ckpt.path}
    local = checkpoint.latest_tag(root)
    local_step = checkpoint.read_state(root, local)["step"] if local else -1
    if local_step > step:
        return dict(record, action="kept newer local checkpoint", local_tag=local)
    remote = {os.path.relpath(i.path, base): i.size
              for i in fs.get_file_info(pafs.FileSelector(base, recursive=True)) if i.type == pafs.FileType.File}
    if local == tag and _listing(os.path.join(root, tag)) == remote:
        return dict(record, action="already local")
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".restore-{tag}")
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt.to_directory(tmp)
    if _listing(tmp) != remote:
        raise RuntimeError(f"{ckpt.path}: copy to {tmp} is incomplete")
    shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
    os.rename(tmp, os.path.join(root, tag))
    for name in os.listdir(root):  # what a failed attempt wrote after this checkpoint
        m = re.match(r"^step(\d{6,})$", name)
        if name.startswith(".tmp-") or (m and int(m.group(1)) > step):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    write_text_atomic(os.path.join(root, checkpoint.LATEST), tag)
    return dict(record, action="copied from Ray storage")


def _drop_local_checkpoints(out_dir: str) -> None:
    root = checkpoint.checkpoint_root(out_dir)
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if re.match(r"^step\d{6,}$", name) or name.startswith(".tmp-") or name == checkpoint.LATEST:
            path = os.path.join(root, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def _listing(folder: str) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, folder)] = os.path.getsize(p)
    return out


def read_restores(out_dir: str) -> list[dict]:
    path = os.path.join(out_dir, "ray_restores.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))

