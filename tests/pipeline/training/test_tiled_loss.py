"""Activation checkpointing, the tiled loss and the tiled MLP change nothing but memory: on real packed rows (several
dialogues per row, SMR and LMR samples) a tiny random-init Llama gives the same per-task losses and the same gradient
of every parameter (fp32, 1e-5) with checkpointing on/off x tiled/untiled loss x tiled/untiled MLP, with tied or
untied embeddings and with LoRA (on attention, or on the MLP alone); the attention plan is built once per batch while
the layers are recomputed; the tiled loss never saves a (T, V) tensor, the tiled MLP no (T, intermediate) one; the
held-out eval figures are the same; the GPU recipes turn them on."""

from __future__ import annotations

import os

import pytest
import torch

from data_prep.tokenizer_loading import SpecialIds
from pipeline.attention.ulysses import SequenceParallel
from pipeline.config import ConfigError, ModelConfig, load_config
from pipeline.contract import DIALOGUE, DOC_IDS, INPUT_IDS, LMR, MASK_KIND, SMR, TARGETS
from pipeline.modeling.forward import enable_activation_checkpointing
from pipeline.modeling.loader import build_model
from pipeline.modeling.tiled_mlp import enable_tiled_mlp, tiled_mlp_layers, tiled_shards
from pipeline.training.tiled_loss import batch_task_sums, batch_token_stats
from tests.repo import REPO

CHUNK = 50  # does not divide B*T = 3*128: the last chunk is short and chunks straddle rows
ONE = SequenceParallel(1)


@pytest.fixture(scope="module")
def packed(tmp_path_factory, shared_data):
    """(batch of 3 real rows: a packed dialogue row, an SMR row, an LMR row; special ids; vocabulary size)."""
    from data_prep.prep import prepare
    from data_prep.shards import read_manifest
    from pipeline.training.shard_loader import load_shards

    out = str(tmp_path_factory.mktemp("tiled") / "shards")
    prepare([str(shared_data / "msc" / "session_3_valid.jsonl")], out,
            load_config(None, ["data.seq_len=128", "data.max_dialogues=16", "data.engine=local", "data.smr.samples=8",
                               "data.smr.utterances_per_sample=3", "data.lmr.samples=8",
                               "data.lmr.pairs_per_sample=2"]).data, progress=False)
    dialogue, memory = load_shards(out, "dialogue"), load_shards(out, "memory")
    rows = [(dialogue, int(dialogue.arrays[DOC_IDS].max(1).argmax()))]  # the row packing the most dialogues
    rows += [(memory, int(memory.rows_of[kind][0])) for kind in (SMR, LMR)]
    from pipeline.contract import batch_from_rows

    parts = [batch_from_rows(data.arrays, data.mask_kind, [r]) for data, r in rows]
    batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if torch.is_tensor(parts[0][k])}
    batch[MASK_KIND] = [p[MASK_KIND][0] for p in parts]
    assert batch[MASK_KIND] == [DIALOGUE, SMR, LMR] and int(batch[DOC_IDS][0].max()) >= 1  # packed dialogues
    tok = read_manifest(out)["tokenizer"]
    return batch, SpecialIds(tok["bos_id"], tok["eou_id"], tok["pad_id"]), tok["vocab_size"]


MLP_CHUNK = 40  # 3 chunks of a 128-token row; 10 of the 384 flattened positions in backward


def tiny(packed, tied=True, lora=False, checkpointing=False, mlp_chunk=None, lora_targets=None):
    """The same random-init model every call (seed 0), in training mode."""
    _, ids, vocab = packed
    lora_cfg = {"lora": {"enabled": True, **({"target_modules": lora_targets} if lora_targets else {})}} if lora else {}
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      tie_word_embeddings=tied, attention="sink", **lora_cfg)
    torch.manual_seed(0)
    model = build_model(cfg, vocab, ids)
    if lora:  # LoRA's B starts at zero, so A would get no gradient: give both a value
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    if checkpointing:
        enable_activation_checkpointing(model)
    if mlp_chunk:
        assert enable_tiled_mlp(model, mlp_chunk) == cfg.num_layers == tiled_mlp_layers(model)
    return model.train(), cfg


