"""``convsink chat``: a multi-turn conversation on an exported model with a streaming KV cache."""

from __future__ import annotations

import json
import os
import sys

import torch

from .cache import Conversation
from .config import ChatConfig


def load_chat_model(model_dir: str):
    """(model with the 'convsink' attention, tokenizer, convsink.json) from an exported folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .attention import register

    if model_dir == "smollm2":  # the bundled real small model, untrained for sinks: EoU = its EOS <|im_end|>
        from data_prep.tokenizer import load_tokenizer, prepare_tokenizer

        from .model import smollm2_model_dir

        ids = prepare_tokenizer(load_tokenizer("smollm2"))
        model_dir = smollm2_model_dir()
        info = {"bos_token_id": ids.bos, "eou_token_id": ids.eou, "pad_token_id": ids.pad}
    else:
        info_path = os.path.join(model_dir, "convsink.json")
        if not os.path.isfile(info_path):
            raise FileNotFoundError(f"{model_dir}: no convsink.json (export a run with `convsink export`, or use --model smollm2)")
        with open(info_path) as f:
            info = json.load(f)
    register()
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="convsink").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer, info


def run_chat(model_dir: str, turns: list[str] | None, cfg: ChatConfig, show_cache: bool = False, out=sys.stdout) -> list[str]:
    """Chat: ``turns`` are the user's utterances (None = read them from stdin until EOF or an empty line).
    Reply tokens are printed as they are generated; returns the replies."""
    model, tok, info = load_chat_model(model_dir)
    conv = Conversation(model, info["bos_token_id"], info["eou_token_id"], policy=cfg.cache, positions=cfg.positions,
                        sink_tokens=cfg.sink_tokens, window=cfg.window)
    generator = torch.Generator().manual_seed(cfg.seed)
    replies = []
    source = iter(turns) if turns is not None else _stdin_turns(out)
    for user in source:
        logits = conv.add_utterance(tok(user, add_special_tokens=False)["input_ids"])[-1]
        out.write("model: ")
        out.flush()
        printed = [""]

        def on_token(ids):
            text = tok.decode(ids, skip_special_tokens=True)
            out.write(text[len(printed[0]):])
            out.flush()
            printed[0] = text

        reply_ids = conv.generate(logits, cfg.max_new_tokens, cfg.temperature, cfg.top_k, generator, on_token)
        reply = tok.decode(reply_ids, skip_special_tokens=True)
        out.write(reply[len(printed[0]):] + "\n")
        if show_cache:
            c = conv.cache_info()
            out.write(f"[cache: {c['positions']} positions, {c['kv_bytes'] / 1024:.1f} KiB after {c['utterances']} utterances]\n")
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
