"""Cache policies against independent references.

- Cache-frame policies (streamingllm; streamingdialogue with positions='cache') on a ONE-layer model: the keys and
  values of a one-layer model do not depend on context, so decoding against the cache must equal a fresh causal
  forward over exactly the tokens the cache holds (re-numbered 0..n-1) followed by the new tokens. This checks the
  pre-RoPE keys and their re-rotation at cache positions, chunk by chunk and token by token, through evictions.
- Absolute streamingdialogue, token by token, several conversations in one batch (with a dense row beside it):
  every streamed logit equals one full forward with the dialogue mask (the dense row: the causal mask).
- Pre-RoPE keys are stored once and never re-rotated from a rounded value.
"""

from __future__ import annotations

import pytest
import torch

from data_prep.adapters import iter_dialogues
from data_prep.layout import layout_dialogue
from data_prep.tokenizer_loading import prepare_tokenizer
from pipeline.attention.masks import dense_mask
from pipeline.attention.registry import DenseMaskAttention
from pipeline.config import ChatConfig, ModelConfig
from pipeline.contract import CacheSettings, ExportInfo
from pipeline.inference.conversation import Conversation, decode_step, generate_batch
from pipeline.modeling.loader import build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only cost here


def _model(tokenizer, layers: int, seed: int = 0):
    torch.manual_seed(seed)
    ids = prepare_tokenizer(tokenizer)
    return build_model(ModelConfig(hidden_size=64, intermediate_size=128, num_layers=layers), len(tokenizer), ids).eval(), ids


@pytest.fixture(scope="module")
def one_layer(tokenizer):
    return _model(tokenizer, 1)


@pytest.fixture(scope="module")
def two_layer(tokenizer):
    return _model(tokenizer, 2)


@pytest.fixture(scope="module")
def utts(tokenizer, shared_data):
    """The first 40 turns of the first 40-turn episode of MSC session_3_test, as token ids."""
    for d in iter_dialogues(str(shared_data / "msc" / "session_3_test.jsonl"), "msc"):
        if len(d.turns) >= 40:
            return [tokenizer(t.text, add_special_tokens=False)["input_ids"] for t in d.turns[:40]]
    raise AssertionError("no 40-turn MSC episode")


@torch.no_grad()
def causal_forward(model, tokens: list[int]) -> torch.Tensor:
    """Plain causal forward at positions 0..n-1; logits ``(n, V)``."""
    n = len(tokens)
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None]
    return model(input_ids=torch.tensor([tokens]), position_ids=torch.arange(n)[None],
                 convsink_attn=DenseMaskAttention(mask)).logits[0]


@torch.no_grad()
def masked_forward(model, utterances, ids, kind: str) -> torch.Tensor:
    lay = layout_dialogue("x", utterances, ids)
    meta = {"doc_ids": torch.zeros(1, len(lay), dtype=torch.long), "utt_ids": torch.tensor([lay.utt_ids]),
            "eou": torch.tensor([lay.eou]), "position_ids": torch.arange(len(lay))[None]}
    return model(input_ids=torch.tensor([lay.input_ids]), position_ids=torch.arange(len(lay))[None],
                 convsink_attn=DenseMaskAttention(dense_mask(kind, meta))).logits[0]


def _flat(utterances, ids) -> list[int]:
    return layout_dialogue("x", utterances, ids).input_ids


@pytest.mark.parametrize("policy,positions", [("streamingllm", "cache"), ("streamingdialogue", "cache")])
def test_cache_frame_chunks_equal_fresh_forward_over_held_tokens(one_layer, utts, policy, positions):
    model, ids = one_layer
    conv = Conversation(model, ids.bos, ids.eou, policy, positions=positions, sink_tokens=4, window=24)
    tokens = [ids.bos]  # the conversation so far, by original position
    evicted = 0
    for t, u in enumerate(utts[:10], start=1):
        conv.start_utterance()  # pruning for this utterance happens here
        held = [tokens[p] for p in conv.store.positions.tolist()]
        evicted = max(evicted, len(tokens) - len(held))
        chunk = list(u) + [ids.eou]
        got = conv._feed(chunk, eou=[False] * len(u) + [True])
        conv.in_utterance = False
        want = causal_forward(model, held + chunk)[len(held):]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=f"utterance {t}")
        tokens += chunk
        assert int(conv.store.rope_pos.max()) == len(conv.store) - 1  # bounded positions
    assert evicted > 100  # the check ran through many evictions


