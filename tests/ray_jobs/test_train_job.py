"""Training on Ray Train: `ray job submit` of a 2-worker ZeRO-3 run to a loopback Ray head (both ranks' shards in
Ray's checkpoint, export loads in plain transformers), and a worker killed mid-run: Ray restarts the group from its
newest checkpoint and the run ends with the parameters of an uninterrupted run."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch


pytestmark = pytest.mark.slow
from tests.repo import REPO

TINY = """\
data: {seq_len: 128}
model: {max_position_embeddings: 512, hidden_size: 32, intermediate_size: 64, attention: dense}
train: {nproc: 2, micro_batch_size: 2, grad_accum: 1, lr: 5.0e-3, warmup_steps: 2, max_steps: %d, save_every: %d}
wandb: {mode: offline}
"""


STEPS, SAVE_EVERY = 12, 3


@pytest.fixture(scope="module")
def job_run(tmp_path_factory, shards, cluster):
    """An uninterrupted 2-worker run submitted with `ray job submit` to the folder's loopback Ray head; also the
    reference of the fault-tolerance test."""
    tmp = tmp_path_factory.mktemp("job")
    t0 = time.time()
    proc = cluster.submit([sys.executable, "-m", "ray_jobs.train", "--config", _recipe(tmp, STEPS, SAVE_EVERY),
                           "--data", shards, "--out", str(tmp / "run")], REPO)
    print(f"ray job submit: {time.time() - t0:.0f} s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return tmp


def _recipe(tmp_path, max_steps: int, save_every: int) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY % (max_steps, save_every))
    return str(path)


def _rank_files(folder: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name in sorted(os.listdir(folder)):
        if "zero_pp_rank_" in name:
            out.setdefault(int(name.split("zero_pp_rank_")[1].split("_")[0]), []).append(name)
    return out


def _listing(folder: str) -> dict[str, int]:
    return {n: os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)}


def test_ray_job_submit_trains_two_workers_and_exports(job_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.modeling.export import export_checkpoint
    from pipeline.modeling.zero3_consolidate import consolidate_zero3
    from pipeline.training.checkpoint import checkpoint_root, latest_tag
    from pipeline.training.tracking import find_offline_runs, read_offline_run

    out = str(job_run / "run")
    final = f"step{STEPS:06d}"
    result = json.load(open(os.path.join(out, "ray_result.json")))

    # Ray's final checkpoint: in the run's storage, with both ranks' ZeRO shards (each rank reported only its own)
    ray_ckpt = result["ray_checkpoint"]
    assert ray_ckpt.startswith(os.path.join(out, "ray") + os.sep) and os.path.basename(ray_ckpt) == final
    shards_by_rank = _rank_files(ray_ckpt)
    assert sorted(shards_by_rank) == [0, 1]
    for rank, names in shards_by_rank.items():
        assert any(n.endswith("_model_states.pt") for n in names) and any(n.endswith("_optim_states.pt") for n in names), names
    assert result["metrics"]["step"] == STEPS
    # OUT/checkpoints holds the same final checkpoint, so `convsink export OUT` works
    root = checkpoint_root(out)
    assert latest_tag(root) == final
    assert _listing(os.path.join(root, final)) == _listing(ray_ckpt)
    assert not os.path.exists(os.path.join(out, ".ray-staging"))

    export_dir = export_checkpoint(out, str(tmp_path / "export"))
    model = AutoModelForCausalLM.from_pretrained(export_dir)  # plain transformers
    state, ray_state = model.state_dict(), consolidate_zero3(ray_ckpt)
    for name, tensor in state.items():
        if name in ray_state:
            assert torch.equal(tensor, ray_state[name]), name
    assert "model.embed_tokens.weight" in ray_state
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()

    # one W&B run (world rank 0 only), every step logged
    runs = find_offline_runs(out)
    assert len(runs) == 1
    logged = sorted(int(r["_step"]) for r in read_offline_run(runs[0])["history"] if "loss" in r)
    assert logged == list(range(1, STEPS + 1))


def _descendants(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _stop(pids: set[int]) -> None:
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
            procs[-1].terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def test_killed_worker_restarts_from_newest_ray_checkpoint(job_run, shards, tmp_path):
    from pipeline.modeling.zero3_consolidate import consolidate_zero3
    from pipeline.training.ray_train import read_restores

    steps = STEPS
    recipe = _recipe(tmp_path, steps, SAVE_EVERY)
    out, ref_out = tmp_path / "ray", job_run / "run"  # the reference: the uninterrupted job run
    env = dict(os.environ, WANDB_MODE="offline", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    log_path = tmp_path / "ray.log"
    log = open(log_path, "w")
    t0 = time.time()
    temp_dirs_before = set(glob.glob("/tmp/ray-ct-*"))  # the embedded Ray's mkdtemp folder is new
    proc = subprocess.Popen([sys.executable, "-m", "ray_jobs.train", "--config", recipe, "--data", shards, "--out", str(out),
                             "--max-failures", "1"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    ours = set()
    victim = survivor = killed_after = None
    try:
        deadline = time.time() + 420
        while time.time() < deadline and proc.poll() is None:
            ours |= _descendants(proc.pid)
            committed = out / "ray_checkpoints.json"
            if committed.is_file() and (out / "pids" / "rank1").is_file() and (out / "pids" / "rank0").is_file():
                done = [r["step"] for r in json.loads(committed.read_text())]
                if done and max(done) < steps:
                    victim, survivor = int((out / "pids" / "rank1").read_text()), int((out / "pids" / "rank0").read_text())
                    killed_after = max(done)
                    os.kill(victim, signal.SIGKILL)
                    break
            time.sleep(0.05)
        assert victim is not None, "the run ended before a worker could be killed:\n" + log_path.read_text()[-4000:]
        print(f"killed rank 1 (pid {victim}) after Ray committed step {killed_after}, {time.time() - t0:.0f} s in")
        # once its group is down, remove OUT's own checkpoints: the restart can only resume from Ray's storage
        while _alive(survivor) and time.time() < deadline:
            ours |= _descendants(proc.pid)
            time.sleep(0.05)
        assert not _alive(survivor), "the surviving rank was not stopped"
        shutil.rmtree(out / "checkpoints")
        while proc.poll() is None and time.time() < deadline:
            ours |= _descendants(proc.pid)
            time.sleep(0.5)
        rc = proc.wait(timeout=max(1.0, deadline - time.time()))
        print(f"ray run: {time.time() - t0:.0f} s")
        assert rc == 0, log_path.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _stop({p for p in ours if _alive(p)})
        for d in set(glob.glob("/tmp/ray-ct-*")) - temp_dirs_before:  # left behind when the driver was killed
            shutil.rmtree(d, ignore_errors=True)
        log.close()

    restores = read_restores(str(out))
    assert len(restores) == 1, restores
    r = restores[0]
    assert killed_after <= r["step"] < steps and r["action"] == "copied from Ray storage", r
    assert r["source"].startswith(str(out / "ray") + os.sep)
    assert int((out / "pids" / "rank1").read_text()) != victim
    # the first attempt never finished; the second started at the restored step
    assert not (out / "history-rank0-from0.json").exists()
    resumed = {h["step"]: h["loss"] for h in json.loads((out / f"history-rank0-from{r['step']}.json").read_text())}
    reference = {h["step"]: h["loss"] for h in json.loads((ref_out / "history-rank0-from0.json").read_text())}
    assert sorted(resumed) == list(range(r["step"] + 1, steps + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], abs=1e-6), step

    final = consolidate_zero3(str(out / "checkpoints" / f"step{steps:06d}"))
    expected = consolidate_zero3(str(ref_out / "checkpoints" / f"step{steps:06d}"))
    assert sorted(final) == sorted(expected)
    worst = max((final[k].float() - expected[k].float()).abs().max().item() for k in expected)
    print(f"max |param - uninterrupted param| = {worst:.3g}")
    assert worst <= 1e-5
    # the W&B run continued (same id) rather than starting over
    ids = {os.path.basename(d).rsplit("-", 1)[1] for d in glob.glob(str(out / "wandb" / "offline-run-*"))}
    assert ids == {(out / "wandb_run_id").read_text().strip()}


def _fake_checkpoint(folder, step: int, payload: bytes = b"x") -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "convsink_state.json"), "w") as f:
        json.dump({"step": step}, f)
    for rank in (0, 1):
        with open(os.path.join(folder, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"), "wb") as f:
            f.write(payload * (rank + 1))
    return str(folder)


def test_restore_checkpoint_copies_skips_or_keeps(tmp_path):
    from ray.train import Checkpoint

    from pipeline.training.checkpoint import checkpoint_root, latest_tag
    from pipeline.training.ray_train import _stage_own_files, restore_checkpoint

    out = str(tmp_path / "out")
    root = checkpoint_root(out)
    ray6 = Checkpoint.from_directory(_fake_checkpoint(tmp_path / "storage" / "step000006", 6))
    # empty OUT: copied in, latest points at it
    assert restore_checkpoint(ray6, out)["action"] == "copied from Ray storage"
    assert latest_tag(root) == "step000006" and _listing(os.path.join(root, "step000006")) == _listing(ray6.path)
    # the same checkpoint already local: nothing copied
    assert restore_checkpoint(ray6, out)["action"] == "already local"
    # a newer complete local checkpoint (saved, not yet reported) is kept
    _fake_checkpoint(os.path.join(root, "step000009"), 9)
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step000009")
    assert restore_checkpoint(ray6, out)["action"] == "kept newer local checkpoint"
    assert latest_tag(root) == "step000009"
    # a local copy that differs (a torn or foreign folder) is replaced; newer leftovers and temp folders go
    ray3 = Checkpoint.from_directory(_fake_checkpoint(tmp_path / "storage" / "step000003", 3, b"yy"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step000003")
    _fake_checkpoint(os.path.join(root, "step000003"), 3, b"z")
    os.makedirs(os.path.join(root, ".tmp-step000012"))
    r = restore_checkpoint(ray3, out)
    assert r["action"] == "copied from Ray storage" and r["step"] == 3
    assert sorted(os.listdir(root)) == ["latest", "step000003"]
    assert _listing(os.path.join(root, "step000003")) == _listing(ray3.path)

    # what each rank reports: its own shards; rank 0 also the rank-less files
    tag = os.path.join(root, "step000003")
    assert sorted(os.listdir(_stage_own_files(tag, str(tmp_path / "s0"), 0))) == [
        "convsink_state.json", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert os.listdir(_stage_own_files(tag, str(tmp_path / "s1"), 1)) == ["zero_pp_rank_1_mp_rank_00_optim_states.pt"]
