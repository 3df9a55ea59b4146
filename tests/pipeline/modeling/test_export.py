"""`convsink export RUN --out OUT` never destroys: an --out inside or above the run folder, or an existing folder that
is not an exported model, is refused with one line and left as it was; an earlier export is replaced."""

from __future__ import annotations

import os
import shutil

import pytest

from pipeline.config import load_config
from pipeline.contract import EXPORT_INFO_FILE
from pipeline.training.launch import launch_training
from tests.pipeline.test_cli import convsink, one_line_error

pytestmark = pytest.mark.slow

TINY = ["data.seq_len=128", "model.max_position_embeddings=512", "model.hidden_size=32", "model.intermediate_size=64",
        "train.nproc=2", "train.micro_batch_size=2", "train.grad_accum=1", "train.max_steps=2", "train.save_every=2",
        "model.attention=dense", "wandb.mode=disabled"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shards) -> str:
    """A real 2-rank ZeRO-3 run folder (2 steps, checkpoint step000002)."""
    out = str(tmp_path_factory.mktemp("trained") / "run")
    launch_training(load_config(None, TINY), shards, out)
    return out


def _listing(folder) -> dict[str, int]:
    """Every file under ``folder`` with its size."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = os.path.getsize(path)
    return out


@pytest.mark.parametrize("where", ["the run folder", "its checkpoints folder", "its checkpoint", "a new folder in it",
                                   "the folder above it"])
def test_export_refuses_an_out_inside_or_above_the_run_folder(trained, tmp_path, where):
    box = tmp_path / "box"
    run = box / "run"
    shutil.copytree(trained, run)
    before = _listing(box)
    out = {"the run folder": run, "its checkpoints folder": run / "checkpoints",
           "its checkpoint": run / "checkpoints" / "step000002", "a new folder in it": run / "export",
           "the folder above it": box}[where]
    proc = convsink("export", str(run), "--out", str(out))
    after = _listing(box)
    lost = sorted(set(before) - set(after))
    assert not lost, f"export deleted {len(lost)} files of the run, e.g. {lost[:3]}"
    assert after == before, "the run folder was changed"
    line = one_line_error(proc)
    assert proc.returncode == 2
    assert f"convsink export: error: {out}: " in line and str(run) in line, line
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_export_refuses_an_existing_folder_that_is_not_an_export(trained, tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.tex").write_text("two years of work\n")
    proc = convsink("export", trained, "--out", str(precious))
    assert (precious / "thesis.tex").is_file(), "export deleted the folder's files"
    assert (precious / "thesis.tex").read_text() == "two years of work\n" and os.listdir(precious) == ["thesis.tex"]
    line = one_line_error(proc)
    assert proc.returncode == 2
    assert f"{precious}: exists and is not an exported model folder (no {EXPORT_INFO_FILE})" in line, line


def test_export_replaces_an_earlier_export(trained, tmp_path):
    from pipeline.modeling.export import load_exported

    out = tmp_path / "export"
    assert convsink("export", trained, "--out", str(out)).returncode == 0
    (out / "stale.txt").write_text("from the first export")
    proc = convsink("export", trained, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / EXPORT_INFO_FILE).is_file() and not (out / "stale.txt").exists()
    assert load_exported(str(out)).config.vocab_size > 0


def _copy_without(trained, tmp_path, drop) -> str:
    """A copy of the run folder without the files of checkpoint step000002 that ``drop(name)`` selects."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    folder = run / "checkpoints" / "step000002"
    for name in os.listdir(folder):
        if drop(name):
            os.remove(folder / name)
    return str(run)


@pytest.mark.parametrize("how", ["--tag", "latest"])
def test_export_refuses_a_checkpoint_missing_a_rank(trained, tmp_path, how):
    """The rank files are counted against the world size the checkpoint records (a run folder not shared across
    nodes holds one node's ranks): consolidating fewer ranks would build wrong weights, so nothing is exported."""
    run = _copy_without(trained, tmp_path, lambda name: name.startswith("zero_pp_rank_1_"))
    out = tmp_path / "export"
    proc = convsink("export", run, "--out", str(out), *(["--tag", "step000002"] if how == "--tag" else []))
    line = one_line_error(proc)
    assert proc.returncode == 2
    if how == "--tag":
        assert line == (f"convsink export: error: {run}/checkpoints/step000002: holds ZeRO files of rank 0 of 2: "
                        "rank 1 missing (run folder not shared across nodes?); not exported"), line
    else:  # latest names it, but it is not complete: there is no checkpoint to export
        assert line == f"convsink export: error: {run}: no complete checkpoint to export", line
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_export_tag_refuses_a_folder_whose_save_did_not_finish(trained, tmp_path):
    run = _copy_without(trained, tmp_path, lambda name: name == "convsink_state.json")
    out = tmp_path / "export"
    proc = convsink("export", run, "--out", str(out), "--tag", "step000002")
    line = one_line_error(proc)
    assert line == (f"convsink export: error: {run}/checkpoints/step000002: no readable convsink_state.json (its save "
                    "did not finish); not exported"), line
    assert not out.exists()
