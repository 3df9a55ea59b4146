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


# --- strict types (issue 13, item 13) ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, key, msg", [
    ('train:\n  max_steps: "20"\n', "train.max_steps", "valid integer"),     # a quoted YAML number is a string
    ("data:\n  seq_len: 1024.0\n", "data.seq_len", "valid integer"),         # a float for an integer field
    ("model:\n  lora:\n    enabled: 1\n", "model.lora.enabled", "valid boolean"),
    ('data:\n  speaker_tags: "true"\n', "data.speaker_tags", "valid boolean"),
    ("wandb:\n  tags: [1, 2]\n", "wandb.tags.0", "valid string"),
])
def test_wrong_types_are_errors_naming_the_key(tmp_path, text, key, msg):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value).startswith(f"{path}: {key}:") and msg in str(err.value), str(err.value)


def test_strict_types_keep_what_yaml_and_the_command_line_mean(tmp_path):
    """YAML ints stay ints, an int is a fine float, exponents without a dot are floats (YAML 1.2), and command-line
    overrides are parsed as YAML scalars before the strict check."""
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  max_steps: 20\n  lr: 1\n  weight_decay: 1e-2\nmodel:\n  lora:\n    enabled: true\n")
    cfg = load_config(str(path), ["train.warmup_steps=3", "train.grad_clip=2", "train.min_lr_ratio=5e-2"])
    t = cfg.train
    assert (t.max_steps, t.warmup_steps) == (20, 3) and type(t.max_steps) is int
    assert (t.lr, t.weight_decay, t.grad_clip, t.min_lr_ratio) == (1.0, 0.01, 2.0, 0.05) and type(t.lr) is float
    assert cfg.model.lora.enabled is True
    with pytest.raises(ConfigError, match=r"command line \(train\.max_steps=2\.0\): train\.max_steps: .*valid integer"):
        load_config(None, ["train.max_steps=2.0"])
    with pytest.raises(ConfigError, match=r"command line \(model\.lora\.enabled=1\): model\.lora\.enabled: .*valid boolean"):
        load_config(None, ["model.lora.enabled=1"])


def test_stored_config_round_trips_under_strict_types():
    """config.json as written (JSON floats, ints, nulls, lists) validates again unchanged: ranks and export read it."""
    from pipeline.config import RunConfig, dump_config

    cfg = load_config(None, ["train.peak_tflops=989", "wandb.tags=[a, b]", "train.zero_stage=2"])
    again = RunConfig.model_validate(json.loads(json.dumps(dump_config(cfg))))
    assert again == cfg and dump_config(again) == dump_config(cfg)


# --- ${ENV} values are stored as written, expanded where they are used (issue 13, item 4) --------------------------

def test_env_values_are_used_expanded_but_stored_as_written(tmp_path, monkeypatch):
    from pipeline.config import RunConfig, dump_config

    monkeypatch.setenv("CONVSINK_TEST_SECRET", "/very/secret/place")
    path = tmp_path / "r.yaml"
    path.write_text("inputs: ['${CONVSINK_TEST_SECRET}/a.json', b.json]\ndata:\n  tokenizer: ${CONVSINK_TEST_SECRET}/tok\n")
    cfg = load_config(str(path), ["model.path=${CONVSINK_TEST_SECRET}/model"])
    assert cfg.data.tokenizer == "/very/secret/place/tok" and cfg.model.path == "/very/secret/place/model"
    assert cfg.inputs == ["/very/secret/place/a.json", "b.json"]
    stored = dump_config(cfg)
    assert "/very/secret" not in json.dumps(stored) and "/very/secret" not in cfg.model_dump_json()
    assert "/very/secret" not in json.dumps(cfg.data.model_dump(mode="json")), "a section dumped alone: stored form too"
    assert stored["data"]["tokenizer"] == "${CONVSINK_TEST_SECRET}/tok" and stored["model"]["path"] == "${CONVSINK_TEST_SECRET}/model"
    assert stored["inputs"] == ["${CONVSINK_TEST_SECRET}/a.json", "b.json"]
    again = RunConfig.model_validate(stored)  # what a rank or the export does with OUT/config.json
    assert again.data.tokenizer == "/very/secret/place/tok" and dump_config(again) == stored
    copy = cfg.model_copy(deep=True)
    copy.data.tokenizer = "/elsewhere"  # a value set by code is stored as set
    assert dump_config(copy)["data"]["tokenizer"] == "/elsewhere" and dump_config(copy)["model"]["path"].startswith("${")
    monkeypatch.delenv("CONVSINK_TEST_SECRET")
    assert dump_config(cfg) == stored, "the stored form does not depend on the environment at dump time"
    assert RunConfig.model_validate(stored).model.path == "${CONVSINK_TEST_SECRET}/model", \
        "a stored config read where the variable is unset keeps the reference (opening it then names it)"


def test_unset_env_var_on_the_command_line_names_the_override(monkeypatch):
    monkeypatch.delenv("CONVSINK_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError, match=r"command line \(model\.path=\$\{CONVSINK_TEST_UNSET\}\): model\.path: "
                                          r"environment variable CONVSINK_TEST_UNSET is not set"):
        load_config(None, ["model.path=${CONVSINK_TEST_UNSET}"])