def loss_and_grads(packed, chunk, **model_kw):
    """(per-task mean NLL, total mean NLL, {param: grad}) of one forward + backward of the training loss."""
    batch = packed[0]
    model, cfg = tiny(packed, **model_kw)
    sums = batch_task_sums(model, batch, cfg, None, ONE, chunk)
    n = sum(c for _, c in sums.values())
    loss = sum(s for s, _ in sums.values()) / n
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads and not [name for name, g in grads.items() if g is None], "parameters without a gradient"
    return {task: float(s.detach()) / c for task, (s, c) in sums.items()}, float(loss.detach()), grads


def assert_same(ref, other, what):
    ref_tasks, ref_loss, ref_grads = ref
    tasks, loss, grads = other
    assert sorted(tasks) == sorted(ref_tasks) == [DIALOGUE, LMR, SMR]
    for task in ref_tasks:
        assert tasks[task] == pytest.approx(ref_tasks[task], abs=1e-5), (what, task)
    assert loss == pytest.approx(ref_loss, abs=1e-5), what
    assert sorted(grads) == sorted(ref_grads)
    for name, g in ref_grads.items():
        assert g.abs().max() > 0, name  # every compared gradient carries signal
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=0, msg=f"{what}: {name}")


@pytest.mark.parametrize("tied", [True, False], ids=["tied-embeddings", "untied"])
def test_checkpointing_and_tiled_loss_give_the_same_loss_and_gradients(packed, tied, one_thread):
    ref = loss_and_grads(packed, None, tied=tied)
    for checkpointing, chunk, mlp in [(True, None, None), (False, CHUNK, None), (True, CHUNK, None), (True, 384, None),
                                      (False, None, MLP_CHUNK), (True, None, MLP_CHUNK), (True, CHUNK, MLP_CHUNK)]:
        assert_same(ref, loss_and_grads(packed, chunk, tied=tied, checkpointing=checkpointing, mlp_chunk=mlp),
                    f"checkpointing={checkpointing} loss_chunk={chunk} mlp_chunk={mlp}")


def test_lora_with_checkpointing_and_tiled_loss_gives_the_same_gradients(packed, one_thread):
    ref = loss_and_grads(packed, None, lora=True)
    assert all("lora_" in name for name in ref[2]) and len(ref[2]) == 8  # A and B of q, v in 2 layers
    assert_same(ref, loss_and_grads(packed, CHUNK, lora=True, checkpointing=True), "lora + checkpointing + tiled")
    assert_same(ref, loss_and_grads(packed, CHUNK, lora=True, checkpointing=True, mlp_chunk=MLP_CHUNK),
                "lora + checkpointing + tiled loss + tiled MLP")


def test_lora_on_the_mlp_alone_gets_its_gradients_through_the_tiled_mlp(packed, one_thread):
    """Adapters on the MLP only: the first layer's MLP input needs no gradient (frozen embeddings and attention), yet
    its adapters must get one."""
    targets = ["gate_proj", "up_proj", "down_proj"]
    ref = loss_and_grads(packed, None, lora=True, lora_targets=targets)
    assert len(ref[2]) == 12 and all("mlp" in name for name in ref[2])  # A and B of 3 projections in 2 layers
    assert_same(ref, loss_and_grads(packed, CHUNK, lora=True, lora_targets=targets, mlp_chunk=MLP_CHUNK),
                "MLP-only lora + tiled MLP")


def test_tiled_mlp_cuts_are_exactly_its_shards_and_no_piece_exceeds_the_chunk():
    """DeepSpeed releases the held-back gradients at the last of ``shards`` pieces: both of its cuts (tokens in
    forward, rows x tokens in backward) must give exactly that many, and no piece may hold more than a chunk's tokens
    per row (the memory bound)."""
    for tokens in [1, 2, 5, 9, 10, 127, 128, 129, 1000, 4097]:
        for chunk in [1, 2, 3, 4, 7, 40, 100, 4096]:
            k = tiled_shards(tokens, chunk)
            forward = torch.arange(tokens).chunk(k)
            assert len(forward) == k and max(len(p) for p in forward) <= chunk, (tokens, chunk)
            for rows in [1, 2, 3, 7]:
                backward = torch.arange(rows * tokens).chunk(k)
                assert len(backward) == k and max(len(p) for p in backward) <= rows * chunk, (tokens, chunk, rows)
    assert tiled_shards(128, 40) == 4 and tiled_shards(65536, 4096) == 16 and tiled_shards(100, 4096) == 1
    with pytest.raises(ValueError, match="mlp_chunk"):
        tiled_shards(10, 0)


