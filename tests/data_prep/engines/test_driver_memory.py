"""The Ray engine's driver keeps only what the packing plan needs (lengths, ids, where each item lives): its peak
RSS hardly grows with the corpus, while the token data stays in the object store and in the worker tasks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

# Holding every tokenized item cost the driver ~11.6 MB of peak RSS per MB of JSON lines (pieces, their copies for
# the shard jobs, the pickled jobs); the plan (scalars, lengths, ids, locations) costs ~0.26 MB per MB.
MAX_DRIVER_MB_PER_CORPUS_MB = 1.0
MAX_DRIVER_GROWTH = 0.10  # peak RSS at 6x the corpus over the peak at 1x


def small_shipped_data(shared_data, root):
    """A data folder shaped like the shipped one: 100 PersonaChat dialogues and 250 MSC episodes (1.7 MB in all)."""
    (root / "msc").mkdir(parents=True)
    (root / "personachat").mkdir()
    pc = json.loads((shared_data / "personachat" / "valid.json").read_text())
    (root / "personachat" / "valid.json").write_text(json.dumps(dict(list(pc.items())[:100]), indent=2))
    lines = (shared_data / "msc" / "session_3_test.jsonl").read_text().splitlines()[:250]
    (root / "msc" / "session_3_test.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _driver_run(corpus: dict, out, result) -> dict:
    subprocess.run([sys.executable, "-m", "pipeline.bench.prep_child", *corpus["files"], "--engine", "ray", "--workers",
                    "2", "--out", str(out), "--result", str(result)], cwd=REPO, check=True, timeout=300)
    return json.loads(result.read_text())


@pytest.mark.slow
def test_ray_driver_rss_bounded_as_corpus_grows(shared_data, tmp_path):
    from data_prep.scaled_corpus import write_scaled_corpus

    data = small_shipped_data(shared_data, tmp_path / "data")
    runs = {}
    for copies in (1, 6):
        corpus = write_scaled_corpus(str(data), str(tmp_path / f"c{copies}"), copies)
        runs[copies] = (corpus["bytes"] / 2**20, _driver_run(corpus, tmp_path / f"o{copies}", tmp_path / f"r{copies}.json"))
    (mb1, r1), (mb6, r6) = runs[1], runs[6]
    assert r6["tokens"] == 6 * r1["tokens"] > 0
    growth = r6["driver_peak_rss_mb"] - r1["driver_peak_rss_mb"]
    print(f"driver peak RSS {r1['driver_peak_rss_mb']} MB at {mb1:.1f} MB, {r6['driver_peak_rss_mb']} MB at "
          f"{mb6:.1f} MB: {growth / (mb6 - mb1):.3f} MB per MB of corpus")
    assert growth / (mb6 - mb1) < MAX_DRIVER_MB_PER_CORPUS_MB, (r1, r6)
    assert growth < MAX_DRIVER_GROWTH * r1["driver_peak_rss_mb"], (r1, r6)
