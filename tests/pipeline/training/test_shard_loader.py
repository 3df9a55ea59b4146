"""The sample stream: per-epoch order, mixed memory-stage batches, resume determinism."""

import json

import numpy as np
import pytest

from data_prep.config import DataConfig
from data_prep.prep import prepare
from pipeline.training.shard_loader import ShardData, global_index, load_shards, micro_batch


def _data(kinds: list[str], T: int = 4) -> ShardData:
    n = len(kinds)
    arrays = {c: np.arange(n * T).reshape(n, T) for c in ("input_ids", "labels", "position_ids", "doc_ids", "utt_ids", "blk")}
    arrays["eou"] = np.zeros((n, T), bool)
    return ShardData(arrays, kinds, T)


def test_single_kind_stream_is_a_permutation_per_epoch():
    data = _data(["dialogue"] * 50)
    stream = [global_index(i, data, 1) for i in range(150)]
    epochs = [stream[i:i + 50] for i in (0, 50, 100)]
    assert all(sorted(e) == list(range(50)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert stream[:50] != [global_index(i, _data(["dialogue"] * 50), 2) for i in range(50)]


def test_kinds_take_turns_and_each_kind_covers_its_rows():
    rng = np.random.default_rng(0)
    kinds = ["smr"] * 30 + ["lmr"] * 11
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    data = _data(kinds)
    stream = [global_index(i, data, 7) for i in range(120)]
    seq = [kinds[r] for r in stream]
    assert seq[0::2] == ["lmr"] * 60 and seq[1::2] == ["smr"] * 60
    lmr_rows = sorted(i for i, k in enumerate(kinds) if k == "lmr")
    assert sorted(stream[0:22:2]) == lmr_rows  # the first 11 LMR turns are one epoch of the LMR rows
    smr_rows = sorted(i for i, k in enumerate(kinds) if k == "smr")
    assert sorted(stream[1:60:2]) == smr_rows


def test_every_memory_micro_batch_mixes_smr_and_lmr_and_resume_reads_the_same():
    kinds = ["smr"] * 21 + ["lmr"] * 19
    data = _data(kinds)
    for step in range(30):  # several epochs
        for rank in range(2):
            b = micro_batch(data, step, 0, micro_size=2, grad_accum=1, dp_rank=rank, dp_size=2, seed=5)
            assert set(b["mask_kind"]) == {"smr", "lmr"}, (step, rank, b["mask_kind"])
    fresh = _data(kinds)  # a resumed run builds its data anew and starts at step 17
    b1 = micro_batch(data, 17, 0, micro_size=2, grad_accum=1, dp_rank=1, dp_size=2, seed=5)
    b2 = micro_batch(fresh, 17, 0, micro_size=2, grad_accum=1, dp_rank=1, dp_size=2, seed=5)
    assert b1["rows"] == b2["rows"] and b1["mask_kind"] == b2["mask_kind"]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_load_shards_checks_size_and_sha256_of_each_shard_it_opens(tmp_path, damage):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"id": f"g{i}", "turns": [{"text": f"hello {i}, how was your day at work?"},
                                                                {"text": "hi"}]}) + "\n" for i in range(12)))
    out = tmp_path / "shards"
    m = prepare([str(src)], str(out), DataConfig(seq_len=64, engine="local", shard_rows=2), progress=False)
    assert len(load_shards(str(out))) == m["counts"]["sequences"]
    shard = out / m["shards"][-1]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-3] if damage == "truncate" else data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])
    with pytest.raises(ValueError) as e:
        load_shards(str(out))
    assert str(e.value).startswith(f"{shard}: ") and "\n" not in str(e.value)
    assert ("bytes" if damage == "truncate" else "sha256") in str(e.value)