def _attention_calls(packed, checkpointing):
    """The ``convsink_attn`` object each attention call received during one forward + backward."""
    model, cfg = tiny(packed, checkpointing=checkpointing)
    seen = []
    for module in model.modules():
        if module.__class__.__name__.endswith("Attention"):
            module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["convsink_attn"]),
                                             with_kwargs=True)
    sums = batch_task_sums(model, packed[0], cfg, None, ONE, CHUNK)
    seen_in_forward = len(seen)
    sum(s for s, _ in sums.values()).backward()
    return seen_in_forward, seen, cfg.num_layers


def test_checkpointed_layers_are_recomputed_with_the_attention_plan_built_once(packed, one_thread):
    forward_calls, calls, layers = _attention_calls(packed, checkpointing=True)
    assert forward_calls == layers and len(calls) == 2 * layers  # every layer ran again in backward
    assert len({id(c) for c in calls}) == 1  # ... with the same per-batch plan, not a rebuilt one
    forward_calls, calls, layers = _attention_calls(packed, checkpointing=False)
    assert forward_calls == len(calls) == layers  # without checkpointing nothing is recomputed


def _saved_sizes(packed, chunk, mlp_chunk=None):
    """numel of every tensor autograd saves for backward during one forward of the training loss."""
    model, cfg = tiny(packed, mlp_chunk=mlp_chunk)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        batch_task_sums(model, packed[0], cfg, None, ONE, chunk)
    return sizes


def test_tiled_loss_never_keeps_the_full_logits(packed, one_thread):
    batch, _, vocab = packed
    full = batch[INPUT_IDS].numel() * vocab  # (B*T, V)
    assert max(_saved_sizes(packed, None)) >= full  # the untiled loss keeps (B*T, V) logits for backward
    assert max(_saved_sizes(packed, CHUNK)) < full // 4  # the tiled one keeps no logits at all


def test_tiled_mlp_keeps_no_intermediate_activations(packed, one_thread):
    intermediate = packed[0][INPUT_IDS].numel() * 64  # (B*T, intermediate_size)
    untiled = _saved_sizes(packed, CHUNK)
    assert untiled.count(intermediate) >= 2 * 2  # gate and up outputs (at least) in each of the 2 layers
    assert intermediate not in _saved_sizes(packed, CHUNK, mlp_chunk=MLP_CHUNK)  # only each MLP's input is kept


def test_held_out_eval_figures_are_the_same_tiled(packed, one_thread):
    model, cfg = tiny(packed)
    model.eval()
    nll, valid, hits = batch_token_stats(model, packed[0], cfg, None, ONE, None)
    t_nll, t_valid, t_hits = batch_token_stats(model, packed[0], cfg, None, ONE, CHUNK)
    assert nll.shape == t_nll.shape == packed[0][TARGETS].shape
    torch.testing.assert_close(t_nll, nll, atol=1e-5, rtol=0)
    assert torch.equal(t_valid, valid) and torch.equal(t_hits, hits) and int(valid.sum()) > 100


def test_gpu_recipes_use_checkpointing_and_the_tiled_loss(monkeypatch):
    for var in ("CONVSINK_DATA", "CONVSINK_MODEL_1B", "CONVSINK_MODEL_7B"):
        monkeypatch.setenv(var, "/nonexistent")
    for name in ("llama-1b-multinode.yaml", "llama-7b-multinode.yaml"):
        cfg = load_config(os.path.join(REPO, "configs", name))
        assert cfg.train.activation_checkpointing, name
        assert cfg.train.loss_chunk is not None and cfg.train.loss_chunk < cfg.data.seq_len, name
    default = load_config(None)
    assert not default.train.activation_checkpointing and default.train.loss_chunk is None
    with pytest.raises(ConfigError, match="loss_chunk"):
        load_config(None, ["train.loss_chunk=0"])
