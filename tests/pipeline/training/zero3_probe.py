"""Run by torchrun from tests: train with pipeline.training.loop.train, then dump what the engine holds (gathered
parameters and logits on a fixed batch, under the dialogue and causal masks) for comparison with the export."""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from pipeline.config import RunConfig
from pipeline.modeling.forward import forward_batch
from pipeline.training.loop import train
from pipeline.training.shard_loader import load_shards, micro_batch

cfg_path, data_dir, out_dir, probe_path = sys.argv[1:5]
cfg = RunConfig.model_validate(json.load(open(cfg_path)))
result = train(cfg, data_dir, out_dir)
engine = result["engine"]
engine.eval()
data = load_shards(data_dir, "dialogue")
batch = micro_batch(data, 0, 0, micro_size=1, grad_accum=1, dp_rank=0, dp_size=1, seed=123)
tensors = {}
with torch.no_grad():
    tensors["logits_dialogue"] = forward_batch(engine, batch, cfg.model, "dense").contiguous()
    causal = dict(batch, mask_kind=["causal"])
    tensors["logits_causal"] = forward_batch(engine, causal, cfg.model, "dense").contiguous()
params = dict(engine.module.named_parameters())
with deepspeed.zero.GatheredParameters(list(params.values())):
    if dist.get_rank() == 0:
        for name, p in params.items():
            tensors[f"param.{name}"] = p.detach().clone().contiguous()
if dist.get_rank() == 0:
    for k in ("input_ids", "position_ids", "doc_ids", "utt_ids", "eou", "blk"):
        tensors[f"batch.{k}"] = batch[k].contiguous()
    save_file(tensors, probe_path)
dist.barrier()
