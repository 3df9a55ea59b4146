"""Typed recipes: YAML files validated into pydantic models, with ``key=value`` overrides.

Any unknown key, wrong type or impossible value stops before any work with one line naming the file and key.
Types are strict (``data_prep.config.Strict``); ``${VAR}`` values are expanded for use and stored as written.
"""

from __future__ import annotations

import os
import re
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from data_prep.config import DataConfig, Strict, env_refs
from pipeline.contract import (
    ABSOLUTE,
    ATTENTION_IMPLS,
    AUTO,
    CACHE_POLICIES,
    CACHE_POSITIONS,
    DIALOGUE,
    DIALOGUE_ROW_MASKS,
    DIALOGUE_STAGE,
    STAGES,
    STREAMINGDIALOGUE_CACHE,
)


class ConfigError(ValueError):
    """A bad recipe; ``str(err)`` is one line naming the file (or the command line) and the key."""


class MaskConfig(Strict):
    local_window: int = Field(64, ge=1, description="window w of the 'local' baseline mask")
    sink_tokens: int = Field(1, ge=1, description="s: attention-sink tokens of the 'streamingllm' baseline mask")
    sink_window: int = Field(64, ge=1, description="w: recent-token window of the 'streamingllm' baseline mask")
    bigbird_global: int = Field(1, ge=0, description="global tokens of the 'bigbird' baseline mask")
    bigbird_window: int = Field(64, ge=1, description="window of the 'bigbird' baseline mask")
    bigbird_random: int = Field(8, ge=0, description="random keys per query of the 'bigbird' baseline mask")
    bigbird_seed: int = Field(0, description="seed of the bigbird random keys")
    dialogue_kind: Literal[DIALOGUE_ROW_MASKS] = Field(
        DIALOGUE, description="mask applied to 'dialogue' rows (the baselines are for comparison runs)")

    def params(self):
        """The mask parameters as the attention code takes them: ``pipeline.attention.masks.MaskParams`` (every field
        but ``dialogue_kind``, which picks the kind of 'dialogue' rows: ``pipeline.modeling.forward.row_kinds``)."""
        from pipeline.attention.masks import MaskParams

        return MaskParams(**self.model_dump(exclude={"dialogue_kind"}))


class LoraConfig(Strict):
    enabled: bool = Field(False, description="train LoRA adapters (peft) instead of all weights; export merges them")
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: int = Field(16, ge=1, description="LoRA scaling numerator")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], description="modules that get adapters")


class ModelConfig(Strict):
    path: str | None = Field(None, description="a Hugging Face model folder, or 'smollm2' (bundled SmolLM2-135M-Instruct); None = random init from the fields below")
    hidden_size: int = Field(64, ge=8, description="width of the random-init Llama")
    num_layers: int = Field(2, ge=1, description="decoder layers of the random-init Llama")
    num_heads: int = Field(4, ge=1, description="attention heads")
    num_kv_heads: int = Field(2, ge=1, description="key/value heads (grouped-query attention)")
    intermediate_size: int = Field(128, ge=8, description="MLP width")
    max_position_embeddings: int = Field(8192, ge=16, description="longest position the model is built for")
    rope_theta: float = Field(10000.0, gt=0, description="rotary base")
    tie_word_embeddings: bool = Field(True, description="share input and output embeddings")
    attention: Literal[ATTENTION_IMPLS] = Field(
        AUTO, description="masked attention kernel: auto picks flex on CUDA, sink on CPU; dense = SDPA with a T×T mask")
    mask: MaskConfig = Field(default_factory=MaskConfig, description="mask parameters")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="optional LoRA adapters")

    @model_validator(mode="after")
    def _heads(self):
        if self.path is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
            if self.num_heads % self.num_kv_heads:
                raise ValueError(f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}")
        return self


