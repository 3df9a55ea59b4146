"""configs/smollm2-135m-chat.yaml as shipped, shortened by overrides only (a tiny random model instead of the
135M weights; SmolLM2's tokenizer and chat template kept), on ShareGPT data made from the shared MSC dialogues
with a system prompt: the shards are in the chat layout with assistant-only loss and the system turn pinned, the
export records the layout and keeps the chat template, and the chat reply is rendered the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_prep.adapters import iter_dialogues
from data_prep.contract import IGNORE
from tests.repo import REPO

pytestmark = pytest.mark.slow
SYSTEM = "You are a friendly pen pal. Keep replies short."
SHORT = ["data.engine=local", "train.max_steps=2", "train.warmup_steps=1", "train.save_every=2", "train.nproc=1",
         "data.max_dialogues=12", "data.seq_len=512", "chat.max_new_tokens=4", "model.path=null", "model.hidden_size=64",
         "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.intermediate_size=128"]


def sharegpt_from_msc(src: str, out, n: int = 24) -> None:
    with open(out, "w") as f:
        for k, d in enumerate(iter_dialogues(src, "msc")):
            if k == n:
                break
            conv = [{"from": "human" if i % 2 == 0 else "gpt", "value": t.text} for i, t in enumerate(d.turns)]
            f.write(json.dumps({"id": d.id, "system": SYSTEM, "conversations": conv}) + "\n")


def test_chat_recipe_runs_shortened(tmp_path, shared_data):
    data = tmp_path / "sharegpt.jsonl"
    sharegpt_from_msc(str(shared_data / "msc" / "session_2_valid.jsonl"), data)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "configs/smollm2-135m-chat.yaml", f"out_dir={out}",
                           f"inputs=[{data}]", *SHORT], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, WANDB_MODE="offline"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["config"]["template"] == "chat" and manifest["inputs"][0]["format"] == "sharegpt"
    by_role = manifest["counts"]["supervised_tokens_by_role"]
    assert set(by_role) == {"assistant"} and by_role["assistant"] > 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "export"))
    shard = next(sh["file"] for sh in manifest["shards"] if sh["file"].startswith("dialogue-"))
    row = pq.read_table(out / "data" / shard).slice(0, 1).to_pylist()[0]
    ids, utt, labels = np.array(row["input_ids"]), np.array(row["utt_ids"]), np.array(row["labels"])
    first = utt >= 0
    assert tok.decode(ids[first & (utt == 0)][:40]).startswith("<|im_start|>system\n" + SYSTEM)  # pinned with BOS
    assert "assistant" not in tok.decode(ids[labels != IGNORE]).replace("<|im_end|>", "")  # headers carry no loss

    info = json.loads((out / "export" / "convsink.json").read_text())
    assert info["layout"] == {"template": "chat", "train_on": "assistant", "pin_system": True}
    assert info["eou_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert (out / "export" / "chat_template.jinja").is_file()
    assert "<|im_start|>user\nhi<|im_end|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "model: " in proc.stdout
