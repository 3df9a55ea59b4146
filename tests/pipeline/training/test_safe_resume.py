"""Resume never unpickles code: every DeepSpeed checkpoint file is opened with ``weights_only=True`` and one
allow-list (issue 13 item 2). A file whose pickle would create a marker file is refused with one line naming the
file and the global, by `convsink train --resume` before any rank starts and by each rank itself; the marker never
appears. Genuine files load exactly as DeepSpeed's own reader loads them. The slow tests share one real 2-rank
ZeRO-3 run stopped at step 2; that a genuine resume reproduces an uninterrupted run's losses is
tests/pipeline/training/test_loop.py::test_resume_reproduces_uninterrupted_losses."""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from pipeline.config import load_config
from pipeline.training.launch import launch_training
from tests.pipeline.test_cli import convsink, one_line_error
from tests.pipeline.training.test_launch import RUN, _recipe
from tests.repo import REPO

FORBIDDEN = f"{os.system.__module__}.system"  # 'posix.system' on Linux


class MarkerPayload:
    """Pickles as a call of ``os.system('touch MARKER')``: unpickling it runs code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def write_tampered(path: str, marker: str) -> None:
    """Replace a checkpoint file with a torch.save file whose pickle would create ``marker``."""
    torch.save({"optimizer_state_dict": MarkerPayload(marker), "module": {"w": torch.zeros(2)}}, path)


def test_the_payload_is_live(tmp_path):
    """Control: an unsafe load of the tampered file does create the marker (so its absence below means something)."""
    path, marker = str(tmp_path / "f.pt"), str(tmp_path / "pwned")
    write_tampered(path, marker)
    torch.load(path, weights_only=False)
    assert os.path.exists(marker)


def test_safe_load_refuses_a_pickle_that_would_run_code(tmp_path):
    from pipeline.training.safe_checkpoint import UnsafeCheckpointError, safe_load

    path, marker = str(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"), str(tmp_path / "pwned")
    write_tampered(path, marker)
    with pytest.raises(UnsafeCheckpointError) as e:
        safe_load(path)
    msg = str(e.value)
    assert msg == f"{path}: refused to unpickle '{FORBIDDEN}' (checkpoints are loaded with weights_only=True)", msg
    assert isinstance(e.value, ValueError)  # the CLI's user-error path: one line, exit 2
    assert not os.path.exists(marker)


def test_safe_load_reads_a_file_holding_the_allowed_deepspeed_types(tmp_path):
    """ZeRO-3 optimizer files hold the stage enum and a loss scaler (fp16: the dynamic one), ZeRO-1/2 files the
    parameter slice addresses (fp32 and bf16 ZeRO-0..3 checkpoints were each checked to load through the engine)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from pipeline.training.safe_checkpoint import safe_load

    path = str(tmp_path / "ok.pt")
    saved = {"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0),
             "dynamic": DynamicLossScaler(init_scale=2.0 ** 16, scale_window=500, min_scale=1, delayed_shift=2,
                                      consecutive_hysteresis=False),
             "param_slice_mappings": [{"w": fragment_address(numel=3, start=5)}], "flat": [torch.arange(5.0)]}
    torch.save(saved, path)
    loaded = safe_load(path)
    assert loaded["zero_stage"] is ZeroStageEnum.weights
    assert _same(loaded, saved)


def test_the_checkpoint_engine_loads_safely_and_leaves_saving_to_deepspeeds_engine(tmp_path):
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    from pipeline.training.safe_checkpoint import SafeLoadingCheckpointEngine, UnsafeCheckpointError

    engine = SafeLoadingCheckpointEngine(TorchCheckpointEngine())
    good = str(tmp_path / "good.pt")
    engine.save({"t": torch.ones(3), "step": 4}, good)
    loaded = engine.load(good, map_location=lambda storage, loc: storage)  # DeepSpeed's SDLoader passes a callable
    assert loaded["step"] == 4 and torch.equal(loaded["t"], torch.ones(3))
    bad, marker = str(tmp_path / "bad.pt"), str(tmp_path / "pwned")
    write_tampered(bad, marker)
    with pytest.raises(UnsafeCheckpointError, match="refused to unpickle"):
        engine.load(bad, map_location="cpu")
    assert not os.path.exists(marker)


