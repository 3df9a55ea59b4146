"""A pinned system prompt (issue 11 item 3): a leading system turn laid out with utterance index 0 (BOS, its tokens
and its EoU share ``utt == 0``) is a sink like BOS. Every later token of the dialogue sees all of it, in the dense
predicates, the per-element reference, the CPU gather kernel, the FlexAttention mask (CPU forward) and under
sequence parallelism (Ulysses, 2 gloo processes); on today's data (utt 0 = BOS only) the rule is the old one."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.attention.masks import MaskParams, batch_dense_mask
from pipeline.attention.registry import DenseMaskAttention
from pipeline.attention.sink_kernel import FlexSinkAttention, SinkAttention, sink_keys
from pipeline.contract import DIALOGUE, DIALOGUE_STAGE, DOC_IDS, LMR, MEMORY_STAGE, SMR, STAGE_KINDS, UTT_IDS
from tests.pipeline.attention.test_masks import dialogue_item, lmr_item, pack
from tests.pipeline.mask_reference import check_against_reference

PARAMS = MaskParams()
TOL = 1e-5


def pinned(item: dict, system_len: int) -> dict:
    """``item`` with a system turn of ``system_len`` tokens and its EoU inserted after BOS, all with utt 0 / blk 0."""
    n = system_len + 1
    return {"utt_ids": [0] + [0] * n + item["utt_ids"][1:], "eou": [False] + [False] * system_len + [True] + item["eou"][1:],
            "blk": [0] + [0] * n + item["blk"][1:]}


def pinned_batch(T: int = 256, seed: int = 0) -> dict:
    """Row 0: dialogues (most with a pinned system turn, one without); row 1: LMR samples, one pinned."""
    rng = random.Random(seed)
    dialogues = [pinned(dialogue_item([rng.randint(2, 9) for _ in range(9)]), 11),
                 dialogue_item([rng.randint(2, 6) for _ in range(4)]),
                 pinned(dialogue_item([rng.randint(2, 9) for _ in range(8)]), 5)]
    lmr = [pinned(lmr_item([rng.randint(2, 6) for _ in range(6)], 2), 7), lmr_item([3, 4, 2, 5], 1)]
    return pack([dialogues, lmr], [DIALOGUE, LMR], T)


def sink_columns(batch: dict, b: int) -> dict:
    """Per query of row ``b``: the positions of its dialogue's utt-0 keys (BOS + the pinned system turn)."""
    doc, utt = batch[DOC_IDS][b], batch[UTT_IDS][b]
    return {int(d): (doc == d) & (utt == 0) for d in doc.unique().tolist() if d >= 0}


def test_every_later_token_sees_the_whole_pinned_system_turn():
    batch = pinned_batch()
    mask = batch_dense_mask(batch, PARAMS)
    checked = 0
    for b in range(2):
        for d, cols in sink_columns(batch, b).items():
            later = ((batch[DOC_IDS][b] == d) & (batch[UTT_IDS][b] >= 2)).nonzero().squeeze(1)
            assert mask[b][later][:, cols].all(), f"row {b} dialogue {d}: a later token misses a system key"
            checked += int(later.numel()) * int(cols.sum())
    assert checked > 1000
    # the pinned turn is more than BOS, and far utterances really lose their non-sink history (the test can fail)
    assert int((batch[UTT_IDS][0] == 0).sum()) > 3
    q = int((batch[UTT_IDS][0] == 9).nonzero()[0])
    assert not mask[0, q, int((batch[UTT_IDS][0] == 3).nonzero()[0])]


def test_predicates_equal_the_reference_with_a_pinned_turn():
    batch = pinned_batch(T=160, seed=1)
    check_against_reference(batch, batch_dense_mask(batch, PARAMS), [DIALOGUE, LMR], PARAMS)
    for b, kind in enumerate([DIALOGUE, LMR]):
        row = {c: v[b:b + 1] for c, v in batch.items() if torch.is_tensor(v)}
        assert torch.equal(sink_keys(kind, row, PARAMS) & (batch[UTT_IDS][b] == 0), batch[UTT_IDS][b] == 0)


def compare_sink_kernel(batch, chunk):
    B, T = batch[DOC_IDS].shape
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, 4, T, 16, generator=g).requires_grad_()
    k, v = (torch.randn(B, 2, T, 16, generator=g).requires_grad_() for _ in range(2))
    grad = torch.randn(B, 4, T, 16, generator=g)
    ref = DenseMaskAttention(batch_dense_mask(batch, PARAMS))(q, k, v, 0.25)
    g_ref = torch.autograd.grad(ref, (q, k, v), grad)
    out = SinkAttention(batch, PARAMS, chunk=chunk)(q, k, v, 0.25)
    g_out = torch.autograd.grad(out, (q, k, v), grad)
    assert (out - ref).abs().max() <= TOL
    for name, a, r in zip("qkv", g_out, g_ref):
        assert (a - r).abs().max() <= TOL, f"d{name}"
    return ref.detach()


def test_cpu_gather_kernel_equals_dense_with_a_pinned_turn():
    batch = pinned_batch()
    ref = compare_sink_kernel(batch, chunk=16)  # small chunks: the system turn lies before most chunks' band
    # control: the same tokens with the system turn as an ordinary utterance 1 give another result
    shifted = dict(batch, utt_ids=torch.where(batch[UTT_IDS] > 0, batch[UTT_IDS] + 1, batch[UTT_IDS]))
    is_system = (batch[UTT_IDS] == 0) & (batch["position_ids"] > 0)
    shifted[UTT_IDS] = torch.where(is_system, torch.ones_like(batch[UTT_IDS]), shifted[UTT_IDS])
    other = compare_sink_kernel(shifted, chunk=16)
    assert (other - ref).abs().max() > 1e-2


