"""No special-token injection (issue 11 item 5): every special token of each test tokenizer, typed inside user text
(start, middle, end of an utterance, and alone), stays text through prep (local and Ray engines, plain and chat
layouts), chat (``TurnEncoder`` / ``user_turn`` on a tiny exported model) and eval (perplexity and generation
encodings). Only the layout's own tokens (sink, EoU, the template's) carry special ids."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from data_prep.config import DataConfig
from data_prep.contract import DIALOGUE, DIALOGUE_IDS, DOC_IDS, EOU, INPUT_IDS, UTT_IDS
from data_prep.prep import prepare
from data_prep.schema import Dialogue, Turn
from data_prep.shards import read_rows
from data_prep.tokenizer_loading import train_bpe_tokenizer
from pipeline.evaluation.perplexity import tokenized
from pipeline.inference.chat_turns import CHAT_TEMPLATE, TurnEncoder
from tests.chat_tokenizers import llama3_tokenizer, mistral_tokenizer

TOKENIZERS = ["smollm2", "llama3", "mistral", "bpe"]
PLACEHOLDER = "zq"  # stands where the special token's text was: the template's own ids are counted from it
ROLES = ("user", "assistant")


def contexts(special: str) -> list[str]:
    """One dialogue's utterances: the special token's text at the start, middle and end of an utterance, and alone."""
    return [f"{special} starts here", f"in the {special} middle", f"at the end {special}", special]


@pytest.fixture(scope="module")
def tokenizer_dirs(tokenizer_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("toks")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"c{i}", "messages": [{"role": "user", "content": f"hello number {i} there"}]})
                              + "\n" for i in range(20)))
    return {"smollm2": tokenizer_dir, "llama3": llama3_tokenizer(tokenizer_dir, str(root / "llama3")),
            "mistral": mistral_tokenizer(tokenizer_dir, str(root / "mistral")),
            "bpe": train_bpe_tokenizer([str(corpus)], str(root / "bpe"), vocab_size=300)}


def load(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def special_tokens(tok) -> list[str]:
    """Every special token: ``all_special_tokens`` plus added tokens marked special."""
    added = [t.content for t in tok.added_tokens_decoder.values() if t.special]
    return sorted(set(tok.all_special_tokens) | set(added))


def special_ids(tok) -> set[int]:
    return {tok.convert_tokens_to_ids(t) for t in special_tokens(tok)}


def layouts(tok) -> list[str]:
    return ["plain", CHAT_TEMPLATE] if tok.chat_template else ["plain"]


CASES = [(name, layout) for name in TOKENIZERS for layout in ("plain", CHAT_TEMPLATE) if (name, layout) != ("bpe", CHAT_TEMPLATE)]


def write_dialogues(tok, path) -> list[tuple[str, str, list[str]]]:
    """One dialogue per special token (``t<k>``) and its placeholder twin (``p<k>``); returns (id, special, texts)."""
    rows = []
    for k, special in enumerate(special_tokens(tok)):
        rows += [(f"t{k}", special, contexts(special)), (f"p{k}", special, contexts(PLACEHOLDER))]
    path.write_text("".join(json.dumps({"id": did, "messages": [{"role": ROLES[i % 2], "content": t}
                                                                 for i, t in enumerate(texts)]}) + "\n"
                            for did, _, texts in rows))
    return rows


def config(path: str, layout: str, **engine) -> DataConfig:
    return DataConfig(tokenizer=path, template=layout, seq_len=256, **engine)


def dialogues_of(out) -> dict[str, list[tuple[int, bool, int]]]:
    """dialogue id -> its (token, eou, utt) triples, from the packed dialogue rows."""
    found: dict[str, list] = {}
    for row in read_rows(str(out), (DIALOGUE,)).to_pylist():
        for tok_id, eou, utt, doc in zip(row[INPUT_IDS], row[EOU], row[UTT_IDS], row[DOC_IDS]):
            if doc >= 0:
                found.setdefault(row[DIALOGUE_IDS][doc].rsplit(":", 1)[-1], []).append((tok_id, eou, utt))
    return found


def utterance_texts(tok, tokens) -> list[str]:
    """Decode each utterance's tokens (EoU and the sink's utterance 0 excluded)."""
    by_utt: dict[int, list[int]] = {}
    for tok_id, eou, utt in tokens:
        if utt > 0 and not eou:
            by_utt.setdefault(utt, []).append(tok_id)
    return [tok.decode(ids) for _, ids in sorted(by_utt.items())]


def assert_in_order(texts: list[str], decoded: str) -> None:
    """Each text appears in ``decoded``, in order."""
    start = 0
    for text in texts:
        start = decoded.find(text, start)
        assert start >= 0, (text, decoded)
        start += len(text)


@pytest.fixture(scope="module")
def local_preps(tokenizer_dirs, tmp_path_factory) -> dict:
    """(tokenizer, layout) -> (input file, output folder, dialogues written), prepared once on the local engine."""
    root, done = tmp_path_factory.mktemp("prep"), {}
    for name, layout in CASES:
        tok = load(tokenizer_dirs[name])
        assert layout in layouts(tok)
        src = root / f"{name}-{layout}.jsonl"
        rows = write_dialogues(tok, src)
        out = root / f"{name}-{layout}-local"
        prepare([str(src)], str(out), config(tokenizer_dirs[name], layout, engine="local"), progress=False)
        done[name, layout] = (src, out, rows)
    return done


@pytest.mark.parametrize("name", TOKENIZERS)
def test_prep_plain_layout_special_ids_only_at_the_sink_and_eous(tokenizer_dirs, local_preps, name):
    tok = load(tokenizer_dirs[name])
    _, out, rows = local_preps[name, "plain"]
    specials, found = special_ids(tok), dialogues_of(out)
    assert len(specials) >= 3
    for did, special, texts in rows:
        tokens = found[did]
        assert tokens[0][2] == 0 and tokens[0][0] in specials  # the sink
        for i, (tok_id, eou, utt) in enumerate(tokens[1:], start=1):
            assert (tok_id in specials) == eou, f"{name} {special!r}: special id {tok_id} at position {i} (eou={eou})"
        assert utterance_texts(tok, tokens) == texts
        assert sum(e for _, e, _ in tokens) == len(texts)


@pytest.mark.parametrize("name", [n for n in TOKENIZERS if n != "bpe"])
def test_prep_chat_layout_special_ids_are_only_the_templates_own(tokenizer_dirs, local_preps, name):
    tok = load(tokenizer_dirs[name])
    _, out, rows = local_preps[name, CHAT_TEMPLATE]
    specials, found = special_ids(tok), dialogues_of(out)
    for did, special, texts in rows:
        if not did.startswith("t"):
            continue
        tokens, twin = found[did], found["p" + did[1:]]
        ours = Counter(t for t, _, _ in tokens if t in specials)
        template_own = Counter(t for t, _, _ in twin if t in specials)
        assert ours == template_own, f"{name} {special!r}: special ids {ours} but the template alone gives {template_own}"
        assert_in_order(texts, "".join(utterance_texts(tok, tokens)))  # Mistral's utterance is a user/assistant pair
        eou_id = json.loads((out / "manifest.json").read_text())["tokenizer"]["eou_id"]
        eous = sum(e for _, e, _ in tokens)
        assert eous == sum(e for _, e, _ in twin) == Counter(t for t, _, _ in tokens)[eou_id] >= 2


@pytest.mark.slow
def test_ray_engine_writes_the_local_engines_bytes(tokenizer_dirs, local_preps, tmp_path):
    """One embedded Ray session for every tokenizer and layout: each output file identical to the local engine's."""
    for (name, layout), (src, local, _) in local_preps.items():
        ray_out = tmp_path / f"{name}-{layout}-ray"
        prepare([str(src)], str(ray_out), config(tokenizer_dirs[name], layout, engine="ray", workers=2, chunk_records=8),
                progress=False)
        files = sorted(p.name for p in local.iterdir() if p.is_file() and p.name != "run.json")
        assert "dialogue-00000.parquet" in files
        for f in files:
            assert (local / f).read_bytes() == (ray_out / f).read_bytes(), (name, layout, f)