def test_deepspeeds_model_state_reader_goes_through_the_safe_engine(tmp_path):
    """DeepSpeed's SDLoader (how ``load_checkpoint`` reads ``*model_states.pt``) with the engine ``use_safe_loading``
    installs: a tampered model-states file is refused."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.state_dict_factory import SDLoaderFactory

    from pipeline.training.safe_checkpoint import SafeLoadingCheckpointEngine, UnsafeCheckpointError

    path, marker = str(tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt"), str(tmp_path / "pwned")
    write_tampered(path, marker)
    with pytest.raises(UnsafeCheckpointError, match="model_states.pt: refused to unpickle"):  # its first read
        SDLoaderFactory.get_sd_loader([path], checkpoint_engine=SafeLoadingCheckpointEngine(TorchCheckpointEngine()))
    assert not os.path.exists(marker)


def test_use_safe_loading_wraps_the_engines_checkpoint_engine_once_and_refuses_universal_loads():
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    from pipeline.training.safe_checkpoint import SafeLoadingCheckpointEngine, UnsafeCheckpointError, use_safe_loading

    inner = TorchCheckpointEngine()
    engine = SimpleNamespace(checkpoint_engine=inner, load_universal_checkpoint=lambda: False)
    use_safe_loading(engine)
    use_safe_loading(engine)  # idempotent: not wrapped twice
    assert isinstance(engine.checkpoint_engine, SafeLoadingCheckpointEngine) and engine.checkpoint_engine.inner is inner
    universal = SimpleNamespace(checkpoint_engine=inner, load_universal_checkpoint=lambda: True)
    with pytest.raises(UnsafeCheckpointError, match="checkpoint.load_universal=true is not supported"):
        use_safe_loading(universal)
    assert universal.checkpoint_engine is inner


def test_the_preflight_scan_names_the_tampered_file_of_a_checkpoint_folder(tmp_path):
    from pipeline.training.safe_checkpoint import UnsafeCheckpointError, refuse_unsafe_files

    tag = tmp_path / "step000002"
    tag.mkdir()
    torch.save({"t": torch.ones(1)}, tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    refuse_unsafe_files(str(tag))  # genuine: no error
    bad, marker = str(tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"), str(tmp_path / "pwned")
    write_tampered(bad, marker)
    with pytest.raises(UnsafeCheckpointError) as e:
        refuse_unsafe_files(str(tag))
    assert str(e.value).startswith(f"{bad}: refused to unpickle '{FORBIDDEN}'"), str(e.value)
    assert not os.path.exists(marker)


def test_the_preflight_scan_decides_legacy_format_files_by_a_weights_only_load(tmp_path):
    """DeepSpeed writes torch's legacy (non-zip) format with ``checkpoint_serialization: false``; torch's static scan
    cannot read it, so the scan loads it with ``weights_only=True`` instead: genuine passes, tampered is refused."""
    from pipeline.training.safe_checkpoint import UnsafeCheckpointError, refuse_unsafe_files

    torch.save({"t": torch.ones(2)}, tmp_path / "mp_rank_00_model_states.pt", _use_new_zipfile_serialization=False)
    refuse_unsafe_files(str(tmp_path))
    bad, marker = str(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"), str(tmp_path / "pwned")
    torch.save({"optimizer_state_dict": MarkerPayload(marker)}, bad, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError) as e:
        refuse_unsafe_files(str(tmp_path))
    assert str(e.value) == f"{bad}: refused to unpickle '{FORBIDDEN}' (checkpoints are loaded with weights_only=True)"
    assert not os.path.exists(marker)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 5")
def test_a_refusal_without_a_named_global_is_still_one_line(tmp_path):
    """A pickle refused for another reason (here an opcode the weights-only unpickler does not take)."""
    import pickle

    from pipeline.training.safe_checkpoint import UnsafeCheckpointError, safe_load

    path = tmp_path / "odd.pt"
    path.write_bytes(pickle.dumps(bytearray(b"x"), protocol=5))
    with pytest.raises(UnsafeCheckpointError) as e:
        safe_load(str(path))
    msg = str(e.value)
    assert "\n" not in msg and "WeightsUnpickler" not in msg, msg
    assert msg.startswith(f"{path}: refused to unpickle it ("), msg
    assert msg.endswith(") (checkpoints are loaded with weights_only=True)"), msg


# --- a real 2-rank ZeRO-3 checkpoint ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, shards):
    """A 2-rank ZeRO-3 run of 4 steps stopped after its step-2 checkpoint."""
    tmp = tmp_path_factory.mktemp("safe")
    out = str(tmp / "run")
    launch_training(load_config(_recipe(tmp), RUN + ["train.stop_at_step=2"]), shards, out)
    return out


def _copy(run: str, dst) -> str:
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns(".lock"))
    return str(dst)


def _tag_file(out: str, pattern: str) -> str:
    (path,) = glob.glob(os.path.join(out, "checkpoints", "step000002", pattern))
    return path


def _same(a, b) -> bool:
    """Deep equality of what torch.load returns (tensors by value, DeepSpeed objects by their attributes)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dict__") and not isinstance(a, type):
        return type(a) is type(b) and _same(vars(a), vars(b))
    return a == b


