"""Shared test fixtures: real dialogue data from ../shared/data, the bundled tokenizer, offline W&B."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CONVSINK_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# slow tests that run one at a time, in file order, on one xdist worker per group: DeepSpeed launches (2-rank runs that
# would only slow each other down), and Ray clusters and Slurm jobs (one cluster per group, jobs with time limits)
SERIAL_GROUPS = {"training": ("tests/pipeline/training/", "tests/pipeline/modeling/", "tests/pipeline/test_secrets.py"),
                 "clusters": ("tests/slurm/", "tests/ray_jobs/")}


@pytest.hookimpl(tryfirst=True)  # before xdist's worker hook reads the xdist_group marks (pytest 8; pytest 9 loses them)
def pytest_collection_modifyitems(config, items):
    """`make test` runs two pytest-xdist workers with ``--dist loadgroup``: the slow tests under each of
    ``SERIAL_GROUPS`` form one group, run in file order on one worker (the two groups on the two workers); every other
    test (the in-process ones, and the slow Ray-engine and bench tests) goes to whichever worker is free."""
    for item in items:
        path = os.path.relpath(str(item.fspath), REPO)
        group = next((g for g, prefixes in SERIAL_GROUPS.items() if path.startswith(prefixes)), None)
        if item.get_closest_marker("slow") and group:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "personachat" / "valid.json").is_file():
        raise FileNotFoundError(f"real dialogue data not found at {SHARED_DATA} (set CONVSINK_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    from data_prep.tokenizer_loading import smollm2_tokenizer_dir

    return smollm2_tokenizer_dir()


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy shared CPU they lose a lot."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shards(tmp_path_factory, shared_data) -> str:
    """Tiny dialogue shards (seq_len 128): 60 PersonaChat + MSC dialogues, prepared once per test session."""
    from data_prep.prep import prepare
    from pipeline.config import load_config

    out = tmp_path_factory.mktemp("data") / "shards"
    cfg = load_config(None, ["data.seq_len=128", "data.max_dialogues=60", "data.engine=local"])
    prepare([str(shared_data / "personachat" / "valid.json"), str(shared_data / "msc" / "session_2_test.jsonl")],
            str(out), cfg.data, progress=False)
    return str(out)
