"""Where convsink keeps and finds files: the cache folder for converted artefacts, the shared dialogue data."""

from __future__ import annotations

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout (data_prep/ sits in it)


def cache_dir() -> str:
    """Where converted artefacts (tokenizer, small model) are kept: $CONVSINK_CACHE or ~/.cache/convsink."""
    return os.environ.get("CONVSINK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "convsink")


def shared_data_dir() -> str:
    """The real dialogue data: ``$CONVSINK_SHARED_DATA``, else ``../shared/data`` beside the repository."""
    return os.environ.get("CONVSINK_SHARED_DATA") or os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data"))
