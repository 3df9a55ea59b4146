"""``convsink chat``: a multi-turn conversation on an exported model (see ``pipeline.modeling.loader``) with a
streaming KV cache; reply tokens are printed as they are generated.
"""

from __future__ import annotations

import sys

import torch

from data_prep.tokenizer_loading import encode_utterance
from pipeline.config import ChatConfig
from pipeline.contract import CacheSettings
from pipeline.inference.chat_turns import TurnEncoder
from pipeline.inference.conversation import Conversation
from pipeline.modeling.loader import load_chat_model


def encode(tokenizer, text: str) -> list[int]:
    """An utterance's token ids: no special tokens added (method.md §1)."""
    return encode_utterance(tokenizer, text)


def open_conversation(model, tok, info, settings: CacheSettings, system_prompt: str | None = None
                      ) -> tuple[Conversation, TurnEncoder]:
    """A conversation in the layout the model was trained on (convsink.json ``layout``): with the chat template,
    its opening system turn (``system_prompt``, else the template's own) is pinned with BOS (or added as the first
    utterance, without ``pin_system``); plain: ``system_prompt`` is the first utterance."""
    turns_in = TurnEncoder(tok, info.layout)
    system, opening = turns_in.opening(system_prompt)
    conv = Conversation.from_settings(model, info, settings, system=system)
    for utterance in opening:
        conv.add_utterance(utterance, all_logits=False)
    return conv, turns_in


def user_turn(conv: Conversation, turns_in: TurnEncoder, text: str):
    """Feed the user's utterance, then the reply's opening (the assistant header under the chat template; the user's
    turn too when the template does not close user turns); returns the logits the reply starts from (None: the
    conversation's last logits)."""
    utterance = turns_in.user(text)
    if utterance is not None:
        conv.add_utterance(utterance, all_logits=False)
    logits = None
    for t in turns_in.reply_prefix():
        logits = conv.feed_token(t)
    return logits


def format_cache(info: dict) -> str:
    return (f"[cache: {info['positions']} positions ({info['pinned']} pinned), {info['kv_bytes']} bytes K/V ({info['kv_bytes'] / 1024:.1f} KiB), "
            f"{info['policy']}, after {info['utterances']} utterances / {info['conversation_tokens']} tokens]")


def run_chat(model_dir: str, turns: list[str] | None, cfg: ChatConfig, show_cache: bool = False, out=sys.stdout) -> list[str]:
    """Chat: ``turns`` are the user's utterances (None = read them from stdin until EOF or an empty line).
    Reply tokens are printed as they are generated; returns the replies (one per user turn).

    The cache follows ``cfg`` where its fields were set explicitly (recipe or overrides), else the model's
    convsink.json ``cache`` section, else ``cfg``'s defaults. Greedy at temperature 0, else sampled with ``cfg.seed``."""
    model, tok, info = load_chat_model(model_dir)
    settings = CacheSettings.resolve(cfg, info)
    conv, turns_in = open_conversation(model, tok, info, settings, cfg.system)
    generator = torch.Generator().manual_seed(cfg.seed)
    replies = []
    source = iter(turns) if turns is not None else _stdin_turns(out)
    for user in source:
        logits = user_turn(conv, turns_in, user)
        out.write("model: ")
        out.flush()
        printed = [""]

        def on_token(ids):
            text = tok.decode(ids, skip_special_tokens=True)
            if text.startswith(printed[0]):  # print only the new characters (a token may complete a character)
                out.write(text[len(printed[0]):])
                out.flush()
                printed[0] = text

        reply_ids = conv.generate(logits, cfg.max_new_tokens, cfg.temperature, cfg.top_k, generator, on_token)
        reply = tok.decode(reply_ids, skip_special_tokens=True)
        out.write((reply[len(printed[0]):] if reply.startswith(printed[0]) else "\n" + reply) + "\n")
        if show_cache:
            out.write(format_cache(conv.cache_info()) + "\n")
        out.flush()
        replies.append(reply)
        turns_in.replied(reply)
    return replies


def _stdin_turns(out):
    while True:
        out.write("you: ")
        out.flush()
        line = sys.stdin.readline()
        if not line or not line.strip():
            return
        yield line.strip()
