"""Fixtures of the inference tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def model_and_ids(tokenizer):
    """A tiny random-init Llama (seed 0) with SmolLM2's tokenizer, and its special ids."""
    import torch

    from data_prep.tokenizer_loading import prepare_tokenizer
    from pipeline.config import ModelConfig
    from pipeline.modeling.loader import build_model

    torch.manual_seed(0)
    ids = prepare_tokenizer(tokenizer)
    model = build_model(ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2), len(tokenizer), ids).eval()
    return model, ids
