"""One writer per run folder: an exclusive ``flock`` on ``OUT/.lock`` held by the process that prepares and launches
the run (``convsink train``, ``convsink run``, the Ray Train driver) for as long as the run lasts.

The kernel drops the lock when its holder exits, however it exits: a lock file left by a dead process never blocks.
The file holds the holder's pid, which the refusal names. A process that already holds a folder's lock takes it again
at no cost (a resume launched from the same process). ``releases_run_lock`` ends a launch function's hold when it
returns or raises.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import os

LOCK_FILE = ".lock"

_held: dict[str, int] = {}  # real path of a run folder -> descriptor of its locked OUT/.lock


def acquire(out_dir: str) -> bool:
    """Lock ``out_dir`` (created if missing) for this process; False when this process held it already.

    Raises ``FileExistsError`` naming the holder's pid when another live process holds it."""
    key = os.path.realpath(out_dir)
    if key in _held:
        return False
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise FileExistsError(f"{out_dir}: another run is writing this run folder (pid {holder} holds {path}); "
                              "wait for it to end or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = fd
    return True


def release(out_dir: str) -> None:
    """Give up this process's lock on ``out_dir`` (nothing if it holds none). The file stays; it blocks no one."""
    fd = _held.pop(os.path.realpath(out_dir), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor of the lock drops it


@contextlib.contextmanager
def holding(out_dir: str):
    """Lock ``out_dir`` for this process (``acquire``) for the rest of its life; if the block raises, a lock taken
    here is released again (a refused launch leaves the folder free)."""
    took = acquire(out_dir)
    try:
        yield
    except BaseException:
        if took:
            release(out_dir)
        raise


def releases_run_lock(fn):
    """Decorate a launch function with an ``out_dir`` parameter: a lock it took on ``out_dir`` (through
    ``prepare_run_dir``) is released when it returns or raises; one held before the call is kept."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out_dir = sig.bind(*args, **kwargs).arguments["out_dir"]
        held_before = os.path.realpath(out_dir) in _held
        try:
            return fn(*args, **kwargs)
        finally:
            if not held_before:
                release(out_dir)
    return wrapper
