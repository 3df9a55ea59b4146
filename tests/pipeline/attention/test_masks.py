"""Every mask kind of method.md §2 against a per-element reference written directly from its definition (loops
over q and k), on packed rows with several dialogues and padding at the end, including the exact SMR/LMR layouts;
the mask parameters are one typed ``MaskParams``: a misspelled name, a dict or a loose keyword is an error."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from pipeline.attention.masks import MASK_BUILDERS, MaskParams, batch_dense_mask, bigbird_random_keys, dense_mask
from tests.pipeline.batches import random_packed_batch
from tests.pipeline.mask_reference import check_against_reference

PARAMS = MaskParams(local_window=5, sink_tokens=2, sink_window=4, bigbird_global=2, bigbird_window=3, bigbird_random=2, bigbird_seed=7)
KINDS = ["causal", "dialogue", "smr", "lmr", "local", "streamingllm", "bigbird"]


# --- exact memory-task layouts (the batch contract), packed several per row ------------------------------------

def smr_item(lengths: list[int]) -> dict:
    """``[BOS] (u_j EoU u_j' EoU)`` for j = 1..s: original of pair j has utt 2j-1, its copy 2j; blk = utt."""
    utt, eou = [0], [False]
    for j, n in enumerate(lengths, start=1):
        for u in (2 * j - 1, 2 * j):
            utt += [u] * (n + 1)
            eou += [False] * n + [True]
    return {"utt_ids": utt, "eou": eou, "blk": list(utt)}


def lmr_item(lengths: list[int], repeat: int) -> dict:
    """``[BOS]`` + l (query EoU response EoU) pairs + a repeat of pair ``repeat`` (1-based); utt 1, 2, 3, ... per
    utterance, blk = pair index (the repeated pair is l + 1)."""
    assert len(lengths) % 2 == 0
    pairs = [lengths[i:i + 2] for i in range(0, len(lengths), 2)] + [lengths[2 * repeat - 2:2 * repeat]]
    utt, eou, blk = [0], [False], [0]
    u = 0
    for p, (nq, nr) in enumerate(pairs, start=1):
        for n in (nq, nr):
            u += 1
            utt += [u] * (n + 1)
            eou += [False] * n + [True]
            blk += [p] * (n + 1)
    return {"utt_ids": utt, "eou": eou, "blk": blk}


def dialogue_item(lengths: list[int]) -> dict:
    utt, eou = [0], [False]
    for u, n in enumerate(lengths, start=1):
        utt += [u] * (n + 1)
        eou += [False] * n + [True]
    return {"utt_ids": utt, "eou": eou, "blk": list(utt)}


def pack(items_per_row: list[list[dict]], kinds: list[str], T: int) -> dict:
    """Rows of back-to-back items (doc 0, 1, ...; positions restart per item) and padding (-1) at the end."""
    B = len(items_per_row)
    out = {"doc_ids": torch.full((B, T), -1), "utt_ids": torch.full((B, T), -1), "blk": torch.full((B, T), -1),
           "eou": torch.zeros(B, T, dtype=torch.bool), "position_ids": torch.zeros(B, T, dtype=torch.long)}
    for b, items in enumerate(items_per_row):
        t = 0
        for d, it in enumerate(items):
            n = len(it["utt_ids"])
            assert t + n <= T, "items do not fit the row"
            out["doc_ids"][b, t:t + n] = d
            out["position_ids"][b, t:t + n] = torch.arange(n)
            for c in ("utt_ids", "blk", "eou"):
                out[c][b, t:t + n] = torch.tensor(it[c])
            t += n
    out["mask_kind"] = list(kinds)
    return out


def packed_memory_batch(T: int = 160, seed: int = 0) -> dict:
    """Two rows: SMR samples, LMR samples (several per row, varied lengths, padding at the end)."""
    rng = random.Random(seed)
    smr = [smr_item([rng.randint(1, 5) for _ in range(rng.randint(2, 4))]) for _ in range(3)]
    lmr = [lmr_item([rng.randint(1, 5) for _ in range(2 * l)], rng.randint(1, l)) for l in (3, 2, 2)]
    return pack([smr, lmr], ["smr", "lmr"], T)


def packed_kind_batch(kind: str, T: int, seed: int = 0, B: int = 2) -> dict:
    """B rows of one kind with its natural layout: SMR/LMR samples for those kinds, dialogues otherwise."""
    rng = random.Random(seed)
    rows = []
    for _ in range(B):
        items, used = [], 0
        while True:
            if kind == "smr":
                it = smr_item([rng.randint(1, 6) for _ in range(rng.randint(1, 4))])
            elif kind == "lmr":
                l = rng.randint(1, 3)
                it = lmr_item([rng.randint(1, 6) for _ in range(2 * l)], rng.randint(1, l))
            else:
                it = dialogue_item([rng.randint(1, 9) for _ in range(rng.randint(1, 8))])
            if used + len(it["utt_ids"]) > T - 3:
                break
            items.append(it)
            used += len(it["utt_ids"])
        rows.append(items)
    return pack(rows, [kind] * B, T)


@pytest.mark.parametrize("kind", KINDS)
def test_dense_mask_equals_reference_on_random_packed_rows(kind):
    batch = random_packed_batch(2, 96, [kind, kind], seed=3)
    assert (batch["doc_ids"][:, -1] == -1).all() and batch["doc_ids"].max() >= 2  # several docs, padding at the end
    check_against_reference(batch, dense_mask(kind, batch, PARAMS), [kind, kind], PARAMS)


@pytest.mark.parametrize("kind", KINDS)
def test_dense_mask_equals_reference_on_natural_layouts(kind):
    batch = packed_kind_batch(kind, 90, seed=11)
    check_against_reference(batch, dense_mask(kind, batch, PARAMS), [kind, kind], PARAMS)


def test_mixed_batch_uses_each_rows_kind():
    batch = random_packed_batch(len(KINDS), 64, KINDS, seed=5)
    check_against_reference(batch, batch_dense_mask(batch, PARAMS), KINDS, PARAMS)
    memory = packed_memory_batch()
    check_against_reference(memory, batch_dense_mask(memory, PARAMS), ["smr", "lmr"], PARAMS)


def test_kinds_really_differ():
    """Guards the reference comparison: a builder silently returning causal would fail here."""
    batch = random_packed_batch(1, 96, ["dialogue"], seed=3)
    causal = dense_mask("causal", batch)
    for kind in KINDS[1:]:
        assert not torch.equal(dense_mask(kind, batch, PARAMS), causal), kind
    assert set(MASK_BUILDERS) == set(KINDS)


def test_smr_layout_drawing():
    # [BOS] a E a' E' b E  (blk 0 1 1 2 2 3 3), the drawing in smr_mask's docstring
    item = smr_item([1])
    item = {c: item[c] + v for c, v in (("utt_ids", [3, 3]), ("eou", [False, True]), ("blk", [3, 3]))}
    m = dense_mask("smr", pack([[item]], ["smr"], 7))[0].int().tolist()
    assert m == [[1, 0, 0, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0, 0, 0],
                 [1, 1, 1, 0, 0, 0, 0],
                 [1, 0, 1, 1, 0, 0, 0],
                 [1, 0, 1, 1, 1, 0, 0],
                 [1, 0, 0, 0, 0, 1, 0],
                 [1, 0, 0, 0, 0, 1, 1]]


def test_lmr_repeated_pair_sees_only_bos_history_eous_and_itself():
    # [BOS] q1 q1 E r1 E q2 E r2 E | repeat of pair 1: q1' q1' E r1' E
    row = pack([[lmr_item([2, 1, 1, 1], repeat=1)]], ["lmr"], 15)
    m = dense_mask("lmr", row)[0]
    history_eous = {3, 5, 7, 9}
    for q in (10, 11, 12):  # the repeated query
        assert set(m[q].nonzero().squeeze(1).tolist()) == {0} | history_eous | set(range(10, q + 1))
    for q in (13, 14):  # the repeated response also sees its own query
        assert set(m[q].nonzero().squeeze(1).tolist()) == {0} | history_eous | set(range(10, q + 1))
    for q in (4, 5):  # a history response sees its query and the EoUs before it
        assert set(m[q].nonzero().squeeze(1).tolist()) == set(range(0, q + 1))
    assert set(m[6].nonzero().squeeze(1).tolist()) == {0, 3, 5, 6}  # the next query: BOS, EoUs, itself


def test_smr_copy_sees_only_bos_its_original_eou_and_itself():
    row = pack([[smr_item([2, 1])]], ["smr"], 11)  # [BOS] a a E a' a' E' b E b' E'
    m = dense_mask("smr", row)[0]
    for q in (4, 5, 6):
        assert set(m[q].nonzero().squeeze(1).tolist()) == {0, 3} | set(range(4, q + 1))
    for q in (9, 10):
        assert set(m[q].nonzero().squeeze(1).tolist()) == {0, 8} | set(range(9, q + 1))
    assert set(m[7].nonzero().squeeze(1).tolist()) == {0, 7}  # a new original sees only BOS and itself


def test_baselines_count_sinks_from_each_dialogue_start():
    row = pack([[dialogue_item([3, 3]), dialogue_item([4, 4])]], ["streamingllm"], 24)  # docs at 0 and 9
    m = dense_mask("streamingllm", row, MaskParams(sink_tokens=2, sink_window=3))[0]
    assert set(m[18].nonzero().squeeze(1).tolist()) == {9, 10, 16, 17, 18}
    m = dense_mask("bigbird", row, MaskParams(bigbird_global=1, bigbird_window=2, bigbird_random=0))[0]
    assert set(m[18].nonzero().squeeze(1).tolist()) == {9, 17, 18}
    m = dense_mask("local", row, MaskParams(local_window=30))[0]
    assert set(m[10].nonzero().squeeze(1).tolist()) == {9, 10}  # the window never crosses into another dialogue


def test_bigbird_draw_is_seeded_per_row_and_independent_of_neighbours():
    a = random_packed_batch(2, 64, ["bigbird", "dialogue"], seed=1)
    b = random_packed_batch(2, 64, ["bigbird", "smr"], seed=1)
    ra = bigbird_random_keys(a, 3, 5)
    assert torch.equal(ra, bigbird_random_keys(a, 3, 5))
    assert not torch.equal(ra, bigbird_random_keys(a, 3, 6))
    q = torch.arange(64).view(-1, 1)
    assert ((ra[0] >= 0) & (ra[0] < q) | (ra[0] == -1) & (q == 0)).all()  # earlier keys only
    assert torch.equal(batch_dense_mask(a, PARAMS)[0], batch_dense_mask(b, PARAMS)[0])
    assert torch.equal(batch_dense_mask(a, PARAMS)[0], dense_mask("bigbird", a, PARAMS)[0])


def test_unknown_kind_is_an_error():
    batch = random_packed_batch(1, 16, ["dialogue"])
    with pytest.raises(ValueError, match="unknown mask kind 'nope'"):
        dense_mask("nope", batch)


# --- mask parameters are one typed object ----------------------------------------------------------------------

def test_mask_params_reject_unknown_names():
    from pydantic import ValidationError

    from pipeline.config import MaskConfig

    with pytest.raises(TypeError, match="local_windw"):
        MaskParams(local_windw=3)
    with pytest.raises(ValidationError, match="local_windw"):
        MaskConfig(local_windw=3)
    assert MaskConfig().params() == MaskParams()  # the same defaults
    assert set(MaskConfig.model_fields) == {f.name for f in dataclasses.fields(MaskParams)} | {"dialogue_kind"}
    assert MaskConfig(local_window=3, dialogue_kind="local").params() == MaskParams(local_window=3)
    with pytest.raises(Exception):  # frozen: a builder cannot change what the next one sees
        PARAMS.local_window = 1


def _every_builder():
    """(name, call(params)) for every function or class that takes the mask parameters."""
    from pipeline.attention import sink_kernel as sk
    from pipeline.attention.masks import mask_mod
    from pipeline.attention.registry import prepare_attention
    from pipeline.training.flops import mask_stats

    batch = random_packed_batch(2, 64, ["local", "bigbird"], seed=2)
    row = {c: v[:1] for c, v in batch.items() if c != "mask_kind"}
    calls = [(f"MASK_BUILDERS[{k!r}]", lambda p, k=k: MASK_BUILDERS[k](batch, p)) for k in MASK_BUILDERS]
    calls += [
        ("mask_mod", lambda p: mask_mod("local", batch, p)),
        ("dense_mask", lambda p: dense_mask("local", batch, p)),
        ("batch_dense_mask", lambda p: batch_dense_mask(batch, p)),
        ("sink_kernel.batch_meta", lambda p: sk.batch_meta(batch, p)),
        ("sink_kernel.band_start", lambda p: sk.band_start("local", row, p)),
        ("sink_kernel.sink_keys", lambda p: sk.sink_keys("streamingllm", row, p)),
        ("sink_plan.row_parts", lambda p: sk.row_parts("local", row, p)),
        ("sink_plan.SinkPlan", lambda p: sk.SinkPlan(batch, p)),
        ("sink_kernel.sinks_first_permutation", lambda p: sk.sinks_first_permutation(batch, p)),
        ("sink_kernel.mixed_mask_mod", lambda p: sk.mixed_mask_mod(batch, p)),
        ("SinkAttention", lambda p: sk.SinkAttention(batch, p)),
        ("FlexSinkAttention", lambda p: sk.FlexSinkAttention(batch, p)),
        ("prepare_sink_attention", lambda p: sk.prepare_sink_attention(batch, "sink", p)),
        *[(f"prepare_attention({impl!r})", lambda p, impl=impl: prepare_attention(batch, impl, p)) for impl in ("dense", "sink", "flex")],
        ("flops.mask_stats", lambda p: mask_stats(batch, ["local", "bigbird"], p)),
    ]
    return calls


def test_every_builder_takes_mask_params_and_rejects_a_dict():
    from pipeline.config import MaskConfig

    dumped = MaskConfig().model_dump()  # the old calling convention: a dict whose unknown names were ignored
    for name, call in _every_builder():
        call(MaskParams(local_window=3))
        for bad in (dumped, {"local_windw": 3}, {}):
            with pytest.raises(TypeError, match="MaskParams"):
                call(bad)
                pytest.fail(f"{name} accepted {bad!r}")


def test_builders_take_no_loose_parameter_names():
    from pipeline.attention.sink_kernel import SinkAttention
    from pipeline.training.flops import mask_stats

    batch = random_packed_batch(1, 32, ["local"])
    for call in (lambda: dense_mask("local", batch, local_window=3), lambda: dense_mask("local", batch, local_windw=3),
                 lambda: batch_dense_mask(batch, local_window=3), lambda: SinkAttention(batch, local_window=3),
                 lambda: mask_stats(batch, ["local"], MaskParams(), local_window=3)):
        with pytest.raises(TypeError, match="unexpected keyword"):
            call()
