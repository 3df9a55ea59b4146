"""Cache policies: their decisions from plain metadata alone, what each holds after every turn, StreamingLLM with a
covering window equals dense, and key re-rotation equals RoPE applied at the new positions."""

from __future__ import annotations

import ast

import pytest
import torch

from data_prep.tokenizer_loading import prepare_tokenizer
from pipeline.config import ModelConfig
from pipeline.contract import CACHE_POLICIES
from pipeline.inference import policies
from pipeline.inference.conversation import Conversation
from pipeline.inference.kv_store import KVStore
from pipeline.inference.policies import CacheFacts, Keep, Reencode, make_policy
from pipeline.modeling.loader import build_model


@pytest.fixture(scope="module")
def setup(tokenizer, shared_data):
    from data_prep.adapters import iter_dialogues

    torch.manual_seed(0)
    ids = prepare_tokenizer(tokenizer)
    model = build_model(ModelConfig(hidden_size=64, intermediate_size=128), len(tokenizer), ids).eval()
    d = next(iter(iter_dialogues(str(shared_data / "msc" / "session_2_test.jsonl"), "msc")))
    utts = [tokenizer(t.text, add_special_tokens=False)["input_ids"] for t in d.turns[:10]]
    return model, ids, utts


def test_policies_decide_from_plain_metadata_alone():
    """No model and no conversation: each hook reads a CacheFacts and returns the decision the policy stands for."""
    # cached: BOS | utt 1 (3 tokens + EoU) | utt 2 (1 + EoU) | utt 3 (2 + EoU); utterance 4 has just started
    utt = torch.tensor([0, 1, 1, 1, 1, 2, 2, 3, 3, 3])
    eou = torch.tensor([False, False, False, False, True, False, True, False, False, True])
    facts = CacheFacts(utt=utt, eou=eou, utterance=4, history_tokens=25)
    pols = {name: make_policy(name, sink_tokens=2, window=3) for name in CACHE_POLICIES}
    for name, policy in pols.items():
        assert policy.name == name
        assert all(isinstance(v, int) for v in vars(policy).values()), name  # holds settings, nothing else

    def kept(decision) -> list[int]:
        assert isinstance(decision, Keep) and decision.index.dtype == torch.bool and len(decision.index) == len(utt)
        return decision.index.nonzero().squeeze(1).tolist()

    assert pols["dense"].before_utterance(facts) is None and pols["dense"].after_forward(facts) is None
    sd = pols["streamingdialogue"]
    assert kept(sd.before_utterance(facts)) == [0, 4, 6, 7, 8, 9]  # BOS + EoUs + utterance 3 (= 4 - 1)
    assert sd.after_forward(facts) is None
    assert sd.before_utterance(CacheFacts(utt[:0], eou[:0], utterance=1, history_tokens=0)) is None
    sllm = pols["streamingllm"]
    assert sllm.before_utterance(facts) is None
    assert kept(sllm.after_forward(facts)) == [0, 1, 7, 8, 9]  # the first 2 + the last 3
    assert sllm.after_forward(CacheFacts(utt[:5], eou[:5], utterance=1, history_tokens=5)) is None  # 5 <= 2 + 3
    rc = pols["recompute"]
    assert rc.before_utterance(facts) == Reencode(3) and rc.after_forward(facts) is None
    assert rc.before_utterance(CacheFacts(utt[:2], eou[:2], utterance=1, history_tokens=2)) == Reencode(2)
    assert torch.equal(facts.utt, utt) and torch.equal(facts.eou, eou)  # read, not changed


def test_policies_module_imports_no_conversation_or_model():
    """Every import in policies.py (top level, TYPE_CHECKING blocks, inside functions): only torch, the stdlib and
    the contract's names; nothing that could reach a model or a conversation."""
    tree = ast.parse(open(policies.__file__).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"__future__", "dataclasses", "typing", "torch", "pipeline.contract"}, imported


