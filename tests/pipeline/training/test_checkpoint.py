"""Atomic, complete checkpoints (one rank, a fake engine): an interrupted save never becomes the resume point; a
folder missing a rank's ZeRO files is never one; rotation keeps the newest N and removes what unfinished saves
left. Real ZeRO-3 saves killed on 2 ranks: test_save_faults.py."""

from __future__ import annotations

import errno
import json
import os
import threading
import time

import pytest
import torch
import torch.distributed as dist

from pipeline.training import checkpoint
from pipeline.training.launch import check_run_dir
from pipeline.training.resume_guard import WORLD_SIZE


class CrashingEngine:
    """Writes DeepSpeed-like files of ``ranks`` for a save and dies after ``files_before_crash`` of them (a killed
    job), or fails with ``error`` (an OSError such as a full disk) at that file."""

    def __init__(self, files_before_crash: int | None = None, ranks=(0,), error: OSError | None = None):
        self.files_before_crash, self.ranks, self.error = files_before_crash, ranks, error

    def save_checkpoint(self, root, tag, client_state, save_latest):
        assert save_latest is False
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        names = [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in self.ranks for kind in ("model", "optim")]
        for i, name in enumerate(names):
            if self.files_before_crash is not None and i == self.files_before_crash:
                raise self.error or KeyboardInterrupt("killed between files")
            torch.save({"rank_file": torch.zeros(4)}, os.path.join(root, tag, name))


def state(step: int, world: int = 1) -> dict:
    return {"step": step, WORLD_SIZE: world}


@pytest.fixture(scope="module", autouse=True)
def gloo_group(tmp_path_factory):
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_interrupted_save_leaves_previous_checkpoint_as_resume_point(tmp_path):
    root = checkpoint.checkpoint_root(str(tmp_path))
    checkpoint.save(CrashingEngine(), root, 10, state(10), keep_last=3)
    assert checkpoint.latest_tag(root) == "step000010"
    for crash_after in (0, 1):
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save(CrashingEngine(files_before_crash=crash_after), root, 15, state(15), keep_last=3)
        assert checkpoint.latest_tag(root) == "step000010"
        assert not os.path.exists(os.path.join(root, "step000015"))
        assert checkpoint.read_state(root, checkpoint.latest_tag(root))["step"] == 10
    check_run_dir(str(tmp_path), resume=True)  # resumable, from step 10
    # the next complete save replaces the leftover temporary folder and moves latest
    checkpoint.save(CrashingEngine(), root, 15, state(15), keep_last=3)
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


