"""``run_chat`` on a tiny exported model: one printed reply per user turn, the cache size the policy defines after
every turn, convsink.json's cache section as the default, seeded sampling, stdin mode, one-line errors."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch

from pipeline.config import ChatConfig
from pipeline.contract import CacheSettings
from pipeline.inference.chat import encode, run_chat
from pipeline.inference.conversation import Conversation
from pipeline.modeling.loader import export_random_model, load_chat_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only cost here


TURNS = ["Hi there, how are you?", "I love hiking in the mountains with my dog.", "What did I say I love?"]
CACHE_LINE = re.compile(r"^\[cache: (\d+) positions \(\d+ pinned\), (\d+) bytes K/V .*, (\w+), after (\d+) utterances / (\d+) tokens\]$")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return str(export_random_model(str(tmp_path_factory.mktemp("chat") / "tiny")))


@pytest.fixture(scope="module")
def exported_dense(tmp_path_factory):
    return str(export_random_model(str(tmp_path_factory.mktemp("chat") / "tiny-dense"), cache=CacheSettings("dense")))


def cache_lines(text: str) -> list[tuple]:
    out = []
    for line in text.splitlines():
        m = CACHE_LINE.match(line)
        if m:
            out.append((int(m[1]), int(m[2]), m[3], int(m[4]), int(m[5])))
    return out


def test_three_turns_three_printed_replies_and_exact_cache_size(exported):
    out = io.StringIO()
    cfg = ChatConfig(max_new_tokens=6)
    replies = run_chat(exported, TURNS, cfg, show_cache=True, out=out)
    text = out.getvalue()
    assert len(replies) == 3 and text.count("model: ") == 3
    for r in replies:
        assert r in text
    lines = cache_lines(text)
    assert len(lines) == 3

    # replay the same conversation through the Python API (greedy: the same reply tokens)
    model, tok, info = load_chat_model(exported)
    conv = Conversation.from_settings(model, info, CacheSettings())
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for turn, (user, reply, line) in enumerate(zip(TURNS, replies, lines), start=1):
        user_ids = encode(tok, user)
        conv.add_utterance(user_ids)
        reply_ids = conv.generate(None, cfg.max_new_tokens)
        assert tok.decode(reply_ids, skip_special_tokens=True) == reply
        T = 2 * turn  # finished utterances after this turn
        positions, kv_bytes, policy, utterances, tokens = line
        assert (policy, utterances) == ("streamingdialogue", T)
        assert positions == 1 + T + len(user_ids) + len(reply_ids)  # BOS + EoUs + the last two utterances
        assert kv_bytes == positions * layers * 2 * kv_heads * head_dim * 4  # K and V, float32
        assert tokens == conv.next_position


def test_convsink_json_cache_section_is_the_default(exported_dense):
    out = io.StringIO()
    run_chat(exported_dense, TURNS[:2], ChatConfig(max_new_tokens=4), show_cache=True, out=out)
    for positions, _, policy, _, tokens in cache_lines(out.getvalue()):
        assert policy == "dense" and positions == tokens  # dense keeps every token
    out = io.StringIO()  # a policy set explicitly (recipe / --cache) wins over the model's default
    run_chat(exported_dense, TURNS[:2], ChatConfig.model_validate({"cache": "streamingdialogue", "max_new_tokens": 4}),
             show_cache=True, out=out)
    lines = cache_lines(out.getvalue())
    assert lines[-1][2] == "streamingdialogue" and lines[-1][0] < lines[-1][4]


def test_sampling_is_seeded(exported):
    def chat(seed):
        return run_chat(exported, TURNS[:2], ChatConfig(max_new_tokens=6, temperature=1.0, seed=seed), out=io.StringIO())

    first = chat(3)
    assert chat(3) == first
    assert chat(4) != first
    greedy = run_chat(exported, TURNS[:2], ChatConfig(max_new_tokens=6), out=io.StringIO())
    assert greedy != first


def test_interactive_reads_stdin_until_an_empty_line(exported, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhow are you?\n\nnever read\n"))
    out = io.StringIO()
    replies = run_chat(exported, None, ChatConfig(max_new_tokens=3), out=out)
    assert len(replies) == 2 and out.getvalue().count("you: ") == 3


@pytest.mark.parametrize("case", ["no_dir", "no_json", "bad_json", "no_ids"])
def test_bad_model_folder_is_one_line_error_naming_it(exported, tmp_path, capsys, case):
    from pipeline.cli import main

    target = tmp_path / "m"
    if case != "no_dir":
        target.mkdir()
        (target / "config.json").write_text("{}")
    if case == "bad_json":
        (target / "convsink.json").write_text("{not json")
    if case == "no_ids":
        (target / "convsink.json").write_text(json.dumps({"bos_token_id": 1}))
    assert main(["chat", "--model", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(target) in err
    assert {"no_dir": "model folder not found", "no_json": "no convsink.json", "bad_json": "not valid JSON",
            "no_ids": "eou_token_id"}[case] in err


def test_reply_hits_max_new_tokens_then_eou_is_appended(exported):
    model, tok, info = load_chat_model(exported)
    conv = Conversation.from_settings(model, info, CacheSettings())
    conv.add_utterance(encode(tok, TURNS[0]))
    n = conv.next_position
    reply = conv.generate(None, 4, min_new_tokens=4)
    assert len(reply) == 4 and conv.next_position == n + 5 and not conv.in_utterance
    assert conv.history[-1][0] == info.eou_token_id and bool(conv.store.eou[-1])
    assert torch.isfinite(conv.last_logits).all()
