"""The run folder before launch: resumes are consistent or refused, one writer at a time (OUT/.lock), and
config.json / data.json replaced atomically. The slow tests use one real 2-rank ZeRO-3 run (stopped at step 2
of 4) started by `convsink train` while a second `convsink train` into the same folder is refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pipeline.config import load_config
from pipeline.contract import DIALOGUE_STAGE, MEMORY_STAGE
from pipeline.training.launch import launch_training, prepare_run_dir
from tests.pipeline.test_cli import convsink, one_line_error
from tests.repo import REPO

RUN = ["data.seq_len=128", "model.max_position_embeddings=512", "model.hidden_size=32", "model.intermediate_size=64",
       "train.nproc=2", "train.micro_batch_size=2", "train.grad_accum=1", "train.lr=5e-3", "train.warmup_steps=1",
       "train.max_steps=4", "train.save_every=2", "model.attention=dense", "wandb.mode=disabled"]


def _recipe(tmp_path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text("wandb: {mode: disabled}\n")
    return str(path)


def _history(out) -> dict[int, float]:
    rows = {}
    for name in sorted(os.listdir(out)):
        if name.startswith("history-rank0-"):
            rows.update({r["step"]: r["loss"] for r in json.load(open(os.path.join(out, name)))})
    return rows


@pytest.fixture(scope="module")
def other_shards(tmp_path_factory, shared_data) -> str:
    """Shards of other dialogues (another fingerprint), same tokenizer and seq_len."""
    from data_prep.prep import prepare

    out = tmp_path_factory.mktemp("other") / "shards"
    cfg = load_config(None, ["data.seq_len=128", "data.max_dialogues=30", "data.engine=local"])
    prepare([str(shared_data / "msc" / "session_3_test.jsonl")], str(out), cfg.data, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def busy_run(tmp_path_factory, shards):
    """`convsink train` (2 ranks, steps 1-2 of 4) and, while it runs, a second `convsink train` into its folder."""
    tmp = tmp_path_factory.mktemp("busy")
    out = tmp / "run"
    args = ["train", "--config", _recipe(tmp), "--data", shards, "--out", str(out), *RUN, "train.stop_at_step=2"]
    log = open(tmp / "first.log", "w")
    first = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                             env=dict(os.environ, WANDB_MODE="offline"))
    try:
        deadline = time.time() + 300
        while not (out / "config.json").is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended before the second could start:\n" + (tmp / "first.log").read_text()
        second = convsink(*args)
        first_alive_after_second = first.poll() is None
        rc = first.wait(timeout=600)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
        log.close()
    assert rc == 0, (tmp / "first.log").read_text()[-4000:]
    return {"out": str(out), "first_pid": first.pid, "second": second, "first_alive_after_second": first_alive_after_second}


def _copy_run(busy_run, dst) -> str:
    shutil.copytree(busy_run["out"], dst, ignore=shutil.ignore_patterns(".lock"))
    return str(dst)


@pytest.mark.slow
def test_a_second_launch_into_a_busy_run_folder_stops_naming_the_holder(busy_run):
    line = one_line_error(busy_run["second"])
    assert busy_run["second"].returncode == 2
    assert f"pid {busy_run['first_pid']}" in line and os.path.join(busy_run["out"], ".lock") in line, line
    assert busy_run["first_alive_after_second"], "inconclusive: the first run had ended before the second was refused"
    # the first run was not disturbed: its checkpoint and history are its own
    assert sorted(_history(busy_run["out"])) == [1, 2]
    assert os.path.isdir(os.path.join(busy_run["out"], "checkpoints", "step000002"))


@pytest.mark.slow
def test_the_checkpoint_records_what_a_resume_must_keep(busy_run, shards):
    from data_prep.shards import read_manifest

    state = json.load(open(os.path.join(busy_run["out"], "checkpoints", "step000002", "convsink_state.json")))
    assert state == {"step": 2, "fingerprint": read_manifest(shards)["fingerprint"], "world_size": 2, "sp_size": 1,
                     "micro_batch_size": 2, "grad_accum": 1, "seed": 0, "stage": DIALOGUE_STAGE, "samples_seen": 8}


@pytest.mark.slow
@pytest.mark.parametrize("change, named", [
    (["train.nproc=1"], "world size 1 but checkpoint step000002 was saved with 2"),
    (["train.sequence_parallel_size=2"], "train.sequence_parallel_size 2 but checkpoint step000002 was saved with 1"),
    (["train.micro_batch_size=1"], "train.micro_batch_size 1 but checkpoint step000002 was saved with 2"),
    (["train.grad_accum=2"], "train.grad_accum 2 but checkpoint step000002 was saved with 1"),
    (["train.seed=7"], "train.seed 7 but checkpoint step000002 was saved with 0"),
    ([f"train.stage={MEMORY_STAGE}"], f"train.stage {MEMORY_STAGE} but checkpoint step000002 was saved with {DIALOGUE_STAGE}"),
    (["data"], "data fingerprint"),
], ids=["world_size", "sp_size", "micro_batch_size", "grad_accum", "seed", "stage", "fingerprint"])
def test_a_resume_that_changes_a_recorded_field_is_refused_naming_it(busy_run, shards, other_shards, tmp_path, change, named):
    out = _copy_run(busy_run, tmp_path / "run")
    before = {n: open(os.path.join(out, n), "rb").read() for n in ("config.json", "data.json")}
    data = other_shards if change == ["data"] else shards
    cfg = load_config(None, RUN + [c for c in change if c != "data"])
    with pytest.raises(ValueError) as e:
        prepare_run_dir(cfg, data, out, resume=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{out}: --resume with ") and named in msg, msg
    assert {n: open(os.path.join(out, n), "rb").read() for n in before} == before, "a refused resume rewrote the run folder"


@pytest.mark.slow
def test_convsink_train_resume_on_other_data_stops_before_launch(busy_run, other_shards, tmp_path):
    from data_prep.shards import read_manifest

    out = _copy_run(busy_run, tmp_path / "run")
    before = _files(out)
    proc = convsink("train", "--config", _recipe(tmp_path), "--data", other_shards, "--out", out, "--resume", *RUN)
    line = one_line_error(proc)
    assert proc.returncode == 2
    assert "data fingerprint" in line and read_manifest(other_shards)["fingerprint"] in line, line
    assert _files(out) == before, "the refused resume changed the run folder (data.json, a history, a checkpoint)"


def _files(folder: str) -> dict[str, bytes]:
    """Every file of a run folder but its lock file, with its bytes."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if os.path.relpath(path, folder) != ".lock":
                out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


