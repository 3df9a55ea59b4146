"""`convsink run` end to end on a tiny model: prep (dialogue + SMR + LMR shards) → memory stage → dialogue stage
from the memory stage's export → export → one chat reply; per-task losses read back from the offline W&B runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.memory_probe import task_accuracy
from pipeline.tracking import find_offline_runs, read_offline_run

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_run_chains_memory_and_dialogue_stages(tmp_path, shared_data):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
inputs: [{shared_data / 'msc' / 'session_2_valid.jsonl'}]
out_dir: {tmp_path / 'run'}
data: {{seq_len: 256, max_dialogues: 40, engine: local, smr: {{samples: 40, utterances_per_sample: 4}}, lmr: {{samples: 40, pairs_per_sample: 4}}}}
model: {{hidden_size: 32, intermediate_size: 64, max_position_embeddings: 512}}
train: {{nproc: 2, micro_batch_size: 2, max_steps: 6, memory_steps: 8, warmup_steps: 1, lr: 5.0e-3, save_every: 4}}
chat: {{max_new_tokens: 4}}
""")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(recipe)], cwd=REPO, capture_output=True,
                          text=True, timeout=1200, env=dict(os.environ, WANDB_MODE="offline"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert "exported model:" in proc.stdout and "W&B run" in proc.stdout
    for d in ("data", "train-memory", "export-memory", "train", "export"):
        assert (run / d).is_dir(), d

    memory = read_offline_run(find_offline_runs(str(run / "train-memory"))[0])
    smr = [r["loss/smr"] for r in memory["history"] if "loss/smr" in r]
    lmr = [r["loss/lmr"] for r in memory["history"] if "loss/lmr" in r]
    assert len(smr) == len(lmr) == 8, "both tasks in every memory-stage step (mixed batches)"
    assert smr[-1] < smr[0] and lmr[-1] < lmr[0]
    assert memory["config"]["train"]["stage"] == "memory"

    dialogue_cfg = json.loads((run / "train" / "config.json").read_text())
    assert dialogue_cfg["train"]["stage"] == "dialogue"
    assert dialogue_cfg["train"]["init_from"] == str(run / "export-memory")
    dialogue = read_offline_run(find_offline_runs(str(run / "train"))[0])
    assert all("loss/dialogue" in r and "loss/smr" not in r for r in dialogue["history"] if "loss" in r)

    # the SMR copy accuracy through the sinks, reported (the tiny CPU budget is far too small to demonstrate the
    # paper's effect; see the README)
    acc = task_accuracy(str(run / "export-memory"), str(run / "data"), "smr", max_rows=8)
    print(f"SMR copy token accuracy after the memory stage: {acc['accuracy']:.3f} on {acc['tokens']} tokens")
    assert 0 <= acc["accuracy"] <= 1 and acc["tokens"] > 0