@pytest.mark.slow
def test_every_file_of_a_genuine_checkpoint_loads_as_deepspeed_reads_it(saved_run):
    from pipeline.training.safe_checkpoint import refuse_unsafe_files, safe_load

    files = sorted(glob.glob(os.path.join(saved_run, "checkpoints", "step000002", "*.pt")))
    assert len(files) == 4, files  # model + optimizer states of each of the 2 ranks
    refuse_unsafe_files(os.path.dirname(files[0]))
    for path in files:
        assert _same(safe_load(path), torch.load(path, map_location="cpu", weights_only=False)), path


@pytest.mark.slow
def test_convsink_train_resume_refuses_a_tampered_checkpoint_in_one_line(saved_run, tmp_path):
    out = _copy(saved_run, tmp_path / "run")
    bad, marker = _tag_file(out, "*zero_pp_rank_1_*optim_states.pt"), str(tmp_path / "pwned")
    write_tampered(bad, marker)
    proc = convsink("train", "--config", _recipe(tmp_path), "--data", _data_of(out), "--out", out, "--resume", *RUN)
    assert not os.path.exists(marker), "the tampered checkpoint's pickle ran"
    line = one_line_error(proc)
    assert proc.returncode == 2
    assert line == f"convsink train: error: {bad}: refused to unpickle '{FORBIDDEN}' " \
                   "(checkpoints are loaded with weights_only=True)", line
    assert not glob.glob(os.path.join(out, "history-rank0-from2.json")), "ranks started on a refused checkpoint"


@pytest.mark.slow
def test_each_rank_refuses_a_tampered_optimizer_file_itself(saved_run, tmp_path):
    """Past the launcher's scan (a file swapped after it, or a Ray restore from storage): the ranks' own loads of the
    ZeRO optimizer states go through the safe engine. Both ranks' files are tampered: whichever rank reads first
    refuses (the launcher then stops the other), and neither pickle runs."""
    out = _copy(saved_run, tmp_path / "run")
    markers = [str(tmp_path / f"pwned-{r}") for r in (0, 1)]
    for r, marker in enumerate(markers):
        write_tampered(_tag_file(out, f"*zero_pp_rank_{r}_*optim_states.pt"), marker)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline.training.loop", "--config-json", os.path.join(out, "config.json"),
           "--data", _data_of(out), "--out", out, "--resume"]
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert [os.path.exists(m) for m in markers] == [False, False], proc.stderr[-3000:]
    assert proc.returncode != 0
    refused = [l for l in proc.stderr.splitlines() if "refused to unpickle" in l]
    assert refused, proc.stderr[-3000:]
    for line in refused:  # one line per refusing rank, naming its own file
        rank = int(line.split("(rank ", 1)[1].split(")", 1)[0])
        own = _tag_file(out, f"*zero_pp_rank_{rank}_*optim_states.pt")
        assert line == (f"convsink train (rank {rank}): error: {own}: "
                        f"refused to unpickle '{FORBIDDEN}' (checkpoints are loaded with weights_only=True)"), line
    assert "UnsafeCheckpointError" not in proc.stderr, "a rank printed a traceback, not its one line"
    assert not os.path.exists(os.path.join(out, "history-rank0-from2.json"))


def _data_of(out: str) -> str:
    import json

    return json.load(open(os.path.join(out, "data.json")))["data_dir"]