@pytest.mark.slow
def test_ray_train_resume_with_another_worker_count_stops_before_ray_starts(busy_run, shards, tmp_path):
    from pipeline.training.ray_train import ray_train

    out = _copy_run(busy_run, tmp_path / "run")
    with pytest.raises(ValueError, match="world size 1 but checkpoint step000002 was saved with 2"):
        ray_train(load_config(None, RUN), shards, out, resume=True, num_workers=1)
    assert not os.path.exists(os.path.join(out, "ray_run.json")), "refused before Ray was asked for anything"


@pytest.mark.slow
def test_allowed_batch_change_with_the_same_global_batch_reads_what_an_uninterrupted_run_reads(busy_run, shards, tmp_path, capfd):
    """micro_batch 2 x grad_accum 1 -> 1 x 2 (global batch 4 either way): steps 3-4 equal the uninterrupted run's."""
    reference = str(tmp_path / "reference")
    launch_training(load_config(None, RUN), shards, reference)
    out = _copy_run(busy_run, tmp_path / "resumed")
    split = RUN + ["train.micro_batch_size=1", "train.grad_accum=2"]
    with pytest.raises(ValueError, match="train.micro_batch_size 1 .*train.allow_batch_change"):
        prepare_run_dir(load_config(None, split), shards, out, resume=True)
    capfd.readouterr()
    launch_training(load_config(None, split + ["train.allow_batch_change=true"]), shards, out, resume=True)
    printed = capfd.readouterr().out
    assert "global batch 4 -> 4 samples" in printed and "exactly the samples of an uninterrupted run" in printed, printed
    full, resumed = _history(reference), _history(out)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step], abs=1e-5), step
    state = json.load(open(os.path.join(out, "checkpoints", "step000004", "convsink_state.json")))
    assert (state["micro_batch_size"], state["grad_accum"], state["samples_seen"]) == (1, 2, 16)


