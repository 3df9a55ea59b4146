"""Token layout (method.md §1), windows of long dialogues, and the fast paths against the reference."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.layout import IGNORE, FastEncoder, layout_dialogue, split_into_windows
from data_prep.tokenizer_loading import encode_utterances
from data_prep.schema import DataError, make_dialogue
from data_prep.tokenizer_loading import SpecialIds
from data_prep.windows import layout_columns, plan_windows

IDS = SpecialIds(bos=1, eou=2, pad=0)


def test_layout_bos_utterances_eous():
    t = layout_dialogue("d", [[10, 11], [12], [13, 14, 15]], IDS)
    assert t.input_ids == [1, 10, 11, 2, 12, 2, 13, 14, 15, 2]
    assert t.utt_ids == [0, 1, 1, 1, 2, 2, 3, 3, 3, 3]
    assert t.eou == [False, False, False, True, False, True, False, False, False, True]
    assert t.labels == [IGNORE] + t.input_ids[1:] and t.blk == t.utt_ids and t.mask_kind == "dialogue"


def test_layout_with_a_pinned_system_turn_puts_it_at_utterance_zero_without_loss():
    t = layout_dialogue("d", [[10, 11], [12]], IDS, system=[7, 8])
    assert t.input_ids == [1, 7, 8, 2, 10, 11, 2, 12, 2]
    assert t.utt_ids == [0, 0, 0, 0, 1, 1, 1, 2, 2]  # [BOS] system EoU share utterance 0 (prep's chat layout)
    assert t.eou == [False, False, False, True, False, False, True, False, True]
    assert t.labels == [IGNORE] * 4 + [10, 11, 2, 12, 2] and t.blk == t.utt_ids


def test_real_tokenizer_layout(tokenizer):
    from data_prep.layout import utterance_token_ids
    from data_prep.tokenizer_loading import prepare_tokenizer

    ids = prepare_tokenizer(tokenizer)
    assert ids.eou == tokenizer.eos_token_id and ids.bos == tokenizer.bos_token_id  # found, never hard-coded
    d = make_dialogue("x", [("Hello there!", "A"), ("Hi.", "B")], "mem", 1)
    utts = utterance_token_ids(d, tokenizer)
    t = layout_dialogue("x", utts, ids)
    assert t.input_ids[0] == ids.bos and [t.input_ids[i] for i, e in enumerate(t.eou) if e] == [ids.eou, ids.eou]
    assert tokenizer.decode(t.input_ids[1:1 + len(utts[0])]) == "Hello there!"


def test_windows_split_at_utterance_boundaries_each_with_bos():
    d = make_dialogue("d", [(f"u{i}", "") for i in range(6)], "f", 3)
    utts = [[100 + i] * (i + 1) for i in range(6)]  # 1..6 tokens
    wins = split_into_windows(d, utts, IDS, seq_len=12)
    assert all(len(w) <= 12 and w.input_ids[0] == IDS.bos and w.utt_ids[0] == 0 for w in wins)
    back = []
    for w in wins:
        cur = []
        for tok, e in zip(w.input_ids[1:], w.eou[1:]):
            if e:
                back.append(cur)
                cur = []
            else:
                cur.append(tok)
    assert back == utts and [w.window for w in wins] == list(range(len(wins))) and len(wins) > 1


def test_utterance_too_long_is_a_data_error():
    d = make_dialogue("d", [("a", ""), ("b", "")], "f.jsonl", 7)
    with pytest.raises(DataError, match=r"f.jsonl:7: turn 1 has 11 tokens") as e:
        split_into_windows(d, [[5], [6] * 11], IDS, seq_len=12)
    assert e.value.code == "too_long"
    assert plan_windows([1, 11], 12) == 1


def test_numpy_layout_equals_reference_on_random_dialogues():
    rng = np.random.default_rng(0)
    for trial in range(30):
        seq_len = int(rng.integers(8, 40))
        dialogues = [[list(rng.integers(3, 99, size=int(rng.integers(0, seq_len - 2)))) for _ in range(int(rng.integers(1, 9)))]
                     for _ in range(int(rng.integers(1, 6)))]
        ref, windows, lens, flat = [], [], [], []
        for k, utts in enumerate(dialogues):
            d = make_dialogue(f"d{k}", [("x", "")] * len(utts), "f", 1)
            ref += split_into_windows(d, utts, IDS, seq_len)
            base = len(lens)
            windows += [(base + a, base + b) for a, b in plan_windows([len(u) for u in utts], seq_len)]
            lens += [len(u) for u in utts]
            flat += [t for u in utts for t in u]
        cols = layout_columns(np.array(lens), np.array(flat, dtype=np.int32), windows, IDS)
        assert cols["lengths"].tolist() == [len(w) for w in ref]
        for name in ("input_ids", "labels", "utt_ids", "eou", "blk"):
            assert cols[name].tolist() == [x for w in ref for x in getattr(w, name)], (trial, name)


def test_fast_encoder_equals_transformers(tokenizer, tokenizer_dir, shared_data):
    from data_prep.adapters import iter_dialogues

    texts = [t.text for d in list(iter_dialogues(str(shared_data / "msc" / "session_2_test.jsonl")))[:40] for t in d.turns]
    texts += ["<|im_end|> literal specials", "  spaces  ", "émoji 🙂 ünïcode"]
    expect = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tokenizer.eos_token_id not in expect[-3], "special-token text stays text"
    assert encode_utterances(tokenizer, texts) == expect and FastEncoder(tokenizer_dir)(texts) == expect
    with open(f"{tokenizer_dir}/tokenizer.json", encoding="utf-8") as f:
        assert FastEncoder.from_json(f.read())(texts) == expect  # what Ray workers build from the object store


def test_train_bpe_tokenizer_is_deterministic_and_prep_ready(tmp_path, shared_data):
    from data_prep.tokenizer_loading import load_tokenizer, prepare_tokenizer, train_bpe_tokenizer

    src = [str(shared_data / "msc" / "session_2_valid.jsonl")]
    a = load_tokenizer(train_bpe_tokenizer(src, str(tmp_path / "a"), vocab_size=512))
    b = load_tokenizer(train_bpe_tokenizer(src, str(tmp_path / "b"), vocab_size=512))
    assert len(a) == 512 and a.get_vocab() == b.get_vocab()
    ids = prepare_tokenizer(a)
    assert (ids.bos, ids.eou, ids.pad) == (0, 1, 2)
    text = "Hi! I just got back from a run. Do you exercise much?"
    enc = a(text, add_special_tokens=False)["input_ids"]
    assert a.decode(enc) == text and 0 not in enc and 1 not in enc
