"""What a resume must keep. Every checkpoint records the run's identity (``run_identity``: data fingerprint, world
size, sequence-parallel size, micro-batch, grad-accum, seed, stage) in its ``convsink_state.json``; ``check_resume``
compares it with the launch about to start and stops a ``--resume`` that changed any of them, with one line naming
the field, before any process starts (``prepare_run_dir``, used by ``convsink train``, ``convsink run``, the Slurm
scripts and the Ray Train driver).

Why: the data order is a function of the step and the global batch ``G = micro_batch_size x grad_accum x
world_size / sequence_parallel_size`` (``training/shard_loader.py``: optimizer step s reads samples ``[s*G, (s+1)*G)``
of the stream seeded by ``train.seed`` over the stage's shards). Other data, seed or stage is another stream; another
world size cannot even load: ZeRO partitions the optimizer state per rank and DeepSpeed refuses a checkpoint of
another data-parallel size (start a new run from the export instead, ``train.init_from=EXPORT``).

The override: ``train.allow_batch_change=true`` (``--allow-batch-change``) lets ``micro_batch_size`` and ``grad_accum``
change, world size fixed (e.g. a smaller micro-batch to fit memory). Data-order rule: a run resumed at step s with the
new global batch ``G'`` reads, at step ``t >= s``, samples ``[t*G', (t+1)*G')``. So

* ``G' == G`` (micro-batch and grad-accum traded, e.g. 2 x 1 -> 1 x 2): exactly the samples of an uninterrupted run,
  split among ranks and micro-steps differently (the loss is the per-token mean over the global batch, so the update
  is the same up to float summation order);
* ``G' > G``: the stream continues at ``s*G'``; samples ``[s*G, s*G')`` are never read;
* ``G' < G``: the stream continues at ``s*G'``; samples ``[s*G', s*G)`` are read a second time.

The launch prints which of these applies.
"""

from __future__ import annotations

from pipeline.config import RunConfig
from pipeline.training import checkpoint

FINGERPRINT, WORLD_SIZE, SP_SIZE, MICRO_BATCH, GRAD_ACCUM, SEED, STAGE = (
    "fingerprint", "world_size", "sp_size", "micro_batch_size", "grad_accum", "seed", "stage")
BATCH_FIELDS = (MICRO_BATCH, GRAD_ACCUM)  # what train.allow_batch_change lets a resume change
FIELD_NAMES = {FINGERPRINT: "data fingerprint", WORLD_SIZE: "world size", SP_SIZE: "train.sequence_parallel_size",
          MICRO_BATCH: "train.micro_batch_size", GRAD_ACCUM: "train.grad_accum", SEED: "train.seed", STAGE: "train.stage"}
_HINTS = {
    WORLD_SIZE: " (train.nproc x train.nnodes, or --num-workers): DeepSpeed cannot load ZeRO's per-rank optimizer state "
                "at another world size; resume with the saved one, or start a new run with train.init_from=EXPORT",
    MICRO_BATCH: "; pass --allow-batch-change (train.allow_batch_change=true) to resume with another batch split "
                 "(data-order rule: pipeline/training/resume_guard.py)",
}
_HINTS[GRAD_ACCUM] = _HINTS[MICRO_BATCH]


def run_identity(cfg: RunConfig, fingerprint: str | None, world_size: int) -> dict:
    """The fields a checkpoint records and a resume must keep (``checkpoint.save``'s state carries them)."""
    t = cfg.train
    return {FINGERPRINT: fingerprint, WORLD_SIZE: world_size, SP_SIZE: t.sequence_parallel_size,
            MICRO_BATCH: t.micro_batch_size, GRAD_ACCUM: t.grad_accum, SEED: t.seed, STAGE: t.stage}


def global_batch(identity: dict) -> int:
    """Samples per optimizer step: micro-batch x grad-accum x data-parallel size."""
    return identity[MICRO_BATCH] * identity[GRAD_ACCUM] * (identity[WORLD_SIZE] // identity[SP_SIZE])


def check_resume(out_dir: str, cfg: RunConfig, fingerprint: str | None, world_size: int, data_dir: str) -> str | None:
    """Stop (``ValueError``, one line naming the field) a resume of ``out_dir``'s newest checkpoint that changes a
    recorded field; return the data-order notice of an allowed batch change (None when nothing changed)."""
    root = checkpoint.checkpoint_root(out_dir)
    tag = checkpoint.latest_tag(root)
    saved = checkpoint.read_state(root, tag)
    now = run_identity(cfg, fingerprint, world_size)
    allowed = BATCH_FIELDS if cfg.train.allow_batch_change else ()
    for name, value in now.items():
        if name not in saved:
            raise ValueError(f"{out_dir}: checkpoint {tag} records no {FIELD_NAMES[name]} (saved by an older convsink), so "
                             "this resume cannot be checked; start a new run (train.init_from=EXPORT keeps the weights)")
        if saved[name] != value and name not in allowed:
            hint = f" (--data {data_dir} holds other shards than the run trained on)" if name == FINGERPRINT else _HINTS.get(name, "")
            raise ValueError(f"{out_dir}: --resume with {FIELD_NAMES[name]} {value} but checkpoint {tag} was saved with "
                             f"{saved[name]}{hint}")
    if all(saved[n] == now[n] for n in BATCH_FIELDS):
        return None
    return data_order_notice(saved, now, saved["step"])


def data_order_notice(saved: dict, now: dict, step: int) -> str:
    """One line: the global batch before and after, and which samples the resumed run reads (module docstring)."""
    old, new = global_batch(saved), global_batch(now)
    head = (f"resume at step {step}: global batch {old} -> {new} samples (train.micro_batch_size {saved[MICRO_BATCH]} -> "
            f"{now[MICRO_BATCH]}, train.grad_accum {saved[GRAD_ACCUM]} -> {now[GRAD_ACCUM]}): ")
    if new == old:
        return head + "the next steps read exactly the samples of an uninterrupted run"
    at, was = step * new, step * old
    if new > old:
        return head + f"the stream continues at sample {at}, so samples {was}-{at - 1} are never read"
    return head + f"the stream continues at sample {at}, so samples {at}-{was - 1} are read a second time"