def test_streamingllm_token_by_token_equals_fresh_forward_over_held_tokens(one_layer, utts):
    model, ids = one_layer
    conv = Conversation(model, ids.bos, ids.eou, "streamingllm", sink_tokens=4, window=16)
    stream = _flat(utts[:3], ids)
    for i, token in enumerate(stream[1:], start=1):
        held = [stream[p] for p in conv.store.positions.tolist()]
        assert len(held) == min(i, 20)
        got = conv.feed_token(token)
        torch.testing.assert_close(got, causal_forward(model, held + [token])[-1], atol=1e-4, rtol=0, msg=f"token {i}")


def test_prerope_keys_are_never_rerotated(two_layer, utts):
    model, ids = two_layer
    conv = Conversation(model, ids.bos, ids.eou, "streamingllm", sink_tokens=4, window=8)
    assert conv.store.raw
    stream = _flat(utts[:2], ids)
    seen: dict[int, torch.Tensor] = {}  # original position -> its stored key (layer 1)
    for token in stream[1:40]:
        conv.feed_token(token)
        for j, p in enumerate(conv.store.positions.tolist()):
            k = conv.store.keys[1][0, :, j]
            if p in seen:  # bit-identical while its index in the cache shifts
                assert torch.equal(seen[p], k), p
            seen[p] = k.clone()
    assert conv.store.positions[:4].tolist() == [0, 1, 2, 3] and len(conv.store) == 12


def test_absolute_token_by_token_batch_equals_full_masked_forward(two_layer, utts):
    """Two streamingdialogue conversations and one dense one decode token by token in ONE batch (teacher-forced
    on real MSC utterances): each streamed logit equals the full forward with the dialogue (dense: causal) mask."""
    model, ids = two_layer
    rows = [("streamingdialogue", "dialogue", utts[:8]), ("streamingdialogue", "dialogue", utts[5:11]),
            ("dense", "causal", utts[20:24])]
    convs = [Conversation(model, ids.bos, ids.eou, policy) for policy, _, _ in rows]
    fulls = [masked_forward(model, u, ids, kind) for _, kind, u in rows]
    streams = [_flat(u, ids) for _, _, u in rows]
    for conv, full in zip(convs, fulls):
        torch.testing.assert_close(conv.bos_logits, full[0], atol=1e-4, rtol=0)
    worst = 0.0
    for i in range(1, max(len(s) for s in streams)):
        active = [b for b, s in enumerate(streams) if i < len(s)]
        logits = decode_step([convs[b] for b in active], [streams[b][i] for b in active])
        for row, b in enumerate(active):
            worst = max(worst, float((logits[row] - fulls[b][i]).abs().max()))
    assert worst <= 1e-4, worst
    # streamingdialogue rows hold BOS + every EoU + the last two utterances; the dense row everything
    for (policy, _, u), conv in zip(rows, convs):
        T = len(u)
        want = len(_flat(u, ids)) if policy == "dense" else 1 + T + len(u[-1]) + len(u[-2])
        assert len(conv.store) == want


