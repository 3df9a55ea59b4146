"""Where convsink keeps and finds files (the cache folder, the shared dialogue data), and the one way it writes a
file or a folder so that a reader never sees it half-written."""

from __future__ import annotations

import contextlib
import json
import os
import shutil

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout (data_prep/ sits in it)


def cache_dir() -> str:
    """Where converted artefacts (tokenizer, small model) are kept: $CONVSINK_CACHE or ~/.cache/convsink."""
    return os.environ.get("CONVSINK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "convsink")


def shared_data_dir() -> str:
    """The real dialogue data: ``$CONVSINK_SHARED_DATA``, else ``../shared/data`` beside the repository."""
    return os.environ.get("CONVSINK_SHARED_DATA") or os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data"))


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync'ed, then renamed over ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def folder_written_atomically(out: str, replace: bool = True):
    """Yield a fresh temporary folder beside ``out``; when the block ends without error it becomes ``out`` in one
    rename. ``replace=True``: an existing ``out`` is removed first. ``replace=False`` (a shared cache entry): if
    another process made ``out`` meanwhile, its copy is kept and ours dropped. On error the temporary folder goes."""
    tmp = f"{out.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replace and os.path.isdir(out):
        shutil.rmtree(out)
    try:
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if replace:
            raise


def read_json(path: str, expect: type, what: str):
    """The JSON value of ``path``, which must be a ``expect`` (dict or list); every failure is one line naming the
    file: missing (``what`` says which file was expected), invalid JSON with its line, or the wrong kind of value."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        with open(path) as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(value, expect):
        raise ValueError(f"{path}: expected a JSON {'object' if expect is dict else 'list'}")
    return value
