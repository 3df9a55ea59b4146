"""A small copy of ../shared/data for benchmark and corpus tests: the same layout, a few records of each kind."""

from __future__ import annotations

import json


def tiny_shipped_data(shared_data, root):
    """40 PersonaChat dialogues and 40 episodes of two MSC files, laid out like ../shared/data."""
    (root / "msc").mkdir(parents=True)
    (root / "personachat").mkdir()
    pc = json.loads((shared_data / "personachat" / "valid.json").read_text())
    (root / "personachat" / "valid.json").write_text(json.dumps(dict(list(pc.items())[:40]), indent=2))
    for name in ("session_2_test.jsonl", "session_3_test.jsonl"):
        lines = (shared_data / "msc" / name).read_text().splitlines()[:40]
        (root / "msc" / name).write_text("\n".join(lines) + "\n")
    return root
