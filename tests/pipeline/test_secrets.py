"""Secrets are never written: a recipe's ``${VAR}`` values and WANDB_API_KEY appear in no file that prep, a real
training run (1 rank, ZeRO-3, offline W&B), the export or W&B itself wrote; the stored config keeps ``${VAR}``."""

from __future__ import annotations

import json
import os
import shutil
import uuid

import pytest

from tests.repo import REPO


def _files_holding(root, needles: list[bytes], skip: str) -> list[str]:
    """Every file under ``root`` (binary ones too) whose bytes contain one of ``needles``, ``skip`` left out."""
    hits = []
    for folder, _, names in os.walk(root):
        if os.path.commonpath([folder, skip]) == skip:
            continue
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                data = open(path, "rb").read()
                hits += [f"{path} holds {n.decode()}" for n in needles if n in data]
    return hits


@pytest.mark.slow
def test_no_file_written_by_prep_train_export_or_wandb_holds_a_secret(tmp_path, monkeypatch, shared_data, tokenizer_dir):
    from data_prep.prep import prepare
    from pipeline.config import load_config
    from pipeline.modeling.export import export_checkpoint
    from pipeline.training.launch import launch_training
    from pipeline.training.tracking import find_offline_runs, read_offline_run

    secret_name = f"s3cr3t-{uuid.uuid4().hex}"  # a private folder name: it must reach no written file
    secret_dir = tmp_path / secret_name
    shutil.copytree(tokenizer_dir, secret_dir / "tok")
    shutil.copy(os.path.join(REPO, "ds_configs", "zero3.json"), secret_dir / "ds.json")
    api_key = f"fakekey{uuid.uuid4().hex}{uuid.uuid4().hex}"[:40]
    monkeypatch.setenv("CONVSINK_SECRET_DIR", str(secret_dir))
    monkeypatch.setenv("WANDB_API_KEY", api_key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):  # W&B's own files too
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "data:\n  tokenizer: ${CONVSINK_SECRET_DIR}/tok\n  seq_len: 128\n  max_dialogues: 24\n  engine: local\n"
        "model:\n  hidden_size: 32\n  intermediate_size: 64\n  max_position_embeddings: 256\n  attention: dense\n"
        "train:\n  nproc: 1\n  max_steps: 2\n  save_every: 2\n  warmup_steps: 1\n  ds_config: ${CONVSINK_SECRET_DIR}/ds.json\n"
        "wandb:\n  mode: offline\n")
    cfg = load_config(str(recipe))
    assert cfg.data.tokenizer == f"{secret_dir}/tok", "the value used is the expanded one"

    data, run, export = str(tmp_path / "data"), str(tmp_path / "train"), str(tmp_path / "export")
    prepare([str(shared_data / "personachat" / "valid.json")], data, cfg.data, progress=False)
    launch_training(cfg, data, run)
    export_checkpoint(run, export)

    stored = json.load(open(os.path.join(run, "config.json")))
    assert stored["data"]["tokenizer"] == "${CONVSINK_SECRET_DIR}/tok"
    assert stored["train"]["ds_config"] == "${CONVSINK_SECRET_DIR}/ds.json"
    assert json.load(open(os.path.join(data, "manifest.json")))["config"]["tokenizer"] == "${CONVSINK_SECRET_DIR}/tok"
    runs = find_offline_runs(run)
    assert runs, "the offline W&B run was written"
    assert read_offline_run(runs[0])["config"]["data"]["tokenizer"] == "${CONVSINK_SECRET_DIR}/tok"
    assert os.path.isfile(os.path.join(export, "model.safetensors"))

    hits = _files_holding(tmp_path, [secret_name.encode(), api_key.encode()], skip=str(secret_dir))
    assert not hits, hits
