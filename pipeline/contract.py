"""The batch contract, pipeline side: the one place the pipeline's shared names and formats are written down.

- the data names (shard columns, mask kinds, tasks, stages), re-exported from ``data_prep.contract``, where prep
  writes them (``data_prep`` imports nothing from ``pipeline``);
- the batch built from shard rows, the one dict that flows through masks, attention and losses::

      input_ids, labels, position_ids, doc_ids, utt_ids, blk   (B, T) long
      eou                                                    (B, T) bool
      targets   (B, T) long: targets[:, t] = labels[:, t + 1], -100 at the end (shifted before any SP split)
      mask_kind list[str] of B;  rows: list[int] of B (the shard rows it came from)

- the attention implementations, the cache-policy names and their positions modes;
- ``ExportInfo``: the exported model folder's ``convsink.json``, typed, read and written in one place.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from data_prep.contract import (
    BASELINE_MASKS,
    BIGBIRD,
    BLK,
    CAUSAL,
    DIALOGUE,
    DIALOGUE_IDS,
    DIALOGUE_ROW_MASKS,
    DIALOGUE_STAGE,
    DOC_IDS,
    EOU,
    IGNORE,
    INPUT_IDS,
    LABELS,
    LMR,
    LOCAL,
    MASK_KIND,
    MASK_KINDS,
    MEMORY_STAGE,
    META_COLUMNS,
    POSITION_IDS,
    SMR,
    STAGE_KINDS,
    STAGES,
    STREAMINGLLM,
    TASKS,
    TENSOR_COLUMNS,
    UTT_IDS,
)
from data_prep.paths import read_json
from data_prep.tokenizer_loading import SpecialIds

if TYPE_CHECKING:
    import torch

__all__ = ["BASELINE_MASKS", "BIGBIRD", "BLK", "CAUSAL", "DIALOGUE", "DIALOGUE_IDS", "DIALOGUE_ROW_MASKS",
           "DIALOGUE_STAGE", "DOC_IDS", "EOU", "IGNORE", "INPUT_IDS", "LABELS", "LMR", "LOCAL", "MASK_KIND",
           "MASK_KINDS", "MEMORY_STAGE", "META_COLUMNS", "POSITION_IDS", "SMR", "STAGE_KINDS", "STAGES",
           "STREAMINGLLM", "TASKS", "TENSOR_COLUMNS", "UTT_IDS", "TARGETS", "ROWS", "ATTENTION_IMPLS", "AUTO",
           "DENSE", "SINK", "FLEX", "CACHE_POLICIES", "DENSE_CACHE", "STREAMINGLLM_CACHE", "STREAMINGDIALOGUE_CACHE",
           "RECOMPUTE_CACHE", "CACHE_POSITIONS", "ABSOLUTE", "CACHE_FRAME", "targets_from_labels",
           "batch_from_rows", "CacheSettings", "ExportInfo", "EXPORT_INFO_FILE"]

TARGETS, ROWS = "targets", "rows"  # batch keys beyond the shard columns

# -- masked attention implementations (model.attention) ----------------------------------------------------------
AUTO, DENSE, SINK, FLEX = "auto", "dense", "sink", "flex"  # dense = SDPA with an explicit T x T boolean mask
ATTENTION_IMPLS = (AUTO, DENSE, SINK, FLEX)

# -- streaming KV cache policies (chat.cache, convsink.json "cache.policy") ---------------------------------------
DENSE_CACHE, STREAMINGLLM_CACHE = "dense", STREAMINGLLM  # keep everything / sinks + recent window
STREAMINGDIALOGUE_CACHE, RECOMPUTE_CACHE = "streamingdialogue", "recompute"  # BOS + EoUs + 2 utterances / re-encode
CACHE_POLICIES = (DENSE_CACHE, STREAMINGLLM_CACHE, STREAMINGDIALOGUE_CACHE, RECOMPUTE_CACHE)
ABSOLUTE, CACHE_FRAME = "absolute", "cache"  # rotary positions: the dialogue's own numbering / index in the cache
CACHE_POSITIONS = (ABSOLUTE, CACHE_FRAME)


# -- the batch -----------------------------------------------------------------------------------------------------

def targets_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with the logits: ``targets[t] = labels[t + 1]``, -100 at the end. Shifting
    before any sequence split keeps the prediction across a shard boundary."""
    import torch

    out = torch.full_like(labels, IGNORE)
    out[:, :-1] = labels[:, 1:]
    return out


def batch_from_rows(arrays: dict, mask_kind: list, rows: list[int], real: list[bool] | None = None) -> dict:
    """The batch of shard ``rows`` (``arrays``: column -> ``(N, T)`` numpy array, ``mask_kind``: N names).
    ``real[i] = False`` marks a padding row: its targets are all ignored, so it counts nothing."""
    import numpy as np
    import torch

    batch = {c: torch.from_numpy(np.ascontiguousarray(arrays[c][rows])) for c in TENSOR_COLUMNS}
    for c in TENSOR_COLUMNS:
        batch[c] = batch[c].bool() if c == EOU else batch[c].long()
    batch[TARGETS] = targets_from_labels(batch[LABELS])
    if real is not None:
        batch[TARGETS][~torch.tensor(real)] = IGNORE
    batch[MASK_KIND] = [mask_kind[r] for r in rows]
    batch[ROWS] = list(rows)
    return batch


