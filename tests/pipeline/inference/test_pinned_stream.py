"""A pinned system prompt in the StreamingDialogue cache (issue 11 item 3): ``Conversation(..., system=ids)`` lays
the prompt out as utterance 0 with BOS (``[BOS] system EoU``), the policy never evicts it, the cache holds
``P + T + 2L`` positions (P pinned tokens), and the streamed logits still equal one full forward under the dialogue
mask (1e-4, absolute positions) after 40 turns; the same prompt fed as an ordinary first utterance is evicted and
the logits drift away."""

from __future__ import annotations

import pytest
import torch

from data_prep.adapters import iter_dialogues
from data_prep.layout import layout_dialogue
from pipeline.attention.masks import dense_mask
from pipeline.attention.registry import DenseMaskAttention
from pipeline.contract import DOC_IDS, EOU, UTT_IDS
from pipeline.inference.conversation import Conversation

TURNS = 40
SYSTEM = ("You are the support agent of a hiking shop. Always answer politely, never promise refunds, and "
          "ask for the order number before anything else.")


@pytest.fixture(scope="module")
def turns(tokenizer, shared_data):
    system = tokenizer(SYSTEM, add_special_tokens=False)["input_ids"]
    for d in iter_dialogues(str(shared_data / "msc" / "session_3_test.jsonl"), "msc"):
        if len(d.turns) >= TURNS:
            return system, [tokenizer(t.text, add_special_tokens=False)["input_ids"] for t in d.turns[:TURNS]]
    raise AssertionError(f"no {TURNS}-turn MSC episode")


def full_forward(model, tokens, utt, eou):
    meta = {DOC_IDS: torch.zeros(1, len(tokens), dtype=torch.long), UTT_IDS: torch.tensor([utt]), EOU: torch.tensor([eou])}
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens]), position_ids=torch.arange(len(tokens))[None],
                     convsink_attn=DenseMaskAttention(dense_mask("dialogue", meta))).logits[0]


@pytest.fixture(scope="module")
def pinned_full(model_and_ids, turns):
    model, ids = model_and_ids
    system, utterances = turns
    lay = layout_dialogue("d", utterances, ids, system=system)  # [BOS] system EoU (utt 0) u1 EoU ...
    return full_forward(model, lay.input_ids, lay.utt_ids, lay.eou), lay.input_ids, lay.utt_ids


def test_pinned_system_stays_cached_and_streamed_logits_equal_full_forward(model_and_ids, turns, pinned_full):
    model, ids = model_and_ids
    system, utterances = turns
    full, tokens, utt_ids = pinned_full
    conv = Conversation(model, ids.bos, ids.eou, "streamingdialogue", system=system)
    P = len(system) + 2  # BOS + the system tokens + their EoU
    assert conv.cache_info()["pinned"] == P
    torch.testing.assert_close(conv.last_logits, full[P - 1], atol=1e-4, rtol=0)  # predicts the first user token
    pos, worst = P, 0.0
    for t, utt in enumerate(utterances, start=1):
        logits = conv.add_utterance(utt)
        n = len(utt) + 1
        worst = max(worst, float((logits - full[pos:pos + n]).abs().max()))
        pos += n
        # P pinned + every finished EoU + the non-EoU tokens of the last two utterances
        assert len(conv.store) == P + t + len(utt) + (len(utterances[t - 2]) if t >= 2 else 0), t
        kept = set(conv.store.positions.tolist())
        assert set(range(P)) <= kept, t  # the system prompt is never evicted
        eous = {i for i in range(P, pos) if tokens[i] == ids.eou}
        assert kept == set(range(P)) | eous | {i for i in range(P, pos) if utt_ids[i] >= t - 1}, t
    assert pos == len(tokens)
    print(f"max |streamed - full| over {pos} positions with a {P}-token pinned prefix: {worst:.2e}")
    assert worst <= 1e-4


def test_unpinned_system_prompt_is_evicted_and_the_logits_drift(model_and_ids, turns, pinned_full):
    """Control: the same prompt fed as an ordinary first utterance leaves the cache after two turns, so the later
    streamed logits are far from the pinned full forward (the equivalence above can fail)."""
    model, ids = model_and_ids
    system, utterances = turns
    full, tokens, _ = pinned_full
    conv = Conversation(model, ids.bos, ids.eou, "streamingdialogue")
    conv.add_utterance(system)
    pos, worst = len(system) + 2, 0.0
    for t, utt in enumerate(utterances[:12], start=1):  # the prompt is gone from the third turn on
        logits = conv.add_utterance(utt)
        if t >= 3:
            worst = max(worst, float((logits - full[pos:pos + len(utt) + 1]).abs().max()))
        pos += len(utt) + 1
    kept = set(conv.store.positions.tolist())
    assert not set(range(1, len(system) + 1)) & kept  # the system tokens are gone
    print(f"max |streamed (unpinned) - full (pinned)|: {worst:.2e}")
    assert worst > 10 * 1e-4


def test_pinned_prefix_survives_cache_frame_positions_and_fork(model_and_ids, turns):
    model, ids = model_and_ids
    system, utterances = turns
    P = len(system) + 2
    conv = Conversation(model, ids.bos, ids.eou, "streamingdialogue", positions="cache", system=system)
    for utt in utterances[:6]:
        conv.add_utterance(utt)
    other = conv.fork()
    other.add_utterance(utterances[6])
    for c, t in ((conv, 6), (other, 7)):
        assert c.store.positions[:P].tolist() == list(range(P)) and c.store.utt[:P].eq(0).all()
        assert len(c.store) == P + t + len(utterances[t - 1]) + len(utterances[t - 2])



@pytest.mark.parametrize("policy", ["streamingllm", "recompute"])
def test_the_baseline_policies_keep_the_pinned_prompt_too(model_and_ids, turns, policy):
    """streamingllm keeps max(sink_tokens, P) first tokens + its window; recompute re-encodes the pinned prefix
    + its window: neither loses the instructions (their window alone would), and without a prompt both are
    unchanged (tests/pipeline/inference/test_policies.py, test_conversation.py)."""
    model, ids = model_and_ids
    system, utterances = turns
    P = len(system) + 2
    conv = Conversation(model, ids.bos, ids.eou, policy, sink_tokens=4, window=32, system=system)
    for utt in utterances[:8]:
        conv.add_utterance(utt)
    assert sum(len(u) + 1 for u in utterances[:8]) > 2 * 32  # the window alone would have dropped the prompt
    assert conv.store.positions[:P].tolist() == list(range(P)) and conv.store.utt[:P].eq(0).all()
    assert not conv.store.utt[P:].eq(0).any()
    if policy == "streamingllm":
        assert len(conv.store) == P + 32
    else:  # the pinned prefix + the last 32 tokens before utterance 8, re-encoded, + utterance 8 itself
        assert len(conv.store) == P + 32 + len(utterances[7]) + 1
        assert conv.store.positions[P:P + 32].tolist() == list(range(conv.next_position - len(utterances[7]) - 33,
                                                                      conv.next_position - len(utterances[7]) - 1))


def test_a_pinned_prompt_is_laid_out_with_bos_as_utterance_zero(model_and_ids):
    model, ids = model_and_ids
    dense = Conversation(model, ids.bos, ids.eou, "dense", system=[5, 6, 7])
    assert dense.store.utt.tolist() == [0] * 5 and dense.store.eou.tolist() == [False] * 4 + [True]
    assert dense.cache_info()["pinned"] == 5
    assert Conversation(model, ids.bos, ids.eou, "dense").cache_info()["pinned"] == 1  # BOS alone without a prompt