class TrainConfig(Strict):
    stage: Literal[STAGES] = Field(DIALOGUE_STAGE, description="memory = SMR+LMR samples; dialogue = dialogue mask fine-tuning")
    nproc: int = Field(2, ge=1, description="processes (ranks) on this node")
    nnodes: int = Field(1, ge=1, description="nodes (multi-node launches set the rendezvous through the launcher's env)")
    launcher: Literal["torchrun", "deepspeed", "ray"] = Field("torchrun", description="process launcher (ray = Ray Train workers, in the Ray session of `convsink run`)")
    micro_batch_size: int = Field(1, ge=1, description="sequences per rank per micro-step")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    max_steps: int = Field(20, ge=1, description="optimizer steps")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of lr")
    warmup_steps: int = Field(2, ge=0, description="linear warmup steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, ge=0, description="gradient norm clip (0 = off)")
    save_every: int = Field(10, ge=1, description="checkpoint every K optimizer steps (and at the end)")
    keep_last: int = Field(2, ge=1, description="keep the newest N checkpoints")
    seed: int = Field(0, description="seed for init and data order")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 on CUDA, fp32 on CPU")
    zero_stage: Literal[0, 1, 2, 3] = Field(3, description="DeepSpeed ZeRO stage")
    offload: bool = Field(False, description="ZeRO-3 CPU offload of parameters and optimizer state")
    sequence_parallel_size: int = Field(1, ge=1, description="Ulysses sequence-parallel group size")
    log_every: int = Field(1, ge=1, description="log metrics every N steps")
    memory_steps: int | None = Field(None, ge=1, description="steps of the memory stage in `convsink run` when the data has SMR/LMR samples (None = max_steps)")
    peak_tflops: float | None = Field(None, gt=0, description="per-device peak TFLOP/s for the MFU estimate; None = known GPUs only (H100/H200 bf16 989, A100 312)")
    stop_at_step: int | None = Field(None, ge=1, description="end this launch after this step (with a checkpoint); the schedule still follows max_steps, --resume continues")
    allow_batch_change: bool = Field(False, description="--resume may change micro_batch_size / grad_accum (world size fixed); data-order rule: pipeline/training/resume_guard.py")
    init_from: str | None = Field(None, description="start from this exported model folder (e.g. the memory stage's export)")
    eval_data: str | None = Field(None, description="held-apart shard folder (`convsink prep` of dialogues kept out of training) evaluated every eval_every steps")
    eval_every: int = Field(0, ge=0, description="evaluate on eval_data every N optimizer steps and at the end (0 = never)")
    eval_rows: int = Field(64, ge=1, description="rows of eval_data (of this stage's mask kinds) per evaluation")
    launch_timeout_s: int | None = Field(None, ge=1, description="stop a launch whose ranks have not all exited after this many seconds (a hung rank), showing the tail of their output; None = no limit")
    ds_config: str | None = Field(None, description="a DeepSpeed JSON from ds_configs/ ('auto' values are filled from this recipe); None = built from the fields above")
    activation_checkpointing: bool = Field(False, description="recompute each decoder layer in backward (non-reentrant): activations of one layer at a time instead of all")
    loss_chunk: int | None = Field(None, ge=1, description="lm_head + cross-entropy over chunks of this many tokens, each chunk's logits recomputed in backward (None = the whole (T, V) logits at once)")
    mlp_chunk: int | None = Field(None, ge=1, description="each decoder layer's MLP over chunks of this many tokens, each chunk recomputed in backward (ALST's tiled MLP, DeepSpeed's TiledMLP; None = the whole sequence at once)")

    @model_validator(mode="after")
    def _lr(self):
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds max_steps={self.max_steps}")
        if self.nproc % self.sequence_parallel_size:
            raise ValueError(f"nproc={self.nproc} is not divisible by sequence_parallel_size={self.sequence_parallel_size}")
        return self


class WandbConfig(Strict):
    project: str = Field("convsink", description="W&B project")
    entity: str | None = Field(None, description="W&B entity (team or user)")
    name: str | None = Field(None, description="run name (default: the output folder's name)")
    group: str | None = Field(None, description="run group")
    tags: list[str] = Field(default_factory=list, description="run tags")
    mode: Literal["offline", "online", "disabled"] = Field("offline", description="online needs WANDB_API_KEY in the environment")


class ChatConfig(Strict):
    cache: Literal[CACHE_POLICIES] = Field(STREAMINGDIALOGUE_CACHE, description="KV cache policy")
    positions: Literal[CACHE_POSITIONS] = Field(ABSOLUTE, description="streamingdialogue positions: absolute (= training mask) or cache")
    max_new_tokens: int = Field(48, ge=1, description="longest reply")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_k: int = Field(0, ge=0, description="sample from the k most likely tokens (0 = all)")
    sink_tokens: int = Field(4, ge=1, description="streamingllm cache: first s tokens kept")
    window: int = Field(256, ge=1, description="streamingllm / recompute cache: recent tokens kept")
    seed: int = Field(0, description="sampling seed")
    system: str | None = Field(None, description="system prompt (chat layout: rendered by the template, pinned with BOS; plain: the first utterance)")


class RunConfig(Strict):
    inputs: list[str] = Field(default_factory=list, description="dialogue files for `convsink run` (relative to the working directory)")
    out_dir: str = Field("runs/default", description="where `convsink run` writes data/, train/, export/")
    chat_prompt: str = Field("Hi! How was your weekend?", description="the user turn `convsink run` answers at the end")
    data: DataConfig = Field(default_factory=DataConfig, description="data preparation")
    model: ModelConfig = Field(default_factory=ModelConfig, description="model")
    train: TrainConfig = Field(default_factory=TrainConfig, description="training")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="Weights & Biases")
    chat: ChatConfig = Field(default_factory=ChatConfig, description="chat / generation")

    @model_validator(mode="after")
    def _cross(self):
        if self.model.path is None and self.data.seq_len > self.model.max_position_embeddings:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds model.max_position_embeddings={self.model.max_position_embeddings}")
        sp = self.train.sequence_parallel_size
        if sp > 1 and self.model.path is None and self.train.init_from is None:  # a model folder: checked before launch
            from pipeline.attention.ulysses import check_sp_size

            try:
                check_sp_size(self.model.num_heads, self.model.num_kv_heads, sp)
            except ValueError as e:
                raise ValueError(f"train.{e}") from None
        return self