# -- the cache a conversation is served with ------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheSettings:
    """What a conversation's cache does: the ``cache`` section of convsink.json, or ``chat:`` of a recipe."""

    policy: str = STREAMINGDIALOGUE_CACHE
    positions: str = ABSOLUTE
    sink_tokens: int = 4
    window: int = 256

    def __post_init__(self):
        if self.policy not in CACHE_POLICIES:
            raise ValueError(f"unknown cache policy {self.policy!r}; choose one of {', '.join(CACHE_POLICIES)}")
        if self.positions not in CACHE_POSITIONS:
            raise ValueError(f"unknown cache positions {self.positions!r}; choose absolute or cache")

    @classmethod
    def resolve(cls, chat_cfg=None, info: ExportInfo | None = None, policy: str | None = None) -> "CacheSettings":
        """Precedence: ``policy`` argument > fields set explicitly in ``chat_cfg`` (recipe / overrides) > the model's
        convsink.json ``cache`` section > ``chat_cfg`` defaults."""
        exported = dict(info.cache if info is not None else {})
        values = {}
        for name, cfg_name in (("policy", "cache"), ("positions", "positions"), ("sink_tokens", "sink_tokens"),
                               ("window", "window")):
            explicit = chat_cfg is not None and cfg_name in chat_cfg.model_fields_set
            if explicit or name not in exported:
                values[name] = getattr(chat_cfg, cfg_name) if chat_cfg is not None else getattr(cls(), name)
            else:
                values[name] = exported[name]
        if policy is not None:
            values["policy"] = policy
        return cls(**values)


# -- the exported folder -------------------------------------------------------------------------------------------

EXPORT_INFO_FILE = "convsink.json"


@dataclass(frozen=True)
class ExportInfo:
    """``convsink.json`` of an exported model folder: what plain transformers does not know about the model.

    The shard manifest's tokenizer section names the same ids ``bos_id`` / ``eou_id`` / ``pad_id``
    (``from_manifest`` is the one translation)."""

    bos_token_id: int  # the attention sink that opens every dialogue
    eou_token_id: int  # the End-of-Utterance token (the conversational attention sink)
    pad_token_id: int
    eou_token: str | None = None  # its text
    mask: dict = field(default_factory=dict)  # the model.mask section it was trained with
    cache: dict = field(default_factory=dict)  # the chat cache it is served with (policy, positions, sink_tokens, window)
    source: dict | None = None  # the checkpoint and stage it was exported from
    version: int = 1
    layout: dict = field(default_factory=dict)  # the data layout it was trained on: template, train_on, pin_system

    @property
    def special_ids(self) -> SpecialIds:
        return SpecialIds(bos=self.bos_token_id, eou=self.eou_token_id, pad=self.pad_token_id)

    @classmethod
    def from_manifest(cls, tokenizer: dict, **fields) -> "ExportInfo":
        """From the ``tokenizer`` section of a shard manifest (``bos_id``, ``eou_id``, ``pad_id``)."""
        return cls(bos_token_id=tokenizer["bos_id"], eou_token_id=tokenizer["eou_id"], pad_token_id=tokenizer["pad_id"],
                   **fields)

    def to_json(self) -> dict:
        """The file's content, keys in a fixed order (``source`` only when known)."""
        out = {"version": self.version, "bos_token_id": self.bos_token_id, "eou_token_id": self.eou_token_id,
               "pad_token_id": self.pad_token_id, "eou_token": self.eou_token, "mask": self.mask, "cache": self.cache}
        out = out if not self.layout else dict(out, layout=self.layout)
        return out if self.source is None else dict(out, source=self.source)

    def write(self, folder: str) -> None:
        with open(os.path.join(folder, EXPORT_INFO_FILE), "w") as f:
            json.dump(self.to_json(), f, indent=2)

    @classmethod
    def read(cls, model_dir: str) -> "ExportInfo":
        """The checked ``convsink.json`` of an exported folder; errors are one line naming the file."""
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"{model_dir}: model folder not found")
        path = os.path.join(model_dir, EXPORT_INFO_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{model_dir}: no {EXPORT_INFO_FILE} (export a run with `convsink export`, or use --model smollm2)")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise FileNotFoundError(f"{model_dir}: no config.json (not a Hugging Face model folder)")
        raw = read_json(path, dict, EXPORT_INFO_FILE)
        missing = [k for k in ("bos_token_id", "eou_token_id") if not isinstance(raw.get(k), int)]
        if missing:
            raise ValueError(f"{path}: missing or non-integer {', '.join(missing)}")
        known = {k: raw[k] for k in ("eou_token", "mask", "cache", "source", "version", "layout") if k in raw}
        pad = raw.get("pad_token_id")
        return cls(bos_token_id=raw["bos_token_id"], eou_token_id=raw["eou_token_id"],
                   pad_token_id=pad if isinstance(pad, int) else raw["eou_token_id"], **known)
