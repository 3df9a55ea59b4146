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
