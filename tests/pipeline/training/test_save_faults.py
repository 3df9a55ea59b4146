"""Faults injected into real ZeRO-3 saves (2 ranks, torchrun, gloo): each rank SIGKILLed at each point of a save,
and a write that fails past N bytes (``$CONVSINK_FAULT``, ``checkpoint._fault``).

After every fault: the launch ends (no rank hangs, none is left running), ``latest`` names a folder holding every
rank's files whose parameters equal the uninterrupted run's at that step, and ``--resume`` goes on from it. The
faults run as one chain, to keep the matrix to 10 launches: launch k resumes from what launch k-1 left and is
faulted at the save of step k + 1, so every resume is faulted again and every checkpoint a resumed launch wrote is
compared with the uninterrupted run's (parameters within 1e-6); the last launch trains to the end, and its losses
and final parameters must equal the uninterrupted run's, with no ``.tmp-*`` left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from pipeline.config import load_config
from pipeline.modeling.zero3_consolidate import consolidate_zero3
from pipeline.training import checkpoint
from pipeline.training.launch import prepare_run_dir
from tests.repo import REPO

pytestmark = pytest.mark.slow

FULL_DISK_BYTES = 1_000_000  # past a rank's model-state file (12 KB), inside its optimizer-state file (9.5 MB)
# rank, point, and for the full disk the byte limit. Rank 1 neither renames nor writes latest: killed at "rename" it
# dies while rank 0 does both (its "latest" point is the same moment, so it is not run twice).
FAULTS = ["0:shards", "0:barrier", "0:rename", "0:latest", "1:shards", "1:barrier", "1:rename",
          f"1:shards:{FULL_DISK_BYTES}"]
STEPS = len(FAULTS) + 2  # fault k (1-based) hits the save of step k + 1; the last launch trains to the end
TINY = ["data.seq_len=128", "model.max_position_embeddings=512", "model.hidden_size=32", "model.intermediate_size=64",
        "train.nproc=2", "train.micro_batch_size=2", "train.grad_accum=1", "train.lr=5e-3", "train.warmup_steps=1",
        f"train.max_steps={STEPS}", "train.save_every=1", f"train.keep_last={STEPS}", "model.attention=dense",
        "wandb.mode=disabled"]
HANG_S = 240  # a launch takes 20-50 s on 2 busy cores; one still running after this hangs


@dataclass
class Launch:
    fault: str | None
    rc: int | None  # None: killed by the test after HANG_S
    wall_s: float
    output: str
    survivors: list[int]  # pids of processes of this launch still alive after it ended
    latest: str | None
    listing: dict[str, dict[str, int]]  # OUT/checkpoints right after the launch: folder -> its files and sizes


def _launch(cfg_path: str, shards: str, out: str, resume: bool, fault: str | None = None) -> Launch:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop(checkpoint.FAULT_ENV, None)
    if fault:
        env[checkpoint.FAULT_ENV] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline.training.loop", "--config-json", cfg_path, "--data", shards, "--out", out]
    t0 = time.time()
    proc = subprocess.Popen(cmd + (["--resume"] if resume else []), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, rc = proc.communicate(timeout=HANG_S)[0], proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's own session: its ranks, nothing else
        output, rc = proc.communicate()[0], None
    wall = time.time() - t0
    root = checkpoint.checkpoint_root(out)
    listing = {n: _sizes(os.path.join(root, n)) for n in os.listdir(root)} if os.path.isdir(root) else {}
    return Launch(fault, rc, wall, output, _processes_naming(out), checkpoint.latest_tag(root), listing)


def _sizes(path: str) -> dict[str, int]:
    """The files of a folder with their sizes (empty for a file)."""
    return {n: os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)} if os.path.isdir(path) else {}


def _processes_naming(out: str) -> list[int]:
    """Pids of live processes whose command line names ``out`` (ranks of a launch that should have ended)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if out.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards):
    """The uninterrupted run, then the chain of faulted launches and the final resume in another run folder."""
    base = tmp_path_factory.mktemp("faults")
    cfg = load_config(None, TINY)
    ref_out, out = str(base / "uninterrupted"), str(base / "faulted")
    reference = _launch(prepare_run_dir(cfg, shards, ref_out, resume=False), shards, ref_out, resume=False)
    assert reference.rc == 0, reference.output[-3000:]
    chain = []
    for k, fault in enumerate(FAULTS, start=1):
        rank, point, *limit = fault.split(":")
        cfg_path = prepare_run_dir(cfg, shards, out, resume=k > 1)
        chain.append(_launch(cfg_path, shards, out, resume=k > 1, fault=":".join([rank, point, str(k + 1), *limit])))
        done = chain[-1]
        print(f"fault {fault} at the save of step {k + 1}: exit {done.rc}, {done.wall_s:.0f} s, latest {done.latest}")
    final = _launch(prepare_run_dir(cfg, shards, out, resume=True), shards, out, resume=True)
    return {"reference": ref_out, "out": out, "chain": chain, "final": final}