def _format_error(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {key}: {msg}{extra}"


OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")  # a command-line word that is a ``section.key=value`` override


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Command-line words that look like ``section.key=value`` are overrides; the rest are positional inputs."""
    return [i for i in items if not OVERRIDE.match(i)], [i for i in items if OVERRIDE.match(i)]


def parse_args_with_overrides(parser, argv: list[str] | None):
    """``parser.parse_known_args`` where ``key=value`` overrides may also follow the options (appended to
    ``args.overrides``); any other unknown word is a usage error."""
    args, extra = parser.parse_known_args(argv)
    for item in extra:
        if not OVERRIDE.match(item):
            parser.error(f"unrecognized argument: {item}")
        args.overrides.append(item)
    return args


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"command line: override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    try:
        value = read_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _set(tree: dict, path: list[str], value, where: str) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def check_env_set(node, where: str, key: str = "") -> None:
    """Every ``${NAME}`` in the recipe names a set environment variable; an unset one is an error naming the key.
    (The values stay as written: ``data_prep.config.Strict`` expands them where they are used, never where stored.)"""
    if isinstance(node, dict):
        for k, v in node.items():
            check_env_set(v, where, f"{key}.{k}" if key else str(k))
        return
    for name in env_refs(node):
        if name not in os.environ:
            raise ConfigError(f"{where}: {key}: environment variable {name} is not set")


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads ``3e-4`` (an exponent without a dot, YAML 1.2) as a float, not a string:
    under strict types that string would be an error for a float field."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_yaml(text_or_file):
    """A recipe or an override value as YAML (``RecipeLoader``)."""
    return yaml.load(text_or_file, Loader=RecipeLoader)


def load_config(path: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML recipe (or the defaults), apply ``key=value`` overrides, validate."""
    tree: dict = {}
    where = path or "defaults"
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: config file not found")
        with open(path) as f:
            try:
                tree = read_yaml(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        check_env_set(tree, path)
        try:
            RunConfig.model_validate(tree)
        except ValidationError as e:
            raise ConfigError(_format_error(e, path)) from None
    parsed = []
    for text in overrides:
        keys, value = parse_override(text)
        _set(tree, keys, value, "command line")
        parsed.append((keys, text))
        check_env_set(value, f"command line ({text})", ".".join(keys))
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        loc = [str(p) for p in e.errors()[0]["loc"]]
        culprit = [text for keys, text in parsed if keys[:len(loc)] == loc or loc[:len(keys)] == keys]
        where = f"command line ({culprit[-1]})" if culprit else (path or "command line")
        raise ConfigError(_format_error(e, where)) from None


def dump_config(cfg: RunConfig) -> dict:
    """The config as plain data, ``${NAME}`` values as written (no expanded secrets; keys come only from the
    environment): what OUT/config.json and the W&B run config store."""
    return cfg.model_dump(mode="json")
