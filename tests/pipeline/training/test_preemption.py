"""preemption.py: the stop file is seen (or ignored when none is set), and RESUME=auto resumes only a requeued job
whose run folder holds a complete checkpoint. (Save-and-stop in a real run: tests/slurm/test_slurm_requeue.py.)"""

from __future__ import annotations

import json

import pytest

from pipeline.training import checkpoint
from pipeline.training.preemption import STOP_FILE_ENV, StopRequest, resume_wanted
from pipeline.training.resume_guard import WORLD_SIZE


def complete_checkpoint(out, step=4):
    root = out / "checkpoints"
    tag = root / checkpoint.tag_for(step)
    tag.mkdir(parents=True)
    (tag / checkpoint.STATE_FILE).write_text(json.dumps({"step": step, WORLD_SIZE: 1}))
    (tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    (root / checkpoint.LATEST).write_text(checkpoint.tag_for(step))


def test_stop_file_from_the_environment(tmp_path, monkeypatch):
    stop_file = tmp_path / "stop"
    monkeypatch.setenv(STOP_FILE_ENV, str(stop_file))
    stop = StopRequest.from_env()
    assert stop.path == str(stop_file) and stop.poll() is False
    stop_file.touch()
    assert stop.poll() is True


def test_no_stop_file_never_stops(tmp_path, monkeypatch):
    monkeypatch.delenv(STOP_FILE_ENV, raising=False)
    assert StopRequest.from_env().path is None and StopRequest.from_env().poll() is False
    monkeypatch.setenv(STOP_FILE_ENV, "")
    assert StopRequest.from_env().poll() is False


def test_resume_auto_only_for_a_requeued_job_with_a_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    assert resume_wanted("auto", str(out), restart_count=1) is False  # requeued before its first save: start over
    complete_checkpoint(out)
    assert resume_wanted("auto", str(out), restart_count=0) is False  # a first submission never continues by itself
    assert resume_wanted("auto", str(out), restart_count=2) is True
    assert resume_wanted("1", str(out), restart_count=0) is True
    assert resume_wanted("0", str(out), restart_count=3) is False
    with pytest.raises(ValueError, match="RESUME='yes'"):
        resume_wanted("yes", str(out), restart_count=0)


def test_resume_auto_ignores_an_incomplete_checkpoint(tmp_path):
    out = tmp_path / "run"
    complete_checkpoint(out)
    (out / "checkpoints" / checkpoint.tag_for(4) / checkpoint.STATE_FILE).unlink()  # its save never finished
    assert resume_wanted("auto", str(out), restart_count=1) is False