def _params(out: str, tag: str) -> dict:
    return consolidate_zero3(os.path.join(checkpoint.checkpoint_root(out), tag))


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _every_rank_files(files: list[str]) -> bool:
    return checkpoint.STATE_FILE in files and all(
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" in files for r in (0, 1) for kind in ("model", "optim"))


@pytest.mark.parametrize("k", range(1, len(FAULTS) + 1), ids=FAULTS)
def test_a_faulted_save_ends_the_launch_and_latest_stays_complete(runs, k):
    fault, step = FAULTS[k - 1], k + 1
    rank, point = fault.split(":")[:2]
    launch = runs["chain"][k - 1]
    assert launch.rc is not None, f"a rank hung: the launch still ran after {HANG_S} s\n{launch.output[-3000:]}"
    assert launch.rc != 0 and not launch.survivors, (launch.rc, launch.survivors)
    if fault.count(":") == 2:  # the write failed past FULL_DISK_BYTES: the rank says where, in one line
        assert f".tmp-step{step:06d}: rank {rank}'s save failed (RuntimeError: " in launch.output, launch.output[-3000:]
        assert "MiB free there); the resume point stays" in launch.output
    else:  # torchrun names the rank that was killed first
        root_cause = launch.output.split("Root Cause (first observed failure):")[-1]
        assert f"rank      : {rank} (local_rank: {rank})" in root_cause and "Signal 9 (SIGKILL)" in root_cause, \
            launch.output[-3000:]
    # latest names a complete folder: the previous step, or (rank 1 killed while rank 0 renamed) this step
    allowed = {f"step{step - 1:06d}", f"step{step:06d}"} if fault == "1:rename" else {f"step{step - 1:06d}"}
    assert launch.latest in allowed, (launch.latest, launch.listing)
    assert _every_rank_files(launch.listing[launch.latest]), launch.listing[launch.latest]
    with open(os.path.join(checkpoint.checkpoint_root(runs["out"]), launch.latest, checkpoint.STATE_FILE)) as f:
        assert json.load(f)["step"] == int(launch.latest[4:])
    tmp = f".tmp-step{step:06d}"
    if fault == "0:latest":  # renamed, complete, but latest was never moved to it
        assert _every_rank_files(launch.listing[f"step{step:06d}"])
    elif fault != "1:rename":  # the save never got past its temporary folder
        assert tmp in launch.listing and f"step{step:06d}" not in launch.listing, launch.listing
    if fault.count(":") == 2:  # the failed rank's optimizer file stops at the byte limit
        assert launch.listing[tmp]["zero_pp_rank_1_mp_rank_00_optim_states.pt"] == FULL_DISK_BYTES, launch.listing[tmp]


def test_every_checkpoint_of_the_faulted_chain_equals_the_uninterrupted_run(runs):
    """Each resumed launch wrote the checkpoints between its resume point and its fault; each equals the
    uninterrupted run's at that step (parameters within 1e-6), so every resume continued exactly."""
    root = checkpoint.checkpoint_root(runs["out"])
    tags = sorted(n for n in os.listdir(root) if n.startswith("step"))
    assert tags == [f"step{s:06d}" for s in range(1, STEPS + 1)], tags
    for tag in tags:
        assert _every_rank_files(os.listdir(os.path.join(root, tag))), tag
        diff = _max_diff(_params(runs["out"], tag), _params(runs["reference"], tag))
        assert diff <= 1e-6, (tag, diff)


def test_the_final_resume_reproduces_the_uninterrupted_losses_and_leaves_no_partial_save(runs):
    final = runs["final"]
    assert final.rc == 0 and not final.survivors, final.output[-3000:]
    assert final.latest == f"step{STEPS:06d}"
    with open(os.path.join(runs["reference"], "history-rank0-from0.json")) as f:
        reference = {r["step"]: r["loss"] for r in json.load(f)}
    start = int(runs["chain"][-1].latest[4:])
    with open(os.path.join(runs["out"], f"history-rank0-from{start}.json")) as f:
        resumed = {r["step"]: r["loss"] for r in json.load(f)}
    assert sorted(resumed) == list(range(start + 1, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], abs=1e-6), step
    assert _max_diff(_params(runs["out"], final.latest), _params(runs["reference"], final.latest)) <= 1e-6
    root = checkpoint.checkpoint_root(runs["out"])
    assert not [n for n in os.listdir(root) if checkpoint.PARTIAL in n], os.listdir(root)