@pytest.mark.slow
@pytest.mark.parametrize("change, rule", [
    (["train.micro_batch_size=1"], "global batch 4 -> 2 samples (train.micro_batch_size 2 -> 1, train.grad_accum 1 -> 1): "
                                   "the stream continues at sample 4, so samples 4-7 are read a second time"),
    (["train.grad_accum=3"], "global batch 4 -> 12 samples (train.micro_batch_size 2 -> 2, train.grad_accum 1 -> 3): "
                             "the stream continues at sample 24, so samples 8-23 are never read"),
], ids=["smaller_repeats", "larger_skips"])
def test_allowed_batch_change_says_which_samples_it_skips_or_repeats(busy_run, shards, tmp_path, capsys, change, rule):
    out = _copy_run(busy_run, tmp_path / "run")
    prepare_run_dir(load_config(None, RUN + change + ["train.allow_batch_change=true"]), shards, out, resume=True)
    assert rule in capsys.readouterr().out


# --- fast: no training ---------------------------------------------------------------------------------------------

_HOLDER = """
import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(600)
"""


def test_a_lock_held_by_a_live_process_blocks_and_that_of_a_dead_one_does_not(shards, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FileExistsError) as e:
            prepare_run_dir(load_config(None, RUN), shards, str(out), resume=False)
        assert str(e.value) == (f"{out}: another run is writing this run folder (pid {holder.pid} holds {out}/.lock); "
                                "wait for it to end or choose another --out")
        assert not (out / "config.json").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (out / ".lock").read_text().strip() == str(holder.pid), "the dead holder's lock file is still there"
    prepare_run_dir(load_config(None, RUN), shards, str(out), resume=False)  # ... and does not block
    assert (out / "config.json").is_file()


def test_config_and_data_json_are_replaced_whole_never_rewritten_in_place(shards, tmp_path):
    """A reader that opened OUT/config.json and OUT/data.json before a relaunch still reads the complete old files."""
    out = str(tmp_path / "run")
    moved = tmp_path / "moved-shards"
    moved.symlink_to(shards)  # the same shards under another path: data.json's data_dir changes
    prepare_run_dir(load_config(None, RUN + ["train.lr=1e-3"]), shards, out, resume=False)
    readers = {n: open(os.path.join(out, n)) for n in ("config.json", "data.json")}
    prepare_run_dir(load_config(None, RUN + ["train.lr=2e-3"]), str(moved), out, resume=False)
    try:
        assert json.loads(readers["config.json"].read())["train"]["lr"] == 1e-3
        assert json.loads(readers["data.json"].read())["data_dir"] == os.path.abspath(shards)
    finally:
        for f in readers.values():
            f.close()
    assert json.load(open(os.path.join(out, "config.json")))["train"]["lr"] == 2e-3
    assert json.load(open(os.path.join(out, "data.json")))["data_dir"] == str(moved)
    assert not [n for n in os.listdir(out) if ".tmp-" in n]


def test_allow_batch_change_flag_of_both_training_command_lines_sets_the_recipe_field(tmp_path):
    from pipeline.cli import build_parser, train_overrides
    from ray_jobs.train import build_parser as ray_job_parser

    common = ["--config", _recipe(tmp_path), "--data", "D", "--out", "O", "--resume", "--allow-batch-change"]
    for args in (build_parser().parse_args(["train", *common]), ray_job_parser().parse_args(common)):
        assert load_config(args.config, train_overrides(args)).train.allow_batch_change is True
    assert load_config(_recipe(tmp_path), train_overrides(build_parser().parse_args(["train", *common[:-1]]))).train.allow_batch_change is False