def check_encoding(tok, utts: list[list[int]], twin_utts: list[list[int]], texts: list[str], layout: str, where: str):
    """Plain: each utterance is exactly its text's ids, no special id. Chat: the texts decode in order and the special
    ids are exactly those of the same turns with a placeholder for the special token's text (the template's own)."""
    specials = special_ids(tok)
    if layout == "plain":
        for ids, text in zip(utts, texts, strict=True):
            assert not specials & set(ids), f"{where}: special ids {specials & set(ids)} from the text {text!r}"
            assert tok.decode(ids) == text
    flat, twin_flat = sum(utts, []), sum(twin_utts, [])
    assert_in_order(texts, tok.decode(flat))
    ours, own = Counter(i for i in flat if i in specials), Counter(i for i in twin_flat if i in specials)
    assert ours == own, f"{where}: special ids {ours}, the template alone gives {own}"


def _fed_for_user_turn(enc: TurnEncoder, text: str) -> list[int]:
    """What chat feeds for a user turn: its utterance, or (a template that closes only assistant turns, Mistral) the
    reply's opening that holds it; a short reply follows, so the next user turn alternates."""
    ids = enc.user(text)
    if ids is None:
        ids = enc.reply_prefix()
        enc.replied("ok")
    return ids


@pytest.mark.parametrize("name,layout", CASES)
def test_chat_user_turns_feed_no_special_id_from_the_text(tokenizer_dirs, name, layout):
    tok = load(tokenizer_dirs[name])
    assert layout in layouts(tok)
    for special in special_tokens(tok):
        enc, twin = TurnEncoder(tok, {"template": layout}), TurnEncoder(tok, {"template": layout})
        for text in contexts(special):  # successive user turns of one conversation
            ids, twin_ids = _fed_for_user_turn(enc, text), _fed_for_user_turn(twin, text.replace(special, PLACEHOLDER))
            check_encoding(tok, [ids], [twin_ids], [text], layout, f"chat {name} {special!r}")


