"""Start the per-rank training processes (torchrun or the deepspeed launcher) for ``convsink train``.

Everything a user can get wrong is checked here, before any process starts.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from data_prep.paths import folder_written_atomically, write_text_atomic
from data_prep.shards import read_manifest
from pipeline.config import RunConfig, dump_config
from pipeline.contract import MASK_KIND, MEMORY_STAGE, STAGE_KINDS
from pipeline.training import checkpoint, run_lock
from pipeline.training.launcher_process import LauncherProcess, LaunchTimedOut
from pipeline.training.resume_guard import check_resume


RANK_MODULE = "pipeline.training.loop"  # what every rank runs


class TrainingFailed(RuntimeError):
    """A rank exited non-zero (its traceback was printed above) or hung past ``train.launch_timeout_s``;
    ``log_tail`` holds the last lines the ranks printed."""

    def __init__(self, message: str, log_tail: str = ""):
        super().__init__(message)
        self.log_tail = log_tail


def check_run_dir(out_dir: str, resume: bool) -> None:
    root = checkpoint.checkpoint_root(out_dir)
    tag = checkpoint.latest_tag(root)
    if resume and tag is None:
        raise ValueError(f"{out_dir}: no complete checkpoint to resume from (no {root}/latest naming a finished save)")
    if resume:  # a file whose pickle names anything but tensors and DeepSpeed's few types stops here, in one line
        from pipeline.training.safe_checkpoint import refuse_unsafe_files

        refuse_unsafe_files(os.path.join(root, tag))
    if not resume and tag is not None:
        raise FileExistsError(f"{out_dir}: already holds checkpoint {tag}; pass --resume to continue it or choose a new --out")


def prepare_run_dir(cfg: RunConfig, data_dir: str, out_dir: str, resume: bool, world_size: int | None = None) -> str:
    """Check everything a user can get wrong, lock OUT for this process (``run_lock``: one writer per run folder),
    then write OUT/config.json (resolved recipe, no secrets), OUT/data.json (tokenizer ids, fingerprint) and
    OUT/tokenizer/, each replaced whole. A ``--resume`` must keep what its checkpoint recorded (``resume_guard``).
    ``world_size``: the ranks that will train (default ``train.nproc x train.nnodes``). Returns the config path."""
    manifest = read_manifest(data_dir)
    world = world_size or cfg.train.nproc * cfg.train.nnodes
    if not os.path.isdir(out_dir):  # no one holds it; a bad recipe or a --resume must not create it
        check_all(cfg, data_dir, manifest, out_dir, resume, world)
    with run_lock.holding(out_dir):  # an existing folder: a busy one is named before anything else about it
        notice = check_all(cfg, data_dir, manifest, out_dir, resume, world)  # (again: it may have changed meanwhile)
        cfg_path = os.path.join(out_dir, "config.json")
        write_text_atomic(cfg_path, json.dumps(dump_config(cfg), indent=2))
        write_text_atomic(os.path.join(out_dir, "data.json"), json.dumps(
            {"data_dir": os.path.abspath(data_dir), "fingerprint": manifest.get("fingerprint"),
             "seq_len": manifest["seq_len"], "tokenizer": manifest["tokenizer"]}, indent=2))
        with folder_written_atomically(os.path.join(out_dir, "tokenizer")) as tmp:
            shutil.copytree(os.path.join(data_dir, "tokenizer"), tmp, dirs_exist_ok=True)
    if notice:
        print(notice, flush=True)
    return cfg_path


def check_all(cfg: RunConfig, data_dir: str, manifest: dict, out_dir: str, resume: bool, world_size: int) -> str | None:
    """Every check of a launch, the run folder's first (a resume's mismatch is named before what it implies); returns
    the data-order notice of an allowed batch change of a resume."""
    check_run_dir(out_dir, resume)
    notice = check_resume(out_dir, cfg, manifest.get("fingerprint"), world_size, data_dir) if resume else None
    if manifest["seq_len"] > cfg.model.max_position_embeddings and cfg.model.path is None:
        raise ValueError(f"{data_dir}: shards have seq_len {manifest['seq_len']} > model.max_position_embeddings")
    check_stage_rows(data_dir, manifest, "", cfg.train.stage)
    check_sequence_parallel(cfg, manifest["seq_len"])
    if cfg.train.init_from and not os.path.isfile(os.path.join(cfg.train.init_from, "config.json")):
        raise FileNotFoundError(f"{cfg.train.init_from}: train.init_from is not a model folder (no config.json)")
    if cfg.train.eval_every:
        check_eval_data(cfg, manifest)
    if not os.path.isdir(os.path.join(data_dir, "tokenizer")):
        raise FileNotFoundError(f"{data_dir}: no tokenizer/ folder (re-run `convsink prep`)")
    return notice


def check_sequence_parallel(cfg: RunConfig, seq_len: int) -> None:
    """Ulysses needs seq_len and both head counts divisible by the SP size; for a model folder (model.path or
    train.init_from) ``check_sp_size`` runs here on its config.json (random-init models: in the recipe's validation)."""
    from pipeline.attention.ulysses import check_sp_size

    sp = cfg.train.sequence_parallel_size
    if sp == 1:
        return
    if seq_len % sp:
        raise ValueError(f"train.sequence_parallel_size={sp} does not divide the shards' seq_len={seq_len}")
    folder = cfg.train.init_from or cfg.model.path
    if folder is None:
        return
    from pipeline.modeling.loader import resolve_model_path

    with open(os.path.join(resolve_model_path(folder), "config.json")) as f:
        mc = json.load(f)
    heads = mc["num_attention_heads"]
    try:
        check_sp_size(heads, mc.get("num_key_value_heads") or heads, sp)
    except ValueError as e:
        raise ValueError(f"{folder}: train.{e}") from None


def check_stage_rows(data_dir: str, manifest: dict, what: str, stage: str) -> None:
    """The shards must hold rows of the stage's mask kinds (memory: smr/lmr; dialogue: dialogue)."""
    kinds = set(STAGE_KINDS[stage])
    have = {k for sh in manifest["shards"] for k in sh.get(MASK_KIND, [])}
    if not kinds & have:
        hint = " (prep with data.smr.samples / data.lmr.samples)" if stage == MEMORY_STAGE else ""
        raise ValueError(f"{data_dir}: {what}no {'/'.join(sorted(kinds))} rows for the {stage} stage "
                         f"(it holds: {', '.join(sorted(have)) or 'nothing'}){hint}")


def check_eval_data(cfg: RunConfig, manifest: dict) -> None:
    """train.eval_every needs train.eval_data: shards of the same tokenizer holding this stage's mask kinds."""
    t = cfg.train
    if not t.eval_data:
        raise ValueError("train.eval_every is set but train.eval_data is not (a shard folder from `convsink prep` of held-apart dialogues)")
    ev = read_manifest(t.eval_data)
    if ev["tokenizer"] != manifest["tokenizer"]:
        raise ValueError(f"{t.eval_data}: train.eval_data was tokenized differently from the training shards "
                         f"(tokenizer {ev['tokenizer']} vs {manifest['tokenizer']})")
    check_stage_rows(t.eval_data, ev, "train.eval_data: ", t.stage)
    if ev["seq_len"] > cfg.model.max_position_embeddings and cfg.model.path is None:
        raise ValueError(f"{t.eval_data}: shards have seq_len {ev['seq_len']} > model.max_position_embeddings")


@run_lock.releases_run_lock
def launch_training(cfg: RunConfig, data_dir: str, out_dir: str, resume: bool = False, *,
                    rank_module: str = RANK_MODULE) -> dict:
    """Validate, prepare OUT, run the launcher (killed with its ranks after ``train.launch_timeout_s``), and return
    OUT/result.json. ``rank_module``: what each rank runs (tests substitute a faulty one). ``train.launcher=ray``
    hands the run to ``ray_train`` (Ray Train workers; OUT/ray_result.json)."""
    if cfg.train.launcher == "ray":
        from pipeline.training.ray_train import ray_train

        return ray_train(cfg, data_dir, out_dir, resume=resume)
    cfg_path = prepare_run_dir(cfg, data_dir, out_dir, resume)
    result_path = os.path.join(out_dir, "result.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    rank_args = ["--config-json", cfg_path, "--data", data_dir, "--out", out_dir] + (["--resume"] if resume else [])
    n = cfg.train.nproc
    if cfg.train.launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n), "--master_port", str(_free_port()),
               "--module", rank_module] + rank_args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               "-m", rank_module] + rank_args
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    launcher = LauncherProcess(cmd, env)
    timeout = cfg.train.launch_timeout_s
    try:
        rc = launcher.run(timeout)
    except LaunchTimedOut:
        tail = launcher.tail()
        raise TrainingFailed(f"training stopped: ranks still running after train.launch_timeout_s={timeout} s (a hung "
                             f"rank?); launcher and ranks killed. Last lines the ranks printed:\n{tail}", tail) from None
    if rc != 0 or not os.path.isfile(result_path):
        raise TrainingFailed(f"training failed (launcher exit code {rc}); the rank logs above say why", launcher.tail())
    with open(result_path) as f:
        return json.load(f)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
