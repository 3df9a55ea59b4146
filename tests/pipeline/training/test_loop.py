"""ZeRO-3 training on 2 processes with the real launcher: loss falls, resume is exact, export is faithful,
and the W&B offline run holds the loss history."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline.config import load_config
from pipeline.training.launch import launch_training, prepare_run_dir
from pipeline.training.tracking import find_offline_runs, read_offline_run

pytestmark = pytest.mark.slow
from tests.repo import REPO

TINY = ["data.seq_len=128", "model.max_position_embeddings=512", "model.hidden_size=32", "model.intermediate_size=64",
        "train.nproc=2", "train.micro_batch_size=2", "train.grad_accum=1", "train.lr=5e-3", "train.warmup_steps=2",
        "train.max_steps=20", "train.save_every=5", "model.attention=dense"]


@pytest.fixture(scope="module")
def eval_shards(tmp_path_factory, shared_data):
    """Held-apart dialogues (a file the training shards do not use)."""
    from data_prep.prep import prepare

    out = tmp_path_factory.mktemp("eval") / "shards"
    cfg = load_config(None, ["data.seq_len=128", "data.max_dialogues=12", "data.engine=local"])
    prepare([str(shared_data / "msc" / "session_3_test.jsonl")], str(out), cfg.data, progress=False)
    return str(out)


EVAL_ROWS = 7  # odd: the second rank runs a padding row in the last eval batch


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, shards, eval_shards):
    out = str(tmp_path_factory.mktemp("run") / "full")
    cfg = load_config(None, TINY + [f"train.eval_data={eval_shards}", "train.eval_every=10", f"train.eval_rows={EVAL_ROWS}",
                                    "train.peak_tflops=1.0", "wandb.name=tiny-full", "wandb.group=tests"])
    result = launch_training(cfg, shards, out)
    return out, result


def _history(out: str) -> dict[int, float]:
    rows = {}
    for name in sorted(os.listdir(out)):
        if name.startswith("history-rank0-"):
            for r in json.load(open(os.path.join(out, name))):
                rows[r["step"]] = r["loss"]
    return rows


def test_zero3_loss_falls_over_20_steps(full_run):
    out, result = full_run
    losses = _history(out)
    assert sorted(losses) == list(range(1, 21))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (18, 19, 20)) / 3
    print(f"loss steps 1-3 {first:.4f} -> steps 18-20 {last:.4f}")
    assert last < first - 0.5
    assert result["checkpoint"].endswith("step000020")


def test_resume_reproduces_uninterrupted_losses(full_run, shards, tmp_path):
    out_full, _ = full_run
    out = str(tmp_path / "resumed")
    launch_training(load_config(None, TINY + ["train.stop_at_step=10"]), shards, out)
    first_part = _history(out)
    assert sorted(first_part) == list(range(1, 11))
    launch_training(load_config(None, TINY), shards, out, resume=True)
    full, resumed = _history(out_full), _history(out)
    assert sorted(resumed) == list(range(1, 21))
    for step in range(11, 21):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step


def test_wandb_offline_run_holds_loss_history(full_run):
    out, _ = full_run
    runs = find_offline_runs(out)
    assert len(runs) == 1
    record = read_offline_run(runs[0])
    logged = {int(r["_step"]): r["loss"] for r in record["history"] if "loss" in r}
    expected = _history(out)
    assert sorted(logged) == sorted(expected)
    for step, loss in expected.items():
        assert logged[step] == pytest.approx(loss, rel=1e-9)
    for key in ("lr", "grad_norm", "tokens_per_s", "step_time", "loss/dialogue"):
        assert key in record["history"][-1]
    for r in (r for r in record["history"] if "loss" in r):  # every logged step (log_every=1)
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0
        assert 0 < r["mask_density"] < 1, "the dialogue mask attends to fewer pairs than causal"
        assert r["keys_per_query"] > 1 and r["tflops_per_device"] > 0
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 1.0)  # train.peak_tflops=1
    assert record["config"]["train"]["max_steps"] == 20
    assert record["config"]["wandb"]["name"] == "tiny-full" and record["config"]["wandb"]["group"] == "tests"


def test_eval_metrics_equal_a_single_process_reference(full_run, eval_shards, tmp_path):
    """eval/* at step 20 (2 ranks, ZeRO-3, a padded last batch) = the exported step-20 model on the same rows."""
    from transformers import AutoModelForCausalLM

    from pipeline.attention.masks import dense_mask
    from pipeline.attention.registry import DenseMaskAttention, register
    from pipeline.contract import targets_from_labels
    from pipeline.modeling.export import export_checkpoint
    from pipeline.training.losses import token_nll
    from pipeline.training.shard_loader import load_shards

    out, _ = full_run
    record = read_offline_run(find_offline_runs(out)[0])
    evals = {int(r["_step"]): r for r in record["history"] if "eval/loss" in r}
    assert sorted(evals) == [10, 20]
    register()
    model = AutoModelForCausalLM.from_pretrained(export_checkpoint(out, str(tmp_path / "export")),
                                                 attn_implementation="convsink").eval()
    data = load_shards(eval_shards, "dialogue")
    assert len(data) >= EVAL_ROWS
    rows = list(range(EVAL_ROWS))
    batch = {c: torch.from_numpy(data.arrays[c][rows]).long() for c in ("input_ids", "labels", "position_ids", "doc_ids", "utt_ids")}
    batch["eou"] = torch.from_numpy(data.arrays["eou"][rows]).bool()
    targets = targets_from_labels(batch["labels"])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       convsink_attn=DenseMaskAttention(dense_mask("dialogue", batch))).logits
    nll, valid = token_nll(logits, targets)
    loss = float(nll.sum() / valid.sum())
    accuracy = float(((logits.argmax(-1) == targets) & valid).sum() / valid.sum())
    print(f"eval at step 20: logged loss {evals[20]['eval/loss']:.6f}, reference {loss:.6f}")
    assert evals[20]["eval/tokens"] == float(valid.sum())
    assert evals[20]["eval/loss"] == pytest.approx(loss, abs=1e-4)
    assert evals[20]["eval/loss/dialogue"] == pytest.approx(loss, abs=1e-4)
    assert evals[20]["eval/accuracy/dialogue"] == pytest.approx(accuracy, abs=1e-6)
    assert evals[20]["eval/ppl"] == pytest.approx(float(torch.exp(torch.tensor(loss))), rel=1e-4)
    assert evals[20]["eval/loss"] < evals[10]["eval/loss"]


def test_eval_every_needs_matching_eval_data(shards, tmp_path):
    with pytest.raises(ValueError, match="train.eval_data is not"):
        prepare_run_dir(load_config(None, TINY + ["train.eval_every=5"]), shards, str(tmp_path / "a"), resume=False)
    with pytest.raises(ValueError, match="no lmr/smr rows for the memory stage"):
        prepare_run_dir(load_config(None, TINY + ["train.eval_every=5", f"train.eval_data={shards}", "train.stage=memory"]),
                        shards, str(tmp_path / "b"), resume=False)


def test_deepspeed_launcher_with_the_cluster_ds_config_equals_torchrun(shards, tmp_path, capfd):
    """``train.launcher=deepspeed`` with ``ds_configs/zero3.json`` (the 1B recipe's) trains the same 4 steps as
    torchrun with the same JSON: the launcher and the recipe's DeepSpeed file both really run."""
    common = TINY + ["train.max_steps=4", "train.save_every=4", f"train.ds_config={os.path.join(REPO, 'ds_configs', 'zero3.json')}",
                     "wandb.mode=disabled"]
    losses = {}
    for launcher in ("torchrun", "deepspeed"):
        out = str(tmp_path / launcher)
        capfd.readouterr()
        result = launch_training(load_config(None, common + [f"train.launcher={launcher}"]), shards, out)
        printed = "".join(capfd.readouterr())
        assert ("deepspeed.launcher.launch" in printed) == (launcher == "deepspeed"), "which launcher really ran"
        losses[launcher] = _history(out)
        assert result["checkpoint"].endswith("step000004")
        files = os.listdir(result["checkpoint"])
        for rank in (0, 1):
            assert any(f"zero_pp_rank_{rank}_" in n and "optim_states" in n for n in files), (rank, files)
    assert sorted(losses["deepspeed"]) == [1, 2, 3, 4]
    for step, loss in losses["torchrun"].items():
        assert losses["deepspeed"][step] == pytest.approx(loss, abs=1e-6)


def test_export_matches_engine_parameters_and_logits(shards, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pipeline.attention.masks import dense_mask
    from pipeline.attention.registry import DenseMaskAttention, register
    from pipeline.modeling.export import export_checkpoint

    cfg = load_config(None, TINY + ["train.max_steps=4", "train.save_every=4"])
    out = str(tmp_path / "run")
    cfg_path = prepare_run_dir(cfg, shards, out, resume=False)
    probe = str(tmp_path / "probe.safetensors")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    os.path.join(REPO, "tests", "pipeline", "training", "zero3_probe.py"), cfg_path, shards, out, probe],
                   check=True, cwd=REPO)
    export_dir = export_checkpoint(out, str(tmp_path / "export"))
    engine = load_file(probe)

    model = AutoModelForCausalLM.from_pretrained(export_dir)  # plain transformers, sdpa
    assert model.config._attn_implementation == "sdpa"
    state = model.state_dict()
    names = [k[len("param."):] for k in engine if k.startswith("param.")]
    assert names
    for name in names:
        assert torch.equal(state[name], engine[f"param.{name}"]), name

    ids, pos = engine["batch.input_ids"], engine["batch.position_ids"]
    # causal mask over a packed row differs from plain causal; compare on the first dialogue alone
    n0 = int((engine["batch.doc_ids"][0] == 0).sum())
    with torch.no_grad():
        plain = model(input_ids=ids[:, :n0], position_ids=pos[:, :n0]).logits
    torch.testing.assert_close(plain, engine["logits_causal"][:, :n0], atol=1e-5, rtol=0)

    register()
    sink_model = AutoModelForCausalLM.from_pretrained(export_dir, attn_implementation="convsink")
    meta = {k: engine[f"batch.{k}"] for k in ("doc_ids", "utt_ids", "eou")}
    with torch.no_grad():
        logits = sink_model(input_ids=ids, position_ids=pos,
                            convsink_attn=DenseMaskAttention(dense_mask("dialogue", meta))).logits
    torch.testing.assert_close(logits, engine["logits_dialogue"], atol=1e-5, rtol=0)
    info = json.load(open(os.path.join(export_dir, "convsink.json")))
    assert info["eou_token_id"] == model.config.eos_token_id


def test_lora_training_exports_merged_weights(shards, tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.modeling.export import export_checkpoint
    from pipeline.modeling.zero3_consolidate import consolidate_zero3
    from pipeline.training.checkpoint import checkpoint_root, latest_tag

    out = str(tmp_path / "lora")
    cfg = load_config(None, TINY + ["train.max_steps=3", "train.save_every=3", "model.lora.enabled=true", "model.lora.r=4",
                                    "train.lr=5e-2"])
    launch_training(cfg, shards, out)
    root = checkpoint_root(out)
    state = consolidate_zero3(os.path.join(root, latest_tag(root)))
    a = state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    b = state["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    base = state["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert b.abs().max() > 0, "LoRA B should have moved from its zero init"
    export_dir = export_checkpoint(out, str(tmp_path / "export"))
    model = AutoModelForCausalLM.from_pretrained(export_dir)
    merged = model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(merged, base + (16 / 4) * b @ a, atol=1e-6, rtol=0)
    assert not any("lora" in k for k in model.state_dict())
    # frozen base weights did not change during LoRA training
    k_proj = state["base_model.model.model.layers.0.self_attn.k_proj.weight"]
    torch.testing.assert_close(model.state_dict()["model.layers.0.self_attn.k_proj.weight"], k_proj)
