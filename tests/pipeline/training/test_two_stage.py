"""`convsink run` end to end on a tiny model: prep (dialogue + SMR + LMR shards) → memory stage → dialogue stage
from the memory stage's export → export → one chat reply; per-task losses read back from the offline W&B runs.

Then the point of the memory stage: on held-apart utterances (MSC session-3 *test* episodes, never trained on),
the SMR copy's token accuracy through its original's EoU, against the same model trained on dialogues alone for
as many steps. A control cuts the copy's view of the EoU (``through_eou=False``): the memory-stage model's gain
must come from what the EoU holds, and the dialogue-only model must have no such gain.

Set-up that makes the effect learnable on 2 CPU cores in minutes (numbers from a sweep, see the README): a
2048-token BPE trained on the training files (a 49k vocabulary is most of a tiny model's cost), hidden 128, and
SMR utterances of at most 12 tokens (``data.smr.max_utterance_tokens``). With any utterance length a random-init
model of this size does not learn to read the EoU within this budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from data_prep.config import DataConfig
from data_prep.prep import prepare
from pipeline.contract import DIALOGUE_STAGE, MEMORY_STAGE
from pipeline.evaluation.memory_probe import task_accuracy
from pipeline.training.tracking import find_offline_runs, read_offline_run

pytestmark = pytest.mark.slow
from tests.repo import REPO

MEMORY_STEPS, DIALOGUE_STEPS = 400, 40  # 600 gave a wider margin (README); 400 keeps `make test` < 30 min
SMR = {"utterances_per_sample": 8, "max_utterance_tokens": 12}


def convsink(*args, timeout=1500):
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, WANDB_MODE="offline"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_run_chains_memory_and_dialogue_stages_and_the_eou_learns_its_utterance(tmp_path, shared_data):
    msc = shared_data / "msc"
    train_files = [str(msc / "session_2_valid.jsonl"), str(msc / "session_3_valid.jsonl")]
    tok = str(tmp_path / "bpe")
    convsink("tokenizer", *train_files, "--out", tok, "--vocab-size", "2048")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
inputs: {json.dumps(train_files)}
out_dir: {tmp_path / 'run'}
data: {{tokenizer: {tok}, seq_len: 256, engine: local, smr: {json.dumps(dict(SMR, samples=2400))},
        lmr: {{samples: 1200, pairs_per_sample: 4}}}}
model: {{hidden_size: 128, num_layers: 2, num_heads: 4, num_kv_heads: 4, intermediate_size: 256, max_position_embeddings: 512}}
train: {{nproc: 2, micro_batch_size: 4, memory_steps: {MEMORY_STEPS}, max_steps: {DIALOGUE_STEPS}, warmup_steps: 20, lr: 3.0e-3,
         save_every: 1000, log_every: 10}}
chat: {{max_new_tokens: 4}}
""")
    proc = convsink("run", str(recipe))
    run = tmp_path / "run"
    assert "exported model:" in proc.stdout and "W&B run" in proc.stdout
    for d in ("data", "train-memory", "export-memory", "train", "export"):
        assert (run / d).is_dir(), d

    memory = read_offline_run(find_offline_runs(str(run / "train-memory"))[0])
    smr = [r["loss/smr"] for r in memory["history"] if "loss/smr" in r]
    lmr = [r["loss/lmr"] for r in memory["history"] if "loss/lmr" in r]
    assert len(smr) == len(lmr) == MEMORY_STEPS // 10, "both tasks in every logged memory-stage step (mixed batches)"
    assert smr[-1] < smr[0] - 1.0 and lmr[-1] < lmr[0] - 1.0
    assert memory["config"]["train"]["stage"] == "memory"

    dialogue_cfg = json.loads((run / "train" / "config.json").read_text())
    assert dialogue_cfg["train"]["stage"] == "dialogue"
    assert dialogue_cfg["train"]["init_from"] == str(run / "export-memory")
    dialogue = read_offline_run(find_offline_runs(str(run / "train"))[0])
    logged = [r for r in dialogue["history"] if "loss" in r]
    assert len(logged) == DIALOGUE_STEPS // 10
    assert all("loss/dialogue" in r and "loss/smr" not in r and "loss/lmr" not in r for r in logged)

    # the same model trained on dialogues alone, as many steps as both stages together
    convsink("train", "--config", str(recipe), "--data", str(run / "data"), "--out", str(tmp_path / "dialogue-only"),
             f"train.max_steps={MEMORY_STEPS + DIALOGUE_STEPS}", "train.save_every=1000")
    convsink("export", str(tmp_path / "dialogue-only"), "--out", str(tmp_path / "dialogue-only-export"))

    held = tmp_path / "held-apart"
    prepare([str(msc / "session_3_test.jsonl")], str(held),
            DataConfig(tokenizer=tok, seq_len=256, engine="local", max_dialogues=200, seed=7, smr=dict(SMR, samples=48)),
            progress=False)
    acc = {}
    for name, model in (("memory stage", run / "export-memory"), ("memory + dialogue stages", run / "export"),
                        ("dialogues alone", tmp_path / "dialogue-only-export")):
        for through in (True, False):
            acc[name, through] = task_accuracy(str(model), str(held), "smr", max_rows=48, through_eou=through)["accuracy"]
    lines = [f"SMR copy token accuracy on held-apart utterances ({MEMORY_STEPS} memory + {DIALOGUE_STEPS} dialogue steps "
             f"vs {MEMORY_STEPS + DIALOGUE_STEPS} dialogue steps):"]
    lines += [f"  {n:<26} through the EoU {acc[n, True]:.3f}   EoU cut off {acc[n, False]:.3f}"
              for n in ("memory stage", "memory + dialogue stages", "dialogues alone")]
    print("\n".join(lines))
    (tmp_path / "smr_accuracy.txt").write_text("\n".join(lines) + "\n")

    # judged on the memory stage's export; the chained model is reported (40 dialogue steps at this learning rate
    # wash the skill out again on a model this small: see the README)
    assert acc["memory stage", True] >= acc["dialogues alone", True] + 0.08, lines
    assert acc["memory stage", True] >= acc["memory stage", False] + 0.08, "the gain must come through the EoU"
    assert acc["dialogues alone", True] <= acc["dialogues alone", False] + 0.03, "no memory path without the memory stage"


