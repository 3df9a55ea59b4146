"""``data.eou=new``: a new special EoU token is added to the tokenizer, written after every utterance of the shards,
saved with them, and the model's embeddings are resized to the grown vocabulary (method.md §1)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import torch

from data_prep.config import DataConfig
from data_prep.prep import prepare
from data_prep.tokenizer_loading import SpecialIds, load_tokenizer
from pipeline.config import ModelConfig
from pipeline.modeling.forward import forward_batch
from pipeline.modeling.loader import build_model
from pipeline.training.shard_loader import load_shards


def test_new_eou_token_is_added_written_and_resizes_the_model(tmp_path, tokenizer):
    src = tmp_path / "d.jsonl"
    with open(src, "w") as f:
        for i in range(3):
            f.write(json.dumps({"id": f"d{i}", "turns": [{"text": "hello there"}, {"text": f"reply number {i}"}]}) + "\n")
    out = tmp_path / "shards"
    manifest = prepare([str(src)], str(out), DataConfig(seq_len=64, engine="local", eou="new", eou_token="<|eou|>"),
                       progress=False)
    base = len(tokenizer)
    tok = manifest["tokenizer"]
    assert tok["vocab_size"] == base + 1 and tok["eou_id"] == base and tok["eou_id"] != tokenizer.eos_token_id
    saved = load_tokenizer(str(out / "tokenizer"))
    assert saved.convert_tokens_to_ids("<|eou|>") == base

    rows = [r for s in manifest["shards"] for r in pq.read_table(out / s["file"]).to_pylist()]
    utterances = 0
    for row in rows:
        for t, (tid, is_eou) in enumerate(zip(row["input_ids"], row["eou"])):
            if row["doc_ids"][t] < 0:
                continue
            assert (tid == base) == bool(is_eou), "the new EoU id sits exactly on the EoU positions"
            utterances += bool(is_eou)
    assert utterances == 6

    ids = SpecialIds(bos=tok["bos_id"], eou=tok["eou_id"], pad=tok["pad_id"])
    model = build_model(ModelConfig(hidden_size=32, intermediate_size=64), tok["vocab_size"], ids)
    assert model.get_input_embeddings().weight.shape[0] == base + 1
    data = load_shards(str(out))
    batch = {c: torch.from_numpy(data.arrays[c]).long() for c in data.arrays}
    batch["eou"] = batch["eou"].bool()
    batch["mask_kind"] = data.mask_kind
    logits = forward_batch(model, batch, ModelConfig(attention="sink"))
    assert logits.shape[-1] == base + 1 and torch.isfinite(logits).all()

    # a pretrained model folder with the old vocabulary is resized on load
    old = build_model(ModelConfig(hidden_size=32, intermediate_size=64), base, ids)
    old.save_pretrained(tmp_path / "base-model")
    grown = build_model(ModelConfig(hidden_size=32, intermediate_size=64), tok["vocab_size"], ids, path=str(tmp_path / "base-model"))
    assert grown.get_input_embeddings().weight.shape[0] == base + 1
    assert torch.equal(grown.get_input_embeddings().weight[:base], old.get_input_embeddings().weight)
