"""Atomic checkpoints: an interrupted save never becomes the resume point; rotation keeps the newest N."""

from __future__ import annotations

import os

import pytest
import torch.distributed as dist

from pipeline.training import checkpoint
from pipeline.training.launch import check_run_dir


class CrashingEngine:
    """Writes DeepSpeed-like files for a save and dies after ``files_before_crash`` of them (a killed job)."""

    def __init__(self, files_before_crash: int | None = None):
        self.files_before_crash = files_before_crash

    def save_checkpoint(self, root, tag, client_state, save_latest):
        assert save_latest is False
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        for i, name in enumerate(["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]):
            if self.files_before_crash is not None and i == self.files_before_crash:
                raise KeyboardInterrupt("killed between files")
            with open(os.path.join(root, tag, name), "wb") as f:
                f.write(b"x" * 16)


@pytest.fixture(scope="module", autouse=True)
def gloo_group(tmp_path_factory):
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_interrupted_save_leaves_previous_checkpoint_as_resume_point(tmp_path):
    root = checkpoint.checkpoint_root(str(tmp_path))
    checkpoint.save(CrashingEngine(), root, 10, {"step": 10}, keep_last=3)
    assert checkpoint.latest_tag(root) == "step000010"
    for crash_after in (0, 1):
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save(CrashingEngine(files_before_crash=crash_after), root, 15, {"step": 15}, keep_last=3)
        assert checkpoint.latest_tag(root) == "step000010"
        assert not os.path.exists(os.path.join(root, "step000015"))
        assert checkpoint.read_state(root, checkpoint.latest_tag(root))["step"] == 10
    check_run_dir(str(tmp_path), resume=True)  # resumable, from step 10
    # the next complete save replaces the leftover temporary folder and moves latest
    checkpoint.save(CrashingEngine(), root, 15, {"step": 15}, keep_last=3)
    assert checkpoint.latest_tag(root) == "step000015"
    assert not any(n.startswith(".tmp-") for n in os.listdir(root))


def test_latest_naming_an_incomplete_folder_is_not_a_resume_point(tmp_path):
    root = checkpoint.checkpoint_root(str(tmp_path))
    os.makedirs(os.path.join(root, "step000020"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step000020")
    assert checkpoint.latest_tag(root) is None
    with pytest.raises(ValueError, match="no complete checkpoint"):
        check_run_dir(str(tmp_path), resume=True)


def test_rotation_keeps_newest_n(tmp_path):
    root = checkpoint.checkpoint_root(str(tmp_path))
    for step in (5, 10, 15, 20):
        checkpoint.save(CrashingEngine(), root, step, {"step": step}, keep_last=2)
    assert sorted(n for n in os.listdir(root) if n.startswith("step")) == ["step000015", "step000020"]
    assert checkpoint.latest_tag(root) == "step000020"


@pytest.mark.parametrize("window", ["state_file", "rename", "latest"])
def test_a_save_killed_after_the_shards_keeps_the_previous_resume_point(tmp_path, monkeypatch, window):
    """The remaining windows of a save: killed while writing convsink_state.json, at the rename of the temporary
    folder, or after the rename but before ``latest`` is replaced. ``latest`` still names the previous checkpoint,
    which is complete, and the next save goes through."""
    root = checkpoint.checkpoint_root(str(tmp_path))
    checkpoint.save(CrashingEngine(), root, 10, {"step": 10}, keep_last=3)

    def killed(*a, **k):
        raise KeyboardInterrupt(f"killed at {window}")

    with monkeypatch.context() as m:
        if window == "state_file":
            m.setattr(checkpoint.json, "dump", killed)
        elif window == "rename":
            m.setattr(checkpoint.os, "rename", killed)
        else:
            m.setattr(checkpoint, "write_text_atomic", killed)
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save(CrashingEngine(), root, 15, {"step": 15}, keep_last=3)
    assert checkpoint.latest_tag(root) == "step000010"
    assert checkpoint.read_state(root, "step000010")["step"] == 10
    check_run_dir(str(tmp_path), resume=True)
    checkpoint.save(CrashingEngine(), root, 15, {"step": 15}, keep_last=3)
    assert checkpoint.latest_tag(root) == "step000015" and checkpoint.read_state(root, "step000015")["step"] == 15
