"""``convsink chat``: a multi-turn conversation on an exported model (see ``pipeline.modeling.loader``) with a
streaming KV cache; reply tokens are printed as they are generated.
"""

from __future__ import annotations

import sys

import torch

from data_prep.tokenizer_loading import encode_utterance
from pipeline.config import ChatConfig
from pipeline.contract import CacheSettings
from pipeline.inference.conversation import Conversation
from pipeline.modeling.loader import load_chat_model


def encode(tokenizer, text: str) -> list[int]:
    """An utterance's token ids: no special tokens added (method.md §1)."""
    return encode_utterance(tokenizer, text)


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
