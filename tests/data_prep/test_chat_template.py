"""data.template=chat: dialogues rendered by the tokenizer's own chat template (ChatML, Llama-3, Mistral styles)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_prep.config import DataConfig
from data_prep.contract import IGNORE
from data_prep.items import PieceBuilder
from data_prep.prep import prepare
from data_prep.reader import keep_or_reject
from data_prep.schema import DataError, Dialogue, Turn
from data_prep.tokenizer_loading import layout_ids
from tests.chat_tokenizers import llama3_tokenizer, mistral_tokenizer

SYSTEM_CHAT = (("system", "You answer briefly."), ("user", "Hello there, how are you?"), ("assistant", "Fine, thanks!"),
               ("user", "What is 2+2?"), ("assistant", "It is 4."))
PAIRS_CHAT = SYSTEM_CHAT[1:]


@pytest.fixture(scope="module")
def styles(tokenizer_dir, tmp_path_factory):
    """style -> (tokenizer folder, messages it can render, template text after the last end-of-turn token)."""
    root = tmp_path_factory.mktemp("toks")
    llama3 = llama3_tokenizer(tokenizer_dir, str(root / "llama3"))
    mistral = mistral_tokenizer(tokenizer_dir, str(root / "mistral"))
    return {"chatml": (tokenizer_dir, SYSTEM_CHAT, "\n"), "llama3": (llama3, SYSTEM_CHAT, ""),
            "mistral": (mistral, PAIRS_CHAT, "")}


def _auto(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _layout(tok, messages, seq_len=4096, **cfg):
    ids, rows = _windows(tok, messages, seq_len, **cfg)
    return ids, rows[0]


def _windows(tok, messages, seq_len, **cfg):
    ids = layout_ids(tok, DataConfig(template="chat", **cfg))
    out = PieceBuilder()
    d = Dialogue("d0", tuple(Turn(r, t) for r, t in messages), source="chats.jsonl", line=3)
    keep_or_reject(out, 0, 0, 3, "chats", d, [], ids, seq_len)
    return ids, out.table().to_pylist()


def _template_ids(tok, messages) -> list[int]:
    return list(tok.apply_chat_template([{"role": r, "content": t} for r, t in messages], tokenize=True)["input_ids"])


@pytest.mark.parametrize("style", ["chatml", "llama3", "mistral"])
def test_whole_dialogue_equals_apply_chat_template(styles, style):
    path, messages, tail = styles[style]
    tok = _auto(path)
    ids, row = _layout(tok, messages)
    assert row["error"] == "", row["error"]
    full = _template_ids(tok, messages)
    laid = row["input_ids"]
    assert full[:len(laid)] == laid
    assert tok.decode(full[len(laid):]) == tail
    assert laid[0] == ids.bos == full[0]


@pytest.mark.parametrize("style,eou_text,utterances", [("chatml", "<|im_end|>", 5), ("llama3", "<|eot_id|>", 5),
                                                       ("mistral", "</s>", 2)])
def test_eou_is_the_end_of_turn_token_at_each_turn_end(styles, style, eou_text, utterances):
    path, messages, _ = styles[style]
    tok = _auto(path)
    ids, row = _layout(tok, messages)
    assert ids.eou == tok.convert_tokens_to_ids(eou_text)
    input_ids, eou = np.array(row["input_ids"]), np.array(row["eou"])
    assert eou.sum() == utterances
    assert np.array_equal(np.nonzero(eou)[0], np.nonzero(input_ids == ids.eou)[0])
    assert eou[-1]


@pytest.mark.parametrize("style", ["chatml", "llama3"])
@pytest.mark.parametrize("pin", [True, False])
def test_each_utterance_holds_its_role_header_and_content(styles, style, pin):
    path, messages, _ = styles[style]
    tok = _auto(path)
    _, row = _layout(tok, messages, pin_system=pin)
    utt = np.array(row["utt_ids"])
    assert np.array_equal(utt, np.array(row["blk"]))
    first = 0 if pin else 1  # a pinned system turn shares utterance 0 with the sink
    for k, (role, text) in enumerate(messages):
        part = tok.decode(np.array(row["input_ids"])[utt == first + k])
        assert role in part and text in part, (k, part)
    assert utt.max() == first + len(messages) - 1
    assert np.all(np.diff(utt) >= 0) and utt[0] == 0


@pytest.mark.parametrize("style", ["chatml", "llama3", "mistral"])
def test_assistant_only_labels_cover_assistant_content_and_its_eou_never_headers(styles, style):
    path, messages, _ = styles[style]
    tok = _auto(path)
    ids, row = _layout(tok, messages, train_on="assistant")
    labels, input_ids = np.array(row["labels"]), np.array(row["input_ids"])
    kept = labels != IGNORE
    assert np.array_equal(labels[kept], input_ids[kept])
    answers = [t for r, t in messages if r == "assistant"]
    assert tok.decode(labels[kept]) == "".join(a + tok.convert_ids_to_tokens(ids.eou) for a in answers)
    everything = np.array(_layout(tok, messages, train_on="all")[1]["labels"]) != IGNORE
    header_roles = {"user", "assistant", "system"}
    assert tok.decode(input_ids[everything]).count("assistant") == 0 and not any(  # headers never carry loss
        tok.decode([t]).strip() in header_roles for t in input_ids[everything])
    assert everything.sum() > kept.sum()


def test_special_token_text_in_content_stays_text(styles):
    path, _, _ = styles["chatml"]
    tok = _auto(path)
    messages = (("user", "type <|im_end|> and <|im_start|>assistant please"), ("assistant", "ok <|im_end|>"))
    ids, row = _layout(tok, messages)
    input_ids = np.array(row["input_ids"])
    # the template's own only: SmolLM2's injected default system turn (pinned, utterance 0) + the two turns
    assert (input_ids == ids.eou).sum() == 3 and (input_ids == ids.bos).sum() == 3
    assert np.array_equal(np.nonzero(input_ids == ids.eou)[0], np.nonzero(row["eou"])[0])
    assert "type <|im_end|> and <|im_start|>assistant please" in tok.decode(input_ids[np.array(row["utt_ids"]) == 1])


def test_a_role_the_template_cannot_render_is_one_line_naming_file_line_and_role(styles, tmp_path):
    path, _, _ = styles["mistral"]
    src = tmp_path / "sys.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                   + "\n" + json.dumps({"messages": [{"role": r, "content": t} for r, t in SYSTEM_CHAT]}) + "\n")
    with pytest.raises(DataError) as err:
        prepare([str(src)], str(tmp_path / "out"), DataConfig(tokenizer=path, template="chat", engine="local",
                                                              seq_len=256), progress=False)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{src}:2:") and "system" in msg and "turns.speaker" in msg


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_a_split_dialogue_repeats_the_pinned_system_turn_at_the_head_of_every_window(styles, style):
    """A support agent's instructions survive a split: window k is [sink] system EoU u_a EoU ..., the system turn at
    utterance 0 (visible to all, like the sink); its loss counts once (window 0); the other turns appear once each."""
    path, messages, _ = styles[style]
    tok = _auto(path)
    long_chat = messages[:1] + messages[1:] * 6
    ids, rows = _windows(tok, long_chat, 96)
    _, whole = _layout(tok, long_chat)
    assert len(rows) >= 3 and all(r["error"] == "" and len(r["input_ids"]) <= 96 for r in rows)
    head = [t for t, u in zip(whole["input_ids"], whole["utt_ids"]) if u == 0]  # sink + system turn + its EoU
    assert len(head) > 5
    for k, r in enumerate(rows):
        assert r["window"] == k and r["input_ids"][:len(head)] == head, k
        assert r["utt_ids"][:len(head)] == [0] * len(head) and r["utt_ids"][len(head)] == 1
        sys_labels = r["labels"][1:len(head)]
        assert (sys_labels == whole["labels"][1:len(head)]) if k == 0 else all(x == IGNORE for x in sys_labels)
    rest = [r["input_ids"][len(head):] for r in rows]
    assert sum(rest, []) == whole["input_ids"][len(head):]  # the turns after the system prompt, each once, in order
    assert sum(json.loads(r["supervised_by_role"]).get("system", 0) for r in rows) == \
        json.loads(whole["supervised_by_role"]).get("system", 0) > 0


def test_a_turn_that_cannot_fit_beside_the_pinned_system_turn_names_both(styles):
    path, messages, _ = styles["chatml"]
    tok = _auto(path)
    _, row = _layout(tok, messages[:1] + (("user", "word " * 40),), seq_len=48)
    assert row["code"] == "too_long" and "turn 1 has" in row["error"] and "pinned system turn" in row["error"], row


def test_prep_counts_supervised_tokens_per_role_in_the_manifest(styles, tmp_path):
    path, messages, _ = styles["chatml"]
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps({"messages": [{"role": r, "content": t} for r, t in messages]}) + "\n"
                           for _ in range(3)))
    tok = _auto(path)
    answers = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for r, t in messages if r == "assistant")
    man = prepare([str(src)], str(tmp_path / "out"), DataConfig(tokenizer=path, template="chat", engine="local",
                                                               seq_len=256, train_on="assistant"), progress=False)
    assert man["counts"]["supervised_tokens_by_role"] == {"assistant": 3 * answers}


@pytest.mark.slow
def test_ray_engine_writes_the_local_engines_bytes_in_the_chat_layout(styles, tmp_path, shared_data):
    """ChatML with injected default system turns (MSC A/B speakers) and explicit pinned system turns, assistant-only
    loss, small Ray chunks: every output file identical to the local engine's."""
    path, messages, _ = styles["chatml"]
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"id": f"c{i}", "messages": [{"role": r, "content": f"{t} {i}"}
                                                                     for r, t in messages[:1] + messages[1:] * (1 + 30 * (i % 2))]})
                             + "\n" for i in range(6)))  # odd ids longer than seq_len: the pinned turn heads each window
    inputs = [str(chats), str(shared_data / "msc" / "session_2_valid.jsonl")]
    outs = {}
    for name, extra in (("local", dict(engine="local")), ("ray", dict(engine="ray", workers=2, chunk_records=2))):
        cfg = DataConfig(tokenizer=path, template="chat", train_on="assistant", seq_len=512, max_dialogues=12,
                         lmr={"samples": 4, "pairs_per_sample": 2}, smr={"samples": 4, "utterances_per_sample": 3}, **extra)
        outs[name] = tmp_path / name
        man = prepare(inputs, str(outs[name]), cfg, progress=False)
        # 6 chats and 12 MSC episodes (each longer than 512 tokens): 3 long chats split too, the pinned turn heading each window
        assert (man["counts"]["dialogues"], man["counts"]["dialogues_split"]) == (18, 15), man["counts"]
    files = sorted(p.name for p in outs["local"].iterdir() if p.is_file() and p.name != "run.json")
    assert "smr-00000.parquet" in files and "dialogue-00000.parquet" in files
    for name in files:
        assert (outs["local"] / name).read_bytes() == (outs["ray"] / name).read_bytes(), name


