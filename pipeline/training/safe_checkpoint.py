"""Open DeepSpeed checkpoint files without running their pickles: ``weights_only=True`` and one allow-list.

DeepSpeed's torch checkpoint engine calls ``torch.load(..., weights_only=False)``, so a tampered checkpoint (a run
folder, or a Ray restore from ``--storage-path``) would run code on every rank. Every read here allows tensors,
containers and the few DeepSpeed types a ZeRO checkpoint holds (``allowed_globals``), nothing else:

* ``safe_load(path)``: one file (export's ``zero3_consolidate`` reads with it too);
* ``use_safe_loading(engine)``: gives a DeepSpeed engine a ``CheckpointEngine`` whose ``load`` is ``safe_load``
  (every file ``engine.load_checkpoint`` reads under ZeRO-1/2/3: model states through DeepSpeed's SDLoader,
  ZeRO optimizer states through ``_get_all_zero_checkpoint_state_dicts``); saving stays with DeepSpeed's engine;
* ``refuse_unsafe_files(tag_dir)``: the launcher's scan of a checkpoint folder before any rank starts (it reads
  only each file's pickle, never its tensors).

A refusal is ``UnsafeCheckpointError`` (a ``ValueError``): one line naming the file and the forbidden global.
"""

from __future__ import annotations

import glob
import os
import pickle
import re

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

_WHY = "(checkpoints are loaded with weights_only=True)"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file whose pickle names a global outside the allow-list (or a load that would unpickle freely)."""


def allowed_globals() -> list:
    """The non-tensor types DeepSpeed ZeRO checkpoints hold: the ZeRO stage, the loss scalers and (ZeRO-1/2) the
    parameter slice addresses."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _refusal(path: str, error: Exception) -> UnsafeCheckpointError:
    """One line from torch's multi-paragraph weights-only error: the file and the global it names."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    if found:
        return UnsafeCheckpointError(f"{path}: refused to unpickle '{found.group(1)}' {_WHY}")
    detail = [line.strip() for line in str(error).splitlines()[1:]
              if line.strip() and not line.startswith("Check the documentation")]  # torch's reason is the last
    reason = detail[-1] if detail else type(error).__name__
    return UnsafeCheckpointError(f"{path}: refused to unpickle it ({reason}) {_WHY}")


def safe_load(path: str, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with ``allowed_globals``; refuses anything else in one line."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None


def refuse_unsafe_files(tag_dir: str) -> None:
    """Raise ``UnsafeCheckpointError`` for the first ``*.pt`` under ``tag_dir`` whose pickle names a global outside
    the allow-list (a static scan of each pickle; a file not in torch's zip format is checked by loading it)."""
    for path in sorted(glob.glob(os.path.join(tag_dir, "**", "*.pt"), recursive=True)):
        with torch.serialization.safe_globals(allowed_globals()):
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except ValueError:  # legacy (non-zip) format: no static scan, so a weights-only load decides
                safe_load(path)
                continue
            except (RuntimeError, pickle.UnpicklingError) as e:  # a truncated zip, a pickle the scanner cannot read
                raise ValueError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
        if unsafe:
            raise UnsafeCheckpointError(f"{path}: refused to unpickle '{sorted(unsafe)[0]}' {_WHY}")


class SafeLoadingCheckpointEngine(CheckpointEngine):
    """DeepSpeed's ``CheckpointEngine`` interface: loads through ``safe_load``, everything else by ``inner``."""

    def __init__(self, inner: CheckpointEngine):
        super().__init__()
        self.inner = inner
        self.name = f"SafeLoading({inner.name})"

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location=map_location)

    def create(self, info):
        return self.inner.create(info)

    def save(self, state_dict, path: str):
        return self.inner.save(state_dict, path)

    def makedirs(self, path, exist_ok=False):
        return self.inner.makedirs(path, exist_ok=exist_ok)

    def commit(self, info):
        return self.inner.commit(info)

    def is_data_parallel_writer(self, dp_rank):
        return self.inner.is_data_parallel_writer(dp_rank)

    def is_decoupled(self):
        return self.inner.is_decoupled()

    def set_commit_info(self, info):
        return self.inner.set_commit_info(info)

    def get_commit_info(self):
        return self.inner.get_commit_info()

    def cleanup(self):
        return self.inner.cleanup()

    def preserves_storage_sharing(self):
        return self.inner.preserves_storage_sharing()


def use_safe_loading(engine) -> None:
    """Make ``engine.load_checkpoint`` read every file with ``safe_load``. Universal checkpoints are refused: DeepSpeed
    reads their ``zero/`` files with its own ``torch.load(weights_only=False)``, past the checkpoint engine."""
    if engine.load_universal_checkpoint():
        raise UnsafeCheckpointError("train.ds_config: checkpoint.load_universal=true is not supported (DeepSpeed reads "
                                    "universal checkpoints with torch.load(weights_only=False))")
    if not isinstance(engine.checkpoint_engine, SafeLoadingCheckpointEngine):
        engine.checkpoint_engine = SafeLoadingCheckpointEngine(engine.checkpoint_engine)