def test_streamingllm_with_covering_window_equals_dense(setup):
    model, ids, utts = setup
    dense = Conversation(model, ids.bos, ids.eou, "dense")
    sllm = Conversation(model, ids.bos, ids.eou, "streamingllm", sink_tokens=4, window=10_000)
    for u in utts:
        torch.testing.assert_close(sllm.add_utterance(u), dense.add_utterance(u), atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy", ["dense", "streamingllm", "streamingdialogue", "recompute"])
def test_each_policy_holds_exactly_its_positions(setup, policy):
    model, ids, utts = setup
    s, w = 4, 40
    conv = Conversation(model, ids.bos, ids.eou, policy, sink_tokens=s, window=w)
    ends, utt_of = [1], [0]  # end position (exclusive) of each utterance; utterance of each position
    for t, u in enumerate(utts, start=1):
        conv.add_utterance(u)
        ends.append(ends[-1] + len(u) + 1)
        utt_of += [t] * (len(u) + 1)
        n = ends[-1]
        eous = {e - 1 for e in ends[1:]}
        if policy == "dense":
            want = set(range(n))
        elif policy == "streamingllm":
            want = set(range(min(s, n))) | set(range(max(0, n - w), n))
        elif policy == "streamingdialogue":
            want = {0} | eous | {p for p in range(n) if utt_of[p] >= t - 1}
        else:  # recompute: the last w tokens before this utterance, re-encoded, plus this utterance
            start = ends[-2]
            want = set(range(max(0, start - w), start)) | set(range(start, n))
        assert set(conv.store.positions.tolist()) == want, (policy, t)


def test_key_rerotation_equals_rope_at_new_positions(setup):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, _, _ = setup
    rotary = model.model.rotary_emb
    raw = torch.randn(1, 2, 6, model.config.hidden_size // model.config.num_attention_heads)
    old, new = torch.tensor([0, 5, 9, 17, 40, 41]), torch.arange(6)

    def rope(x, pos):
        cos, sin = rotary(x, pos[None])
        return apply_rotary_pos_emb(x, x, cos, sin)[1]

    store = KVStore(1)
    store.keys, store.values, store.rope_pos = [rope(raw, old)], [raw.clone()], old.clone()
    store.positions = old.clone()
    store.reposition(rotary, new)
    torch.testing.assert_close(store.keys[0], rope(raw, new), atol=1e-5, rtol=0)


def test_streamingdialogue_cache_positions_stay_bounded(setup):
    model, ids, utts = setup
    conv = Conversation(model, ids.bos, ids.eou, "streamingdialogue", positions="cache")
    for u in utts:
        conv.add_utterance(u)
    assert int(conv.store.rope_pos.max()) == len(conv.store) - 1 < conv.next_position - 1


@pytest.mark.parametrize("policy", ["streamingdialogue", "streamingllm", "dense"])
def test_conversations_decode_in_one_batch_like_alone(setup, policy):
    from pipeline.inference.conversation import generate_batch

    model, ids, utts = setup
    histories = [utts[:3], utts[2:7], utts[5:6]]  # different lengths → different cache sizes
    alone, batched = [], []
    for h in histories:
        conv = Conversation(model, ids.bos, ids.eou, policy, sink_tokens=4, window=30)
        for u in h:
            last = conv.add_utterance(u)[-1]
        alone.append((conv.generate(last, 6), conv.last_logits))
    convs, lasts = [], []
    for h in histories:
        conv = Conversation(model, ids.bos, ids.eou, policy, sink_tokens=4, window=30)
        for u in h:
            last = conv.add_utterance(u)[-1]
        convs.append(conv)
        lasts.append(last)
    replies = generate_batch(convs, lasts, 6)
    for (reply, last_logits), r, conv in zip(alone, replies, convs):
        assert r == reply
        torch.testing.assert_close(conv.last_logits, last_logits, atol=1e-4, rtol=0)
        assert not conv.in_utterance


def test_recompute_fast_forward_equals_processing_every_utterance(setup):
    model, ids, utts = setup
    full = Conversation(model, ids.bos, ids.eou, "recompute", window=30)
    fast = Conversation(model, ids.bos, ids.eou, "recompute", window=30)
    for u in utts[:-1]:
        full.add_utterance(u)
        fast.record_utterance(u)
    torch.testing.assert_close(fast.add_utterance(utts[-1]), full.add_utterance(utts[-1]), atol=1e-5, rtol=0)
    assert torch.equal(fast.store.positions, full.store.positions)