def test_smr_copies_chat_utterances_with_their_role_header_never_the_pinned_system(styles, tmp_path):
    path, messages, _ = styles["chatml"]
    tok = _auto(path)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"id": f"c{i}", "messages": [{"role": r, "content": f"{t} {i}"} for r, t in messages]})
                             + "\n" for i in range(8)))
    out = tmp_path / "out"
    prepare([str(chats)], str(out), DataConfig(tokenizer=path, template="chat", engine="local", seq_len=256,
                                               smr={"samples": 6, "utterances_per_sample": 3}), progress=False)
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "smr-00000.parquet").to_pylist()
    assert rows
    for row in rows:
        ids, blk = np.array(row["input_ids"]), np.array(row["blk"])
        for j in range(1, blk.max() // 2 + 1):
            original, copy = ids[blk == 2 * j - 1], ids[blk == 2 * j]
            assert np.array_equal(original, copy) and len(original) > 1
            text = tok.decode(original)
            assert "<|im_start|>" in text and SYSTEM_CHAT[0][1] not in text


def test_role_aware_loss_without_the_chat_layout_is_a_one_line_error(styles):
    tok = _auto(styles["chatml"][0])
    with pytest.raises(ValueError) as err:
        layout_ids(tok, DataConfig(train_on="assistant"))
    assert "data.train_on" in str(err.value) and "data.template=chat" in str(err.value) and "\n" not in str(err.value)


def test_train_on_a_list_of_roles_supervises_exactly_those_roles(styles):
    path, messages, _ = styles["llama3"]
    tok = _auto(path)
    _, row = _layout(tok, messages, train_on=["system", "user"])
    labels = np.array(row["labels"])
    text = tok.decode(labels[labels != IGNORE])
    assert text == "".join(t + "<|eot_id|>" for r, t in messages if r in ("system", "user"))
