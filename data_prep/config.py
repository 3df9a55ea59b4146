"""The data section of a recipe. ``pipeline.config`` composes it; data_prep needs nothing else."""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_serializer, model_validator

from data_prep.contract import ROLES

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")  # ``${NAME}`` in a string value of a recipe


def env_refs(value) -> list[str]:
    """The environment variables a config value (a string, or a list of them) refers to as ``${NAME}``."""
    if isinstance(value, str):
        return ENV_REF.findall(value)
    if isinstance(value, list):
        return [name for v in value for name in env_refs(v)]
    return []


def expand_env(value):
    """``value`` with every ``${NAME}`` whose variable is set replaced by it (an unset one is left as written, so
    opening the value names it)."""
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    return ENV_REF.sub(lambda m: os.environ.get(m.group(1), m.group(0)), value) if isinstance(value, str) else value


class Strict(BaseModel):
    """Base for config sections: unknown keys and wrong types are errors (strict: no ``"20"`` or ``20.0`` for an
    int, no ``1`` or ``"true"`` for a bool; an int is a fine float), values are re-validated on assignment.

    ``${NAME}`` in a string value is expanded when the section is validated (the code that opens things sees the
    value) and kept as written in every dump (``model_dump``/``model_dump_json``: what config.json, the W&B config
    and the manifest store), unless code has since set the field to another value."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)
    _as_written: dict = PrivateAttr(default_factory=dict)  # field -> (value as written, value expanded then)

    @model_validator(mode="wrap")
    @classmethod
    def _expand_env_refs(cls, data, handler):
        written = {}
        if isinstance(data, dict):
            written = {k: (v, expand_env(v)) for k, v in data.items() if k in cls.model_fields and env_refs(v)}
            data = {k: written[k][1] if k in written else v for k, v in data.items()}
        section = handler(data)
        if written:
            section._as_written = {**section._as_written, **written}
        return section

    @model_serializer(mode="wrap")
    def _dump_as_written(self, handler):
        out = handler(self)
        for k, (raw, expanded) in self._as_written.items():
            if k in out and getattr(self, k) == expanded:
                out[k] = raw
        return out


class SMRConfig(Strict):
    utterances_per_sample: int = Field(28, ge=1, description="s: unrelated utterances (each followed by its copy) per SMR sample")
    samples: int = Field(0, ge=0, description="SMR samples to build (0 = none)")
    max_utterance_tokens: int | None = Field(None, ge=1, description="draw only utterances of at most this many tokens (None = any that fits seq_len; a curriculum knob for small models)")


class LMRConfig(Strict):
    pairs_per_sample: int = Field(24, ge=1, description="l: consecutive (query, response) pairs per LMR sample")
    samples: int = Field(0, ge=0, description="LMR samples to build (0 = none)")
    supervise_repeated_response: bool = Field(False, description="also put loss on the repeated response (paper text); reference: query only")


class ChatColumns(Strict):
    messages: str | None = Field(None, description="the list of messages (default: conversations for sharegpt, messages for messages)")
    role: str | None = Field(None, description="a message's role (default: from / role)")
    content: str | None = Field(None, description="a message's text (default: value / content)")
    system: str | None = Field(None, description="a top-level system prompt, put first as a system turn (default: system)")
    id: str | None = Field(None, description="the dialogue id (default: id; none = FILE:LINE or DATASET[row N])")


class DataConfig(Strict):
    tokenizer: str = Field("smollm2", description="'smollm2' (bundled, no download) or a path to a Hugging Face tokenizer folder")
    format: Literal["auto", "canonical", "personachat", "msc", "messages", "sharegpt", "hf"] = Field("auto", description="input format: auto (from the first line, a .parquet/.arrow suffix, a save_to_disk folder or hf://ID), a record format, or hf = any file read through Hugging Face datasets")
    columns: ChatColumns | None = Field(None, description="sharegpt/messages: field names of your data when they differ from the format's (LLaMA-Factory dataset_info columns/tags)")
    roles: dict[str, Literal[ROLES]] = Field(default_factory=dict, description="sharegpt/messages: your role names -> system, user, assistant or tool (added to the built-in ones, e.g. human -> user)")
    eou: Literal["eos", "new"] = Field("eos", description="End-of-Utterance token: the tokenizer's EOS, or a new special token")
    eou_token: str = Field("<|eou|>", description="the new special token's text when eou=new")
    speaker_tags: bool = Field(False, description="prefix each utterance with its speaker ('A: ...')")
    template: Literal["plain", "chat"] = Field("plain", description="plain = the paper's layout of bare utterances; chat = each turn rendered by the tokenizer's own chat template, EoU = its end-of-turn token")
    train_on: Literal["all", "assistant"] | list[Literal["system", "user", "assistant", "tool"]] = Field("all", description="template=chat: roles whose content (and EoU) carries loss: all, assistant, or a list of roles")
    pin_system: bool | None = Field(None, description="template=chat: lay out a leading system turn with BOS as utterance 0, a sink (None = on with chat)")
    seq_len: int = Field(1024, ge=8, description="tokens per packed training sequence")
    max_dialogues: int | None = Field(None, ge=1, description="use at most this many dialogues per input file (None = all)")
    packing: Literal["ffd_fill", "ffd"] = Field("ffd_fill", description="ffd = first-fit-decreasing; ffd_fill = FFD, then its loose bins repacked by bin completion (never more sequences than FFD)")
    shard_rows: int = Field(512, ge=1, description="sequences per Parquet shard")
    on_bad_record: Literal["error", "skip"] = Field("error", description="stop at the first bad record, or quarantine it in rejected.jsonl")
    seed: int = Field(0, description="seed for memory-task sampling")
    engine: Literal["ray", "local"] = Field("ray", description="ray = Ray Data pipeline on an embedded local Ray (or the cluster of RAY_ADDRESS); local = the single-process reference loop")
    workers: int | None = Field(None, ge=1, description="Ray workers = parallel tasks and CPUs of an embedded Ray (None = all CPUs)")
    chunk_records: int | None = Field(None, ge=1, description="input records per Ray read/tokenize task (None = about 4 tasks per worker, 16 to 2048 records each; the output never depends on it)")
    memory_chunk: int = Field(512, ge=1, description="SMR/LMR samples per Ray task (the output never depends on it)")
    smr: SMRConfig = Field(default_factory=SMRConfig, description="short-memory reconstruction samples")
    lmr: LMRConfig = Field(default_factory=LMRConfig, description="long-memory reactivation samples")
