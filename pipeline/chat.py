"""``convsink chat``: a multi-turn conversation on an exported model with a streaming KV cache.

An exported model folder (``convsink export``) holds ``config.json``, ``model.safetensors``, the tokenizer files and
``convsink.json``::

    {"bos_token_id": int, "eou_token_id": int, "pad_token_id": int, "eou_token": str, "mask": {...},
     "cache": {"policy": "streamingdialogue", "positions": "absolute", "sink_tokens": 4, "window": 256},
     "version": 1}

Two names need no folder: ``smollm2`` (the bundled SmolLM2-135M-Instruct, EoU = its EOS ``<|im_end|>``, not
trained for sinks) and ``tiny`` (a random 2-layer, hidden-64 Llama with the SmolLM2 tokenizer, built once into the
convsink cache folder: for smoke runs and benchmarks).
"""

from __future__ import annotations

import json
import os
import sys

import torch

from .cache import CacheSettings, Conversation
from .config import ChatConfig

REQUIRED_KEYS = ("bos_token_id", "eou_token_id")


def read_convsink_json(model_dir: str) -> dict:
    """convsink.json of an exported folder, checked; errors are one line naming the file."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: model folder not found")
    path = os.path.join(model_dir, "convsink.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{model_dir}: no convsink.json (export a run with `convsink export`, or use --model smollm2)")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir}: no config.json (not a Hugging Face model folder)")
    try:
        with open(path) as f:
            info = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(info.get(k), int)]
    if missing:
        raise ValueError(f"{path}: missing or non-integer {', '.join(missing)}")
    info.setdefault("pad_token_id", info["eou_token_id"])
    return info


def export_random_model(out_dir: str, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                        cache: CacheSettings | None = None) -> str:
    """Write a random-init Llama (SmolLM2 tokenizer, EoU = its EOS) as an exported folder, per the contract above:
    for tests, smoke runs and inference benchmarks. The saved config says sdpa, like a real export."""
    from data_prep.tokenizer import load_tokenizer, prepare_tokenizer

    from .config import MaskConfig, ModelConfig
    from .model import build_model

    tok = load_tokenizer("smollm2")
    ids = prepare_tokenizer(tok)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_layers=num_layers),
                        len(tok), ids).eval()
    model.config._attn_implementation = "sdpa"
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    c = cache or CacheSettings()
    info = {"version": 1, "bos_token_id": ids.bos, "eou_token_id": ids.eou, "pad_token_id": ids.pad,
            "eou_token": tok.convert_ids_to_tokens(ids.eou), "mask": MaskConfig().model_dump(),
            "cache": {"policy": c.policy, "positions": c.positions, "sink_tokens": c.sink_tokens, "window": c.window}}
    with open(os.path.join(out_dir, "convsink.json"), "w") as f:
        json.dump(info, f, indent=2)
    return out_dir


def tiny_model_dir() -> str:
    """The ``tiny`` model: built once (seed 0) into the convsink cache folder."""
    import shutil

    from data_prep.tokenizer import cache_dir

    out = os.path.join(cache_dir(), "tiny-random-llama-h64-l2")
    if os.path.isfile(os.path.join(out, "convsink.json")):
        return out
    tmp = f"{out}.tmp-{os.getpid()}"
    export_random_model(tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_chat_model(model_dir: str):
    """(model with the 'convsink' attention, tokenizer, convsink.json dict) from an exported folder, 'smollm2' or
    'tiny'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .attention import register

    if model_dir == "smollm2":
        from data_prep.tokenizer import load_tokenizer, prepare_tokenizer

        from .model import smollm2_model_dir

        ids = prepare_tokenizer(load_tokenizer("smollm2"))
        model_dir = smollm2_model_dir()
        info = {"bos_token_id": ids.bos, "eou_token_id": ids.eou, "pad_token_id": ids.pad}
    else:
        if model_dir == "tiny":
            model_dir = tiny_model_dir()
        info = read_convsink_json(model_dir)
    register()
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="convsink").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer, info


def encode(tokenizer, text: str) -> list[int]:
    """An utterance's token ids: no special tokens added (method.md §1)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def format_cache(info: dict) -> str:
    return (f"[cache: {info['positions']} positions, {info['kv_bytes']} bytes K/V ({info['kv_bytes'] / 1024:.1f} KiB), "
            f"{info['policy']}, after {info['utterances']} utterances / {info['conversation_tokens']} tokens]")


def run_chat(model_dir: str, turns: list[str] | None, cfg: ChatConfig, show_cache: bool = False, out=sys.stdout) -> list[str]:
    """Chat: ``turns`` are the user's utterances (None = read them from stdin until EOF or an empty line).
    Reply tokens are printed as they are generated; returns the replies (one per user turn).

    The cache follows ``cfg`` where its fields were set explicitly (recipe or overrides), else the model's
    convsink.json ``cache`` section, else ``cfg``'s defaults. Greedy at temperature 0, else sampled with ``cfg.seed``."""
    model, tok, info = load_chat_model(model_dir)
    settings = CacheSettings.resolve(cfg, info)
    conv = Conversation.from_settings(model, info, settings)
    generator = torch.Generator().manual_seed(cfg.seed)
    replies = []
    source = iter(turns) if turns is not None else _stdin_turns(out)
    for user in source:
        conv.add_utterance(encode(tok, user), all_logits=False)
        out.write("model: ")
        out.flush()
        printed = [""]

        def on_token(ids):
            text = tok.decode(ids, skip_special_tokens=True)
            if text.startswith(printed[0]):  # print only the new characters (a token may complete a character)
                out.write(text[len(printed[0]):])
                out.flush()
                printed[0] = text

        reply_ids = conv.generate(None, cfg.max_new_tokens, cfg.temperature, cfg.top_k, generator, on_token)
        reply = tok.decode(reply_ids, skip_special_tokens=True)
        out.write((reply[len(printed[0]):] if reply.startswith(printed[0]) else "\n" + reply) + "\n")
        if show_cache:
            out.write(format_cache(conv.cache_info()) + "\n")
        out.flush()
        replies.append(reply)
    return replies


def _stdin_turns(out):
    while True:
        out.write("you: ")
        out.flush()
        line = sys.stdin.readline()
        if not line or not line.strip():
            return
        yield line.strip()