@pytest.mark.parametrize("name,layout", CASES)
def test_eval_encodings_keep_special_text_as_text(tokenizer_dirs, name, layout):
    tok = load(tokenizer_dirs[name])
    assert layout in layouts(tok)
    for special in special_tokens(tok):
        texts, twins = contexts(special), contexts(PLACEHOLDER)
        d = [Dialogue("d", tuple(Turn(ROLES[i % 2], t) for i, t in enumerate(ts)), source="<eval>") for ts in (texts, twins)]
        (_, sys_, utts), (_, twin_sys, twin_utts) = tokenized(tok, d, 4096, {"template": layout})
        utts, twin_utts = [sys_] * (sys_ is not None) + utts, [twin_sys] * (twin_sys is not None) + twin_utts
        gen, twin_gen = (TurnEncoder(tok, {"template": layout}).continuation(ts[:-1]) for ts in (texts, twins))
        check_encoding(tok, utts, twin_utts, texts, layout, f"eval perplexity {name} {special!r}")
        chat = layout == CHAT_TEMPLATE  # the reply's opening (Mistral's holds the last user turn); none when plain
        assert chat or gen[1] == []
        check_encoding(tok, gen[0] + [gen[1]] * chat, twin_gen[0] + [twin_gen[1]] * chat, texts[:-1], layout,
                       f"eval generation {name} {special!r}")


def test_a_real_chat_turn_on_a_tiny_model_feeds_the_text_as_text(tmp_path, one_thread):
    """``open_conversation`` + ``user_turn`` on an exported tiny model: the conversation grows by exactly the text's
    own tokens and one EoU, and the reply follows (SmolLM2 tokenizer, every special token typed by the user)."""
    from pipeline.contract import CacheSettings
    from pipeline.inference.chat import open_conversation, user_turn
    from pipeline.modeling.loader import export_random_model, load_chat_model

    model, tok, info = load_chat_model(str(export_random_model(str(tmp_path / "tiny"))))
    conv, turns_in = open_conversation(model, tok, info, CacheSettings("dense"))
    specials = special_ids(tok)
    for special in special_tokens(tok):
        text = f"say {special} please"
        ids = turns_in.user(text)
        assert not specials & set(ids) and tok.decode(ids) == text
        before = conv.next_position
        user_turn(conv, turns_in, text)
        assert conv.next_position == before + len(ids) + 1  # the text's own tokens and one EoU, nothing else
        assert len(conv.generate(None, 2)) >= 1