def _folder(root: str, tag: str, ranks, recorded: dict) -> str:
    folder = os.path.join(root, tag)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, checkpoint.STATE_FILE), "w") as f:
        json.dump(recorded, f)
    for r in ranks:
        for kind in ("model", "optim"):
            open(os.path.join(folder, f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt"), "wb").close()
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(tag)
    return folder


def test_latest_needs_every_recorded_ranks_files(tmp_path):
    """The rank files are counted against the recorded world size (a folder not shared across nodes holds only
    one node's ranks)."""
    root = checkpoint.checkpoint_root(str(tmp_path))
    folder = _folder(root, "step000020", [0], state(20, world=2))
    assert checkpoint.latest_tag(root) is None
    assert checkpoint.incomplete_reason(folder) == ("holds ZeRO files of rank 0 of 2: rank 1 missing "
                                                    "(run folder not shared across nodes?)")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        check_run_dir(str(tmp_path), resume=True)
    _folder(root, "step000020", [1], state(20, world=2))  # rank 1's files arrive
    assert checkpoint.latest_tag(root) == "step000020"
    # a model-states file alone is not a rank's shards (DeepSpeed writes the optimizer states after it)
    folder = _folder(root, "step000030", [0, 1, 2], state(30, world=4))
    open(os.path.join(folder, "zero_pp_rank_3_mp_rank_00_model_states.pt"), "wb").close()
    assert checkpoint.latest_tag(root) is None
    assert checkpoint.incomplete_reason(folder).startswith("holds ZeRO files of ranks 0-2 of 4: rank 3 missing")
    # bf16 optimizer files carry a prefix
    open(os.path.join(folder, "bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt"), "wb").close()
    assert checkpoint.latest_tag(root) == "step000030"
    # no world size recorded (an older convsink): ranks 0..max must all be there
    _folder(root, "step000040", [0, 2], {"step": 40})
    assert checkpoint.latest_tag(root) is None
    assert "rank 1 missing" in checkpoint.incomplete_reason(os.path.join(root, "step000040"))


def test_save_refuses_a_folder_missing_a_rank(tmp_path, monkeypatch):
    """Rank 0 counts the rank files before the rename: a run folder that is not shared across nodes stops at the
    first save (after ``COMPLETE_WAIT_S``: a shared file system may list files late), one line naming the missing
    ranks, and nothing becomes the resume point."""
    monkeypatch.setattr(checkpoint, "COMPLETE_WAIT_S", 1.0)
    root = checkpoint.checkpoint_root(str(tmp_path))
    checkpoint.save(CrashingEngine(), root, 10, state(10), keep_last=3)
    with pytest.raises(ValueError) as e:
        checkpoint.save(CrashingEngine(ranks=(0,)), root, 15, state(15, world=2), keep_last=3)
    assert str(e.value) == (f"{root}/.tmp-step000015: holds ZeRO files of rank 0 of 2: rank 1 missing (run folder "
                            "not shared across nodes?); not made a checkpoint (the resume point stays step000010)")
    assert checkpoint.latest_tag(root) == "step000010" and not os.path.exists(os.path.join(root, "step000015"))


class LateRankEngine(CrashingEngine):
    """Writes rank 0's files; rank 1's appear ``delay`` seconds later (a shared file system listing them late)."""

    def __init__(self, delay: float):
        super().__init__(ranks=(0,))
        self.delay = delay

    def save_checkpoint(self, root, tag, client_state, save_latest):
        super().save_checkpoint(root, tag, client_state, save_latest)
        late = CrashingEngine(ranks=(1,))
        threading.Timer(self.delay, late.save_checkpoint, (root, tag, client_state, save_latest)).start()


def test_save_waits_for_rank_files_listed_late(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "COMPLETE_WAIT_S", 20.0)
    root = checkpoint.checkpoint_root(str(tmp_path))
    t0 = time.time()
    assert checkpoint.save(LateRankEngine(delay=1.0), root, 10, state(10, world=2), keep_last=3) == "step000010"
    assert 1.0 <= time.time() - t0 < 20.0
    assert checkpoint.latest_tag(root) == "step000010"
    assert checkpoint.shard_ranks(os.path.join(root, "step000010")) == [0, 1]


def test_a_failed_write_names_the_folder_and_keeps_the_resume_point(tmp_path):
    root = checkpoint.checkpoint_root(str(tmp_path))
    checkpoint.save(CrashingEngine(), root, 10, state(10), keep_last=3)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(RuntimeError) as e:
        checkpoint.save(CrashingEngine(files_before_crash=1, error=full), root, 15, state(15), keep_last=3)
    assert str(e.value).startswith(f"{root}/.tmp-step000015: rank 0's save failed (OSError: [Errno {errno.ENOSPC}] "
                                   "No space left on device; ")
    assert str(e.value).endswith(" MiB free there); the resume point stays step000010")
    assert checkpoint.latest_tag(root) == "step000010"


def test_leftovers_of_unfinished_saves_are_removed_at_start_and_by_rotation(tmp_path):
    root = checkpoint.checkpoint_root(str(tmp_path))
    checkpoint.save(CrashingEngine(), root, 10, state(10), keep_last=3)
    leftovers = [".tmp-step000012", ".tmp-step000007"]
    for name in leftovers:
        os.makedirs(os.path.join(root, name))
        open(os.path.join(root, name, "zero_pp_rank_0_mp_rank_00_model_states.pt"), "wb").close()
    open(os.path.join(root, "latest.tmp-4242"), "w").close()  # a killed write_text_atomic of latest
    assert sorted(checkpoint.remove_partial_saves(root)) == sorted(leftovers + ["latest.tmp-4242"])  # at start
    assert sorted(os.listdir(root)) == ["latest", "step000010"]
    for name in leftovers:  # and by rotation, in the next complete save
        os.makedirs(os.path.join(root, name))
    checkpoint.save(CrashingEngine(), root, 15, state(15), keep_last=3)
    assert sorted(os.listdir(root)) == ["latest", "step000010", "step000015"]


def test_rotation_keeps_newest_n(tmp_path):
    root = checkpoint.checkpoint_root(str(tmp_path))
    for step in (5, 10, 15, 20):
        checkpoint.save(CrashingEngine(), root, step, state(step), keep_last=2)
    assert sorted(n for n in os.listdir(root) if n.startswith("step")) == ["step000015", "step000020"]
    assert checkpoint.latest_tag(root) == "step000020"


@pytest.mark.parametrize("window", ["state_file", "rename", "latest"])
def test_a_save_killed_after_the_shards_keeps_the_previous_resume_point(tmp_path, monkeypatch, window):
    """The remaining windows of a save: killed while writing convsink_state.json, at the rename of the temporary
    folder, or after the rename but before ``latest`` is replaced. ``latest`` still names the previous checkpoint,
    which is complete, and the next save goes through."""
    root = checkpoint.checkpoint_root(str(tmp_path))
    checkpoint.save(CrashingEngine(), root, 10, state(10), keep_last=3)
    write = checkpoint.write_text_atomic

    def write_then_kill(path, text):  # state_file: the first write of a save; latest: the second
        if (window == "state_file") == path.endswith(checkpoint.STATE_FILE):
            raise KeyboardInterrupt(f"killed at {window}")
        write(path, text)

    def killed(*a, **k):
        raise KeyboardInterrupt(f"killed at {window}")

    with monkeypatch.context() as m:
        if window == "rename":
            m.setattr(checkpoint.os, "rename", killed)
        else:
            m.setattr(checkpoint, "write_text_atomic", write_then_kill)
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save(CrashingEngine(), root, 15, state(15), keep_last=3)
    assert checkpoint.latest_tag(root) == "step000010"
    assert checkpoint.read_state(root, "step000010")["step"] == 10
    check_run_dir(str(tmp_path), resume=True)
    checkpoint.save(CrashingEngine(), root, 15, state(15), keep_last=3)
    assert checkpoint.latest_tag(root) == "step000015" and checkpoint.read_state(root, "step000015")["step"] == 15
