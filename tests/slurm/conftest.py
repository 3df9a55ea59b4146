"""Fixtures of the Slurm tests: tiny shards and a tiny recipe (seq_len 128, 2 ranks)."""

from __future__ import annotations

import pytest

TINY_YAML = """\
data: {seq_len: 128}
model: {max_position_embeddings: 512, hidden_size: 32, intermediate_size: 64, attention: dense}
train: {nproc: 2, micro_batch_size: 2, grad_accum: 1, lr: 5.0e-3, warmup_steps: 1, max_steps: 20, save_every: 2}
wandb: {mode: offline}
"""


@pytest.fixture(scope="session")
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY_YAML)
    return str(path)




@pytest.fixture
def ray_temp_parent():
    """A short new folder (AF_UNIX socket paths < 107 bytes) where a Ray job's nodes make their temp/token dirs."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)
