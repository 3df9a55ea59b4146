"""data_prep/ray_cluster.py: an embedded Ray's temp dir is new (mkdtemp, 0700), never a predictable path that
someone else could have made first, and short enough for Ray's AF_UNIX socket paths."""

from __future__ import annotations

import os
import shutil

from data_prep import ray_cluster


def test_embedded_temp_dir_is_new_private_and_short():
    planted = f"/tmp/ray-cs-{os.getpid()}"  # the path the old code used: another user could create it first
    os.makedirs(planted, exist_ok=True)
    made = []
    try:
        made = [ray_cluster.embedded_temp_dir("cs") for _ in range(2)]
        assert planted not in made and made[0] != made[1]
        for path in made:
            assert os.path.isdir(path) and os.listdir(path) == []
            assert os.stat(path).st_mode & 0o777 == 0o700
            assert os.path.dirname(path) == "/tmp" and os.path.basename(path).startswith("ray-cs-")
            assert len(path) + len("/session_2026-12-03_10-00-00_000000_12345/sockets/raylet.12345") < 107
    finally:
        for path in [planted, *made]:
            shutil.rmtree(path, ignore_errors=True)