def test_flex_forward_on_cpu_equals_dense_with_a_pinned_turn():
    batch = pinned_batch(T=300)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 2, 300, 16, generator=g)
    k, v = (torch.randn(2, 1, 300, 16, generator=g) for _ in range(2))
    ref = DenseMaskAttention(batch_dense_mask(batch, PARAMS))(q, k, v, 0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex on CPU warns that it is unfused
        for permute in (True, False):
            out = FlexSinkAttention(batch, PARAMS, permute=permute)(q, k, v, 0.25)
            assert (out - ref).abs().max() <= TOL, permute


def test_on_todays_shards_utt_zero_is_only_bos(shards):
    """Without pinning, the new rule (every utt-0 key is a sink) is the old one (the dialogue's first key is): on
    prepared shards, every dialogue, SMR and LMR sample has exactly one utt-0 token, its first."""
    from pipeline.training.shard_loader import load_shards

    rows = 0
    for stage in (DIALOGUE_STAGE, MEMORY_STAGE):
        try:
            data = load_shards(shards, stage)
        except ValueError:  # the shards hold no rows of this stage
            assert stage == MEMORY_STAGE
            continue
        doc, utt = (torch.from_numpy(data.arrays[c].copy()).long() for c in (DOC_IDS, UTT_IDS))
        for b in range(doc.shape[0]):
            for d in doc[b].unique().tolist():
                if d < 0:
                    continue
                idx = (doc[b] == d).nonzero().squeeze(1)
                assert (utt[b, idx] == 0).nonzero().squeeze(1).tolist() == [0], (stage, b, d)
            rows += 1
        assert set(data.mask_kind) <= set(STAGE_KINDS[stage])
    assert rows > 0


def test_on_real_smr_and_lmr_samples_utt_zero_is_only_bos(tokenizer, shared_data):
    """SMR and LMR samples (the memory stage) built from real MSC utterances: utt 0 is BOS alone, so their sinks
    are unchanged by the rule."""
    from data_prep.adapters import iter_dialogues
    from data_prep.memory_tasks import lmr_sample, smr_sample
    from data_prep.tokenizer_loading import prepare_tokenizer

    ids = prepare_tokenizer(tokenizer)
    samples = []
    for i, d in enumerate(iter_dialogues(str(shared_data / "msc" / "session_2_test.jsonl"), "msc")):
        if i == 20:
            break
        u = [tokenizer(t.text, add_special_tokens=False)["input_ids"] for t in d.turns]
        samples.append(smr_sample(f"s{i}", u, ids, 512))
        pairs = list(zip(u[0::2], u[1::2]))
        samples.append(lmr_sample(f"l{i}", pairs, i % len(pairs), ids, True))
    assert {s.mask_kind for s in samples} == {SMR, LMR} and len(samples) == 40
    for s in samples:
        assert [i for i, x in enumerate(s.utt_ids) if x == 0] == [0], s.dialogue_id
        assert s.input_ids[0] == ids.bos and len(s.utt_ids) > 20


# --- sequence parallelism: Ulysses over 2 gloo processes with a pinned row ------------------------------------

B, H, HKV, T, D, P = 2, 4, 2, 256, 8, 2


def sp_inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, HKV, T, D, generator=g), torch.randn(B, HKV, T, D, generator=g)
    return pinned_batch(T), q, k, v, torch.randn(B, H, T, D, generator=g)


def _worker(rank, store, out_path):
    from pipeline.attention.ulysses import ulysses_attention

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=P)
    try:
        batch, q, k, v, grad = sp_inputs()
        n = T // P
        local = [t[:, :, rank * n:(rank + 1) * n].clone().requires_grad_() for t in (q, k, v)]
        out = ulysses_attention(SinkAttention(batch, PARAMS, chunk=32), dist.group.WORLD)(*local, D ** -0.5)
        out.backward(grad[:, :, rank * n:(rank + 1) * n])
        torch.save((out.detach(), [t.grad for t in local]), f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ulysses_with_a_pinned_row_equals_single_process(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "store"), str(tmp_path / "res")), nprocs=P, join=True,
                       start_method="fork")
    parts = [torch.load(f"{tmp_path / 'res'}.{r}", weights_only=True) for r in range(P)]
    out = torch.cat([p[0] for p in parts], dim=2)
    grads = [torch.cat([p[1][i] for p in parts], dim=2) for i in range(3)]
    batch, q, k, v, grad = sp_inputs()
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    ref = DenseMaskAttention(batch_dense_mask(batch, PARAMS))(q, k, v, D ** -0.5)
    ref.backward(grad)
    assert (out - ref.detach()).abs().max() <= TOL
    for a, r in zip(grads, (q.grad, k.grad, v.grad)):
        assert (a - r).abs().max() <= TOL
    # the pinned rule matters here: the unpinned reading of the same row (system turn = utterance 1) differs
    unpinned = dict(batch, utt_ids=torch.where((batch[UTT_IDS] == 0) & (batch["position_ids"] > 0), 1,
                                               torch.where(batch[UTT_IDS] > 0, batch[UTT_IDS] + 1, batch[UTT_IDS])))
    other = DenseMaskAttention(batch_dense_mask(unpinned, PARAMS))(q.detach(), k.detach(), v.detach(), D ** -0.5)
    assert (out - other).abs().max() > 1e-2
