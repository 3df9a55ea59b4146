"""Recipes validate; errors name the file and key; overrides apply; ${ENV} paths expand."""

from __future__ import annotations

import glob
import json
import os

import pytest

from pipeline.config import ConfigError, load_config
from tests.repo import REPO


@pytest.mark.parametrize("recipe", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))))
def test_every_recipe_validates(recipe, monkeypatch):
    for var in ("CONVSINK_MODEL_1B", "CONVSINK_MODEL_7B", "CONVSINK_DATA"):
        monkeypatch.setenv(var, f"/models/{var.lower()}")
    cfg = load_config(recipe)
    assert cfg.inputs, "every recipe names its inputs"
    if cfg.train.ds_config:
        assert os.path.isfile(os.path.join(REPO, cfg.train.ds_config))
    # the DeepSpeed config the trainer would hand to deepspeed.initialize passes DeepSpeed's own validation
    from deepspeed.runtime.config import DeepSpeedConfig

    from pipeline.training.loop import deepspeed_config

    monkeypatch.chdir(REPO)  # ds_config paths are relative to the repository root, as in the recipes
    ds = DeepSpeedConfig(deepspeed_config(cfg, 1, bf16=True))
    assert ds.zero_config.stage == (cfg.train.zero_stage if cfg.train.ds_config is None else json.load(open(cfg.train.ds_config))["zero_optimization"]["stage"])
    assert ds.train_batch_size == cfg.train.micro_batch_size * cfg.train.grad_accum
    if "offload" in (cfg.train.ds_config or "") or cfg.train.offload:
        assert ds.zero_config.offload_optimizer is not None and ds.zero_config.offload_param is not None


def test_unset_env_var_is_an_error_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv("CONVSINK_MODEL_7B", raising=False)
    monkeypatch.setenv("CONVSINK_DATA", "/data")
    with pytest.raises(ConfigError, match=r"llama-7b-multinode.yaml: data.tokenizer: environment variable CONVSINK_MODEL_7B is not set"):
        load_config(os.path.join(REPO, "configs", "llama-7b-multinode.yaml"))


@pytest.mark.parametrize("text, key, msg", [
    ("train:\n  lr: -1\n", "train.lr", "greater than 0"),
    ("data:\n  seq_len: 4096\nmodel:\n  max_position_embeddings: 1024\n", "(top level)", "exceeds model.max_position_embeddings"),
    ("model:\n  num_heads: 3\n", "model", "not divisible"),
    ("train:\n  nproc: 3\n  sequence_parallel_size: 3\n", "(top level)",
     "train.sequence_parallel_size=3 must divide num_heads=4 and num_kv_heads=2"),
    ("wandb:\n  mode: sometimes\n", "wandb.mode", "offline"),
    ("train: [1, 2]\n", "train", "valid dictionary"),
    ("nonsense: 1\n", "nonsense", "unknown key"),
])
def test_bad_values_name_file_and_key(tmp_path, text, key, msg):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    line = str(err.value)
    assert line.startswith(f"{path}: {key}:") and msg in line and "\n" not in line


def test_overrides_apply_and_are_validated():
    cfg = load_config(None, ["train.lr=3e-4", "model.lora.enabled=true", "wandb.tags=[a, b]"])
    assert cfg.train.lr == 3e-4 and cfg.model.lora.enabled and cfg.wandb.tags == ["a", "b"]
    with pytest.raises(ConfigError, match=r"command line \(train\.nproc=0\): train\.nproc"):
        load_config(None, ["train.nproc=0"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["train.lr"])
