"""A model trained with data.template=chat: convsink.json records the layout, chat renders turns with the model's
chat template (the generation prompt of plain transformers), replies end at the end-of-turn token, and the
exported tokenizer's chat template works in plain transformers."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from data_prep.config import DataConfig
from pipeline.config import ChatConfig
from pipeline.contract import CacheSettings, ExportInfo
from pipeline.inference.chat import open_conversation, run_chat, user_turn
from pipeline.modeling.export import layout_of
from pipeline.modeling.loader import export_random_model, load_chat_model

pytestmark = pytest.mark.usefixtures("one_thread")
LAYOUT = {"template": "chat", "train_on": "assistant", "pin_system": True}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    out = str(export_random_model(str(tmp_path_factory.mktemp("chatlayout") / "tiny")))
    dataclasses.replace(ExportInfo.read(out), layout=LAYOUT).write(out)
    return out


def test_export_records_the_layout_in_convsink_json(chat_model):
    assert layout_of(DataConfig(template="chat", train_on="assistant")) == LAYOUT
    assert layout_of(DataConfig())["template"] == "plain"
    assert ExportInfo.read(chat_model).layout == LAYOUT
    assert ExportInfo.read(chat_model).to_json()["layout"] == LAYOUT


def test_chat_feeds_what_apply_chat_template_renders_and_replies_end_at_end_of_turn(chat_model):
    model, tok, info = load_chat_model(chat_model)
    conv, turns_in = open_conversation(model, tok, info, CacheSettings("dense"))
    logits = user_turn(conv, turns_in, "Hello, who are you?")
    fed = [h[0] for h in conv.history]
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello, who are you?"}], tokenize=True,
                                     add_generation_prompt=True)["input_ids"]
    assert fed == list(prompt)
    utt = [h[1] for h in conv.history]
    system_end = fed.index(info.eou_token_id)
    assert set(utt[:system_end + 1]) == {0}  # SmolLM2's default system turn is pinned with the sink
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    assert info.eou_token_id == conv.eou_id == end_of_turn
    reply = conv.generate(logits, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert end_of_turn not in reply and conv.history[-1][0] == end_of_turn and conv.history[-1][2]
    turns_in.replied(tok.decode(reply))
    before = len(conv.history)
    user_turn(conv, turns_in, "Nice.")
    second = tok.decode([h[0] for h in conv.history[before:]])
    assert second == "\n<|im_start|>user\nNice.<|im_end|>\n<|im_start|>assistant\n"


def test_run_chat_on_a_chat_layout_model_replies_per_turn(chat_model):
    out = io.StringIO()
    replies = run_chat(chat_model, ["Hi!", "How are you?"], ChatConfig(max_new_tokens=4), out=out)
    assert len(replies) == 2 and out.getvalue().count("model: ") == 2


def test_exported_tokenizer_keeps_its_chat_template(chat_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)["input_ids"]
    assert tok.decode(ids).startswith("<|im_start|>system\n") and "<|im_start|>user\nhi<|im_end|>" in tok.decode(ids)


def test_eval_encodes_references_with_the_chat_template(chat_model):
    from data_prep.schema import Dialogue, Turn
    from pipeline.evaluation.perplexity import tokenized

    _, tok, info = load_chat_model(chat_model)
    turns = (Turn("A", "Hi, I like tea."), Turn("B", "Me too!"), Turn("A", "Green or black?"))
    [(_, system, utts)] = tokenized(tok, [Dialogue("d", turns)], 4096, info.layout)
    assert system is not None and tok.decode(system).startswith("system\nYou are")  # SmolLM2's own (<|im_start|> is the sink)
    laid = [info.bos_token_id] + system + [info.eou_token_id] + [t for u in utts for t in list(u) + [info.eou_token_id]]
    messages = [{"role": r, "content": t.text} for r, t in zip(("user", "assistant", "user"), turns)]
    assert laid == list(tok.apply_chat_template(messages, tokenize=True)["input_ids"])[:-1]  # A/B alternate user/assistant
    [(_, none, bare)] = tokenized(tok, [Dialogue("d", turns)], 4096, None)
    assert none is None and tok.decode(bare[0]) == "Hi, I like tea."


def test_eval_pins_the_system_turn_and_the_cache_scores_what_the_full_forward_scores(chat_model, shared_data):
    """eval lays a system turn out as prep does (``[BOS] system EoU`` at utterance 0, never scored): perplexity under
    the dialogue mask equals the StreamingDialogue cache's, with a cache far smaller than the dialogue, so the
    prompt was kept; without pin_system the same turn is an ordinary (conditioning) first utterance."""
    from data_prep.adapters import iter_dialogues
    from data_prep.schema import Dialogue, Turn
    from pipeline.evaluation.perplexity import cache_perplexity, perplexity, tokenized

    model, tok, info = load_chat_model(chat_model)
    msc = next(d for d in iter_dialogues(str(shared_data / "msc" / "session_3_test.jsonl"), "msc") if len(d.turns) >= 12)
    d = Dialogue("sys", (Turn("system", "You are a support agent. Ask for the order number first."),) + msc.turns[:12])
    [(_, system, utts)] = tokenized(tok, [d], 4096, info.layout)
    assert "order number" in tok.decode(system) and len(utts) == 12
    full = perplexity(model, tok, [d], info.special_ids, "dialogue", 4096, info.mask, info.layout)
    settings = CacheSettings("streamingdialogue", window=16)
    streamed = cache_perplexity(model, tok, [d], info, settings, 4096)
    assert full["tokens"] == streamed["tokens"] == sum(len(u) + 1 for u in utts[1:])
    assert streamed["mean_nll"] == pytest.approx(full["mean_nll"], abs=1e-4)
    unpinned = dict(info.layout, pin_system=False)
    [(_, none, utts_unpinned)] = tokenized(tok, [d], 4096, unpinned)
    assert none is None and utts_unpinned[0] == system and utts_unpinned[1:] == utts


def test_eval_generation_continues_a_history_in_the_chat_layout(chat_model):
    from pipeline.inference.chat_turns import TurnEncoder

    _, tok, info = load_chat_model(chat_model)
    history = ["Hi, I like tea.", "Me too!", "Green or black?"]
    utterances, opening = TurnEncoder(tok, info.layout).continuation(history)
    system, before = TurnEncoder(tok, info.layout).opening()
    laid = [info.bos_token_id] + system + [info.eou_token_id]
    laid += [t for u in before + utterances for t in list(u) + [info.eou_token_id]] + opening
    messages = [{"role": r, "content": t} for r, t in zip(("user", "assistant", "user"), history)]
    assert laid == list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])
    assert TurnEncoder(tok, None).continuation(history)[1] == []


def test_a_system_prompt_replaces_the_templates_own_and_stays_pinned_in_a_small_cache(chat_model):
    model, tok, info = load_chat_model(chat_model)
    prompt = "You are the support agent of a hiking shop. Ask for the order number first."
    conv, turns_in = open_conversation(model, tok, info, CacheSettings("streamingdialogue"), prompt)
    fed = tok.decode([h[0] for h in conv.history])
    expected = tok.apply_chat_template([{"role": "system", "content": prompt}], tokenize=False)
    assert fed == expected.rstrip("\n") and "SmolLM" not in fed  # the template's default system turn is replaced
    pinned = conv.pinned
    assert pinned == len(conv.history) and {h[1] for h in conv.history} == {0}
    for text in ("Hi there, I need help with my boots.", "They leak after a week.", "Order 1234.") * 3:
        user_turn(conv, turns_in, text)
        conv.generate(None, max_new_tokens=3, generator=torch.Generator().manual_seed(0))
        turns_in.replied("ok")
    assert conv.cache_info()["pinned"] == pinned and conv.cache_info()["positions"] < len(conv.history)
    assert tok.decode([h[0] for h in conv.history if h[1] == 0]) == fed  # still utterance 0, never evicted
    user_turn(conv, turns_in, "Thanks.")
    tail = tok.decode([h[0] for h in conv.history[-12:]])
    assert tail.endswith("<|im_start|>user\nThanks.<|im_end|>\n<|im_start|>assistant\n")


def test_convsink_chat_takes_a_system_prompt(chat_model, tmp_path):
    import subprocess
    import sys

    turns = tmp_path / "turns.txt"
    turns.write_text("Hello!\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "chat", "--model", chat_model, "--prompt-file",
                           str(turns), "--system", "Answer in French.", "--show-cache", "chat.max_new_tokens=2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, tok, info = load_chat_model(chat_model)
    pinned = open_conversation(model, tok, info, CacheSettings(), "Answer in French.")[0].pinned
    assert pinned != open_conversation(model, tok, info, CacheSettings())[0].pinned  # not the template's own prompt
    assert proc.stdout.count("model: ") == 1 and f"positions ({pinned} pinned)" in proc.stdout, proc.stdout


def test_plain_layout_takes_a_system_prompt_as_its_first_utterance(tmp_path):
    model_dir = str(export_random_model(str(tmp_path / "plain")))
    model, tok, info = load_chat_model(model_dir)
    conv, _ = open_conversation(model, tok, info, CacheSettings("streamingdialogue"), "Be brief.")
    assert conv.pinned == 1 and tok.decode([h[0] for h in conv.history if h[1] == 1]) == "Be brief." + tok.decode([info.eou_token_id])
