"""SMR and LMR samples (method.md §2), checked directly from the shard columns."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.config import DataConfig, LMRConfig, SMRConfig
from data_prep.memory_tasks import Corpus, build_lmr, build_smr, smr_plan
from data_prep.prep import prepare
from data_prep.shards import read_manifest, read_rows
from data_prep.tokenizer_loading import SpecialIds

S, L = 8, 5


@pytest.fixture(scope="module")
def memory(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mem") / "shards"
    prepare([str(shared_data / "msc" / "session_2_valid.jsonl"), str(shared_data / "personachat" / "valid.json")], str(out),
            DataConfig(seq_len=1024, engine="local", max_dialogues=60, smr={"samples": 6, "utterances_per_sample": S},
                       lmr={"samples": 6, "pairs_per_sample": L}), progress=False)
    return str(out)


def _samples(data_dir, kind):
    table = read_rows(data_dir, (kind,))
    assert table.num_rows > 0
    for row in table.to_pylist():
        assert row["mask_kind"] == kind
        doc = np.array(row["doc_ids"])
        for d, name in enumerate(row["dialogue_ids"]):
            idx = np.nonzero(doc == d)[0]
            yield name, {c: np.array(row[c])[idx] for c in ("input_ids", "labels", "utt_ids", "blk", "eou", "position_ids")}


def _segments(s):
    """(index, tokens without EoU) per utterance, from the utt_ids / eou columns."""
    out = []
    for u in range(1, int(s["utt_ids"].max()) + 1):
        m = s["utt_ids"] == u
        assert s["eou"][m].tolist() == [False] * (m.sum() - 1) + [True], "an utterance and its EoU share an index"
        out.append(s["input_ids"][m][:-1])
    return out


def test_smr_layout_and_labels(memory):
    eou = read_manifest(memory)["tokenizer"]["eou_id"]
    bos = read_manifest(memory)["tokenizer"]["bos_id"]
    names = []
    for name, s in _samples(memory, "smr"):
        names.append(name)
        assert s["input_ids"][0] == bos and s["utt_ids"][0] == 0 and s["labels"][0] == -100
        assert (s["position_ids"] == np.arange(len(s["input_ids"]))).all(), "positions restart at 0 per sample"
        assert (s["blk"] == s["utt_ids"]).all()
        segs = _segments(s)
        assert len(segs) == 2 * S
        for j in range(1, S + 1):
            orig, copy = s["utt_ids"] == 2 * j - 1, s["utt_ids"] == 2 * j
            assert (s["input_ids"][orig] == s["input_ids"][copy]).all() and s["input_ids"][copy][-1] == eou, "verbatim copy"
            assert (s["labels"][orig] == -100).all(), "no loss on the original"
            assert (s["labels"][copy] == s["input_ids"][copy]).all(), "loss on the copy and its EoU, at its own position"
        assert len({tuple(x) for x in segs[::2]}) == S, "unrelated utterances"
    assert sorted(names) == [f"smr-{i}" for i in range(6)]


@pytest.mark.parametrize("supervise", [False, True])
def test_lmr_layout_and_labels(shared_data, tmp_path, supervise):
    out = tmp_path / "lmr"
    m = prepare([str(shared_data / "msc" / "session_2_valid.jsonl")], str(out),
                DataConfig(seq_len=1024, engine="local", max_dialogues=40,
                           lmr={"samples": 6, "pairs_per_sample": L, "supervise_repeated_response": supervise}), progress=False)
    assert m["counts"]["lmr_samples"] == 6
    bos = m["tokenizer"]["bos_id"]
    for name, s in _samples(str(out), "lmr"):
        utt, blk, lab, ids = s["utt_ids"], s["blk"], s["labels"], s["input_ids"]
        assert ids[0] == bos and utt[0] == 0 and blk[0] == 0 and lab[0] == -100
        segs = _segments(s)
        assert len(segs) == 2 * L + 2, "l pairs then the repeated pair"
        for p in range(1, L + 2):
            assert set(blk[(utt == 2 * p - 1) | (utt == 2 * p)].tolist()) == {p}, "pair p is block p; the repeat is l+1"
        rq, rr = segs[-2], segs[-1]
        assert any(np.array_equal(rq, segs[2 * k]) and np.array_equal(rr, segs[2 * k + 1]) for k in range(L)), "a repeat of one earlier pair"
        history = (blk >= 1) & (blk <= L)
        assert (lab[history] == ids[history]).all(), "loss on the whole history"
        assert (lab[utt == 2 * L + 1] == ids[utt == 2 * L + 1]).all(), "loss on the repeated query and its EoU"
        if supervise:
            assert (lab[utt == 2 * L + 2] == ids[utt == 2 * L + 2]).all()
        else:
            assert (lab[utt == 2 * L + 2] == -100).all(), "reference default: the repeated response is not supervised"


IDS = SpecialIds(bos=1, eou=2, pad=0)


def test_samples_are_seeded_and_chunk_independent():
    rng = np.random.default_rng(0)
    corpus = Corpus.from_lists([[list(rng.integers(3, 90, size=int(rng.integers(1, 12)))) for _ in range(int(rng.integers(1, 14)))]
                                for _ in range(50)])
    smr, lmr = SMRConfig(samples=20, utterances_per_sample=6), LMRConfig(samples=20, pairs_per_sample=4)
    whole, _ = build_smr(corpus, smr, IDS, 96, 7, 0, 20)
    parts = [build_smr(corpus, smr, IDS, 96, 7, a, a + 5, smr_plan(corpus, 96))[0] for a in range(0, 20, 5)]
    assert whole.to_pylist() == [r for p in parts for r in p.to_pylist()]
    assert build_smr(corpus, smr, IDS, 96, 8, 0, 20)[0].to_pylist() != whole.to_pylist(), "the seed matters"
    lw, stats = build_lmr(corpus, lmr, IDS, 96, 7, 0, 20)
    assert lw.to_pylist() == [r for a in range(0, 20, 4) for r in build_lmr(corpus, lmr, IDS, 96, 7, a, a + 4)[0].to_pylist()]
    assert stats["lmr_samples"] + stats["lmr_rejected_too_long"] == 20


def test_too_long_samples_are_shortened_or_rejected_and_counted():
    corpus = Corpus.from_lists([[[5] * 20 for _ in range(10)] for _ in range(30)])
    items, st = build_smr(corpus, SMRConfig(samples=3, utterances_per_sample=10), IDS, 100, 0, 0, 3)
    assert st["smr_shortened"] == 3 and all(len(x) <= 100 for x in items["input_ids"].to_pylist())
    items, st = build_lmr(corpus, LMRConfig(samples=3, pairs_per_sample=5), IDS, 200, 0, 0, 3)
    assert st["lmr_shortened"] == 3 and all(len(x) <= 200 for x in items["input_ids"].to_pylist())
    items, st = build_lmr(corpus, LMRConfig(samples=3, pairs_per_sample=5), IDS, 100, 0, 0, 3)
    assert st["lmr_rejected_too_long"] == 3 and items.num_rows == 0
    plan = smr_plan(Corpus.from_lists([[[5] * 60, [6] * 3]]), 100)
    assert plan["long_utterances"] == 1


def test_smr_max_utterance_tokens_draws_only_short_utterances():
    rng = np.random.default_rng(1)
    corpus = Corpus.from_lists([[[int(t) for t in rng.integers(3, 90, size=int(n))] for n in rng.integers(1, 30, size=6)]
                                for _ in range(40)])
    cfg = SMRConfig(samples=10, utterances_per_sample=4, max_utterance_tokens=8)
    plan = smr_plan(corpus, 512, cfg.max_utterance_tokens)
    assert plan["long_utterances"] == int((corpus.utt_len() > 8).sum()) > 0
    items, _ = build_smr(corpus, cfg, IDS, 512, 0, 0, 10)
    for ids, blk in zip(items["input_ids"].to_pylist(), items["blk"].to_pylist()):
        blocks = np.asarray(blk)
        for b in set(blk) - {0}:
            assert (blocks == b).sum() - 1 <= 8, "an utterance longer than the cap was drawn"
    uncapped, _ = build_smr(corpus, SMRConfig(samples=10, utterances_per_sample=4), IDS, 512, 0, 0, 10)
    assert max(len(x) for x in uncapped["input_ids"].to_pylist()) > max(len(x) for x in items["input_ids"].to_pylist())