@pytest.mark.parametrize("policy", ["streamingdialogue", "streamingllm", "recompute", "dense"])
def test_fork_is_independent(two_layer, utts, policy):
    model, ids = two_layer
    conv = Conversation(model, ids.bos, ids.eou, policy, sink_tokens=4, window=30)
    for u in utts[:4]:
        conv.add_utterance(u)
    before = (conv.store.positions.clone(), [k.clone() for k in conv.store.keys], list(conv.history))
    fork = conv.fork()
    reply = fork.generate(None, 6, min_new_tokens=6)
    assert len(reply) == 6 and fork.utt == conv.utt + 1
    assert torch.equal(conv.store.positions, before[0]) and conv.history == before[2]
    assert all(torch.equal(a, b) for a, b in zip(conv.store.keys, before[1]))
    assert conv.generate(None, 6, min_new_tokens=6) == reply  # the original continues exactly like its fork did


def test_mixed_policies_in_one_batch_equal_decoding_alone(two_layer, utts):
    model, ids = two_layer
    setups = [("recompute", "absolute", utts[:5]), ("streamingdialogue", "cache", utts[3:9]),
              ("streamingllm", "cache", utts[10:13]), ("streamingdialogue", "absolute", utts[1:2])]

    def start():
        convs = []
        for policy, positions, history in setups:
            c = Conversation(model, ids.bos, ids.eou, policy, positions=positions, sink_tokens=4, window=40)
            for u in history:
                c.add_utterance(u)
            convs.append(c)
        return convs

    alone = []
    for c in start():
        alone.append((c.generate(None, 8), c.last_logits, c.store.positions.clone()))
    batch = start()
    replies = generate_batch(batch, None, 8)
    for (reply, last, positions), r, c in zip(alone, replies, batch):
        assert r == reply
        torch.testing.assert_close(c.last_logits, last, atol=1e-4, rtol=0)
        assert torch.equal(c.store.positions, positions)


def test_streamingdialogue_holds_its_positions_across_user_and_model_turns(two_layer, utts):
    """User turns teacher-forced, model turns generated: after every turn exactly BOS + EoUs + the last two
    utterances (by original position)."""
    model, ids = two_layer
    conv = Conversation(model, ids.bos, ids.eou, "streamingdialogue")
    spans = []  # (start, end) original positions of each utterance incl. its EoU
    for t in range(1, 9):
        start = conv.next_position
        if t % 2:
            conv.add_utterance(utts[t])
        else:
            conv.generate(None, 5)
        spans.append((start, conv.next_position))
        want = {0} | {e - 1 for _, e in spans} | set(range(spans[-2][0] if t > 1 else 1, spans[-1][1]))
        assert set(conv.store.positions.tolist()) == want, t


def test_add_utterance_last_logits_only(two_layer, utts):
    model, ids = two_layer
    a, b = Conversation(model, ids.bos, ids.eou), Conversation(model, ids.bos, ids.eou)
    for u in utts[:3]:
        full, last = a.add_utterance(u), b.add_utterance(u, all_logits=False)
        assert last.shape == (1, full.shape[1])
        torch.testing.assert_close(last[0], full[-1], atol=1e-5, rtol=0)


def test_decode_step_only_orchestrates():
    """decode_step runs the batched forward and calls the conversations' public methods: it assigns no attribute
    of another object and calls no private method (each conversation changes its own state)."""
    import ast
    import inspect

    from pipeline.inference import conversation

    tree = ast.parse(inspect.getsource(conversation.decode_step))
    stores = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, (ast.Store, ast.Del))]
    private = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("_")]
    assert not stores and not private, (stores, private)


def test_cache_settings_precedence():
    info = ExportInfo(1, 2, 2, cache={"policy": "dense", "positions": "cache", "sink_tokens": 2, "window": 64})
    assert CacheSettings.resolve(ChatConfig(), info) == CacheSettings("dense", "cache", 2, 64)
    explicit = ChatConfig.model_validate({"cache": "streamingllm", "window": 32})
    assert CacheSettings.resolve(explicit, info) == CacheSettings("streamingllm", "cache", 2, 32)
    assert CacheSettings.resolve(explicit, info, policy="recompute").policy == "recompute"
    assert CacheSettings.resolve(ChatConfig(), ExportInfo(1, 2, 2)) == CacheSettings()
    with pytest.raises(ValueError, match="unknown cache policy"):
        CacheSettings("sink")
