"""The StreamingDialogue cache: streamed logits equal one full forward with the dialogue mask; the cache holds
exactly BOS + every EoU + the last two utterances; chat runs on an exported model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from data_prep.adapters import iter_dialogues
from data_prep.layout import layout_dialogue
from data_prep.tokenizer_loading import SpecialIds
from pipeline.attention.masks import dense_mask
from pipeline.attention.registry import DenseMaskAttention
from pipeline.inference.conversation import Conversation
from tests.repo import REPO


@pytest.fixture(scope="module")
def msc_conversation(tokenizer, shared_data):
    for d in iter_dialogues(str(shared_data / "msc" / "session_3_test.jsonl"), "msc"):
        if len(d.turns) >= 40:
            return [tokenizer(t.text, add_special_tokens=False)["input_ids"] for t in d.turns[:40]]
    raise AssertionError("no 40-turn MSC episode")


def full_forward(model, utterances, ids: SpecialIds):
    lay = layout_dialogue("x", utterances, ids)
    meta = {"doc_ids": torch.zeros(1, len(lay), dtype=torch.long), "utt_ids": torch.tensor([lay.utt_ids]),
            "eou": torch.tensor([lay.eou])}
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([lay.input_ids]), position_ids=torch.arange(len(lay))[None],
                       convsink_attn=DenseMaskAttention(dense_mask("dialogue", meta))).logits[0]
    return logits, lay


def test_streamed_logits_equal_full_dialogue_mask_forward(model_and_ids, msc_conversation):
    model, ids = model_and_ids
    full, lay = full_forward(model, msc_conversation, ids)
    conv = Conversation(model, ids.bos, ids.eou, "streamingdialogue")
    pos = 1
    worst = 0.0
    for t, utt in enumerate(msc_conversation, start=1):
        logits = conv.add_utterance(utt)
        n = len(utt) + 1
        worst = max(worst, float((logits - full[pos:pos + n]).abs().max()))
        pos += n
        # exactly BOS + every finished EoU + non-EoU tokens of the last two utterances
        expected = 1 + t + len(utt) + (len(msc_conversation[t - 2]) if t >= 2 else 0)
        assert len(conv.store) == expected, t
        kept = set(conv.store.positions.tolist())
        want = {0} | {i for i, e in enumerate(lay.eou[:pos]) if e} | {
            i for i in range(pos) if lay.utt_ids[i] >= t - 1}
        assert kept == want, t
    print(f"max |streamed - full| over {pos} positions: {worst:.2e}")
    assert worst <= 1e-4


def test_the_equivalence_check_sees_a_position_error(model_and_ids, msc_conversation):
    """The 1e-4 check above can fail: the same cache with positions renumbered inside the cache (``positions:
    cache``, the frame the reference code mixes in) is far from the absolute-position full forward."""
    model, ids = model_and_ids
    full, _ = full_forward(model, msc_conversation, ids)
    conv = Conversation(model, ids.bos, ids.eou, "streamingdialogue", positions="cache")
    pos, worst = 1, 0.0
    for utt in msc_conversation:
        logits = conv.add_utterance(utt)
        worst = max(worst, float((logits - full[pos:pos + len(utt) + 1]).abs().max()))
        pos += len(utt) + 1
    print(f"max |streamed (cache positions) - full (absolute)|: {worst:.2e}")
    assert worst > 10 * 1e-4  # the tolerance of the equivalence test, ten times over (measured: 8.8e-3)


def test_generated_tokens_match_full_forward(model_and_ids, msc_conversation):
    model, ids = model_and_ids
    conv = Conversation(model, ids.bos, ids.eou, "streamingdialogue")
    for utt in msc_conversation[:6]:
        last = conv.add_utterance(utt)[-1]
    step_logits = []
    orig = conv.feed_token

    def record(token):
        out = orig(token)
        step_logits.append(out)
        return out

    conv.feed_token = record
    reply = conv.generate(last, max_new_tokens=8)
    full, _ = full_forward(model, msc_conversation[:6] + [reply], ids)
    n_prev = 1 + sum(len(u) + 1 for u in msc_conversation[:6])
    for j, logits in enumerate(step_logits):  # the token fed at n_prev + j
        torch.testing.assert_close(logits, full[n_prev + j], atol=1e-4, rtol=0)
    assert int(full[n_prev - 1].argmax()) == (reply[0] if reply else ids.eou)


def test_dense_policy_keeps_everything(model_and_ids, msc_conversation):
    model, ids = model_and_ids
    conv = Conversation(model, ids.bos, ids.eou, "dense")
    for utt in msc_conversation[:5]:
        conv.add_utterance(utt)
    assert len(conv.store) == 1 + sum(len(u) + 1 for u in msc_conversation[:5])


@pytest.fixture(scope="module")
def exported_tiny(tmp_path_factory, model_and_ids, tokenizer):
    model, ids = model_and_ids
    out = tmp_path_factory.mktemp("export") / "tiny"
    model.config._attn_implementation = "sdpa"
    model.save_pretrained(out, safe_serialization=True)
    model.config._attn_implementation = "convsink"
    tokenizer.save_pretrained(out)
    (out / "convsink.json").write_text(json.dumps({"version": 1, "bos_token_id": ids.bos, "eou_token_id": ids.eou,
                                                   "pad_token_id": ids.pad, "eou_token": tokenizer.eos_token}))
    return out


def test_chat_cli_answers_every_turn_and_shows_cache(exported_tiny, tmp_path):
    prompts = tmp_path / "turns.txt"
    prompts.write_text("Hi there, how are you?\nI love hiking in the mountains.\nWhat did I say I love?\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "chat", "--model", str(exported_tiny), "--prompt-file",
                           str(prompts), "--show-cache", "chat.max_new_tokens=5"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("model: ") == 3
    sizes = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("[cache: ")]
    assert len(sizes) == 3 and sizes[0] < sizes[1]


def test_chat_missing_model_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "chat", "--model", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no convsink.json" in proc.stderr and "Traceback" not in proc.stderr