# the shipped quickstart, shortened by overrides only (a few steps, fewer dialogues and memory samples)
QUICKSTART_SHORT = ["train.memory_steps=2", "train.max_steps=2", "train.warmup_steps=1", "train.save_every=2",
                    "data.max_dialogues=40", "data.smr.samples=8", "data.lmr.samples=8", "chat.max_new_tokens=4"]
STAGE_ORDER = ["prep", MEMORY_STAGE, DIALOGUE_STAGE, "export", "chat"]


def _section(lines: list[str], title: str) -> list[str]:
    """The indented lines under ``title`` (Ray workers' late output, which has no indent, may come between them)."""
    rest = lines[lines.index(title) + 1:]
    end = next((i for i, ln in enumerate(rest) if ln and not ln.startswith("  ") and not ln.startswith("\x1b")), len(rest))
    return [ln for ln in rest[:end] if ln.startswith("  ")]


def check_quickstart_run(out, stdout: str) -> None:
    """What a quickstart run into ``out`` must have done, in order, read from its printout and its files: prep on Ray
    (smr/lmr/dialogue shards), the memory stage then the dialogue stage on Ray Train, each with a checkpoint and a W&B
    run of its task losses, an export plain transformers loads, one chat reply; the where-is and per-stage-time lines."""
    from transformers import AutoModelForCausalLM

    from pipeline.contract import DIALOGUE, LMR, MASK_KIND, SMR
    from pipeline.training.checkpoint import checkpoint_root, latest_tag

    lines = stdout.splitlines()
    starts = [next((i for i, ln in enumerate(lines) if ln.startswith(f"[{s}]")), None) for s in STAGE_ORDER]
    assert None not in starts and starts == sorted(starts), f"stages out of order or missing: {dict(zip(STAGE_ORDER, starts))}"
    times = [ln.split() for ln in _section(lines, "stage times:")]
    assert [t[0] for t in times] == STAGE_ORDER and all(float(t[1]) > 0 and t[2] == "s" for t in times), times
    where = dict(ln.strip().split(": ", 1) for ln in _section(lines, "done. where everything is:"))

    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert where["shards"] == str(out / "data") and json.loads((out / "data" / "run.json").read_text())["engine"] == "ray", where
    assert {k for sh in manifest["shards"] for k in sh[MASK_KIND]} == {SMR, LMR, DIALOGUE}
    assert all((out / "data" / sh["file"]).is_file() for sh in manifest["shards"])

    for stage, run_dir, tasks in ((MEMORY_STAGE, "train-memory", {"loss/smr", "loss/lmr"}), (DIALOGUE_STAGE, "train", {"loss/dialogue"})):
        root = checkpoint_root(str(out / run_dir))
        assert where[f"{stage} checkpoint"] == os.path.join(root, latest_tag(root)) == os.path.join(root, "step000002")
        ray_result = json.loads((out / run_dir / "ray_result.json").read_text())  # written by the Ray Train launcher only
        assert ray_result["ray_checkpoint"].startswith(str(out / run_dir / "ray") + os.sep), ray_result
        wandb_dir = where[f"{stage} W&B run (offline)"]
        assert [wandb_dir] == find_offline_runs(str(out / run_dir)), wandb_dir
        history = read_offline_run(wandb_dir)["history"]
        logged = set().union(*(r.keys() for r in history))
        assert tasks <= logged and not ({"loss/smr", "loss/lmr", "loss/dialogue"} - tasks) & logged, (stage, logged)
    assert json.loads((out / "train" / "config.json").read_text())["train"]["init_from"] == str(out / "export-memory")

    assert where["exported model"] == str(out / "export")
    model = AutoModelForCausalLM.from_pretrained(str(out / "export"))
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    chat = lines[next(i for i, ln in enumerate(lines) if ln.startswith("user: ")):lines.index("done. where everything is:")]
    assert sum(ln.startswith("model: ") for ln in chat) == 1, chat  # the streamed reply (Ray's lines may come between)


def test_quickstart_recipe_runs_as_shipped(tmp_path):
    """configs/quickstart.yaml as `make quickstart` runs it (relative ../shared/data inputs, from the repository root),
    shortened by overrides only: prep on Ray, memory then dialogue stage on Ray Train in one embedded Ray session,
    export, a chat reply; it ends by printing where everything is and each stage's time."""
    out = tmp_path / "quickstart"
    proc = convsink("run", "configs/quickstart.yaml", f"out_dir={out}", *QUICKSTART_SHORT, timeout=600)
    check_quickstart_run(out, proc.stdout)
    assert (proc.stdout + proc.stderr).count("Started a local Ray instance") == 1, "one embedded Ray for every stage"
