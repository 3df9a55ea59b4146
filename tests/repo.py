"""The repository root, for tests that run commands in it."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
