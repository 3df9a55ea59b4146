"""Fixtures of the data_prep tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def all_inputs(shared_data):
    """Every shipped dialogue file: PersonaChat valid and the four MSC files."""
    return [str(shared_data / "personachat" / "valid.json")] + sorted(str(p) for p in (shared_data / "msc").glob("*.jsonl"))
