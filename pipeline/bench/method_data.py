"""The data of ``convsink bench method``: a training file and a held-apart file (canonical JSON lines), split so that
no held-apart dialogue is ever trained on.

- held apart: the first MSC session-3 *test* episodes (all sessions of an episode, oldest first) and a seeded sample
  of PersonaChat dialogues kept out of training;
- training: MSC session-3 *valid* episodes and the rest of PersonaChat.

MSC's first session is a PersonaChat dialogue, and MSC session_2_test holds the same episodes as session_3_test, so a
split by file alone leaks: a training dialogue that shares ``SHARED_UTTERANCES`` or more utterance texts with any
held-apart dialogue is dropped (and counted), and the PersonaChat dialogues held apart are drawn only from those that
share fewer with the MSC training episodes. session_2 files are not used.
"""

from __future__ import annotations

import json
import os
import random

from data_prep.adapters import iter_dialogues
from data_prep.paths import write_text_atomic
from data_prep.schema import DataError

MSC_TRAIN, MSC_HELDOUT = ("msc", "session_3_valid.jsonl"), ("msc", "session_3_test.jsonl")
PERSONACHAT = ("personachat", "valid.json")
SHARED_UTTERANCES = 3  # a training dialogue sharing this many utterance texts with held-apart data is dropped
PERSONACHAT_HELD_OUT = 100  # PersonaChat dialogues kept out of training (the first ones of them are evaluated)
SPLIT_SEED = 1234


def _read(data_dir: str, where: tuple[str, str]) -> list:
    """Every dialogue of one shared data file; a bad record stops with its one-line error."""
    path = os.path.join(data_dir, *where)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: dialogue file not found (set CONVSINK_SHARED_DATA)")
    out = []
    for d in iter_dialogues(path):
        if isinstance(d, DataError):
            raise d
        out.append(d)
    return out


def _shared(dialogue, texts: set[str]) -> int:
    """How many of the dialogue's utterance texts are in ``texts``."""
    return sum(t.text in texts for t in dialogue.turns)


def _canonical(prefix: str, dialogue) -> str:
    """One canonical JSON line (id prefixed with its source)."""
    return json.dumps({"id": f"{prefix}:{dialogue.id}", "turns": [{"speaker": t.speaker, "text": t.text}
                                                                   for t in dialogue.turns]})


def split_dialogues(data_dir: str, out_dir: str, train_per_source: int | None, heldout_per_source: int) -> dict:
    """Write ``out_dir/train.jsonl`` and ``out_dir/heldout.jsonl``; return the split's counts and file paths.
    ``train_per_source``: at most this many MSC episodes and this many PersonaChat dialogues (None = all);
    ``heldout_per_source``: MSC test episodes and held-out PersonaChat dialogues written to the held-apart file."""
    if heldout_per_source > PERSONACHAT_HELD_OUT:
        raise ValueError(f"held-apart dialogues per source must be <= {PERSONACHAT_HELD_OUT}, got {heldout_per_source}")
    msc_train, msc_test, persona = (_read(data_dir, w) for w in (MSC_TRAIN, MSC_HELDOUT, PERSONACHAT))
    msc_train_texts = {t.text for d in msc_train for t in d.turns}
    clean = [d for d in persona if _shared(d, msc_train_texts) < SHARED_UTTERANCES]
    held_persona = random.Random(SPLIT_SEED).sample(clean, PERSONACHAT_HELD_OUT)
    held_ids = {d.id for d in held_persona}
    heldout = [("msc-test", d) for d in msc_test[:heldout_per_source]]
    heldout += [("personachat", d) for d in held_persona[:heldout_per_source]]
    # every MSC test episode and every held-out PersonaChat dialogue counts as held apart, evaluated or not
    held_texts = {t.text for d in msc_test + held_persona for t in d.turns}
    train, dropped = [], 0
    for prefix, pool in (("msc-valid", msc_train), ("personachat", [d for d in persona if d.id not in held_ids])):
        kept = [d for d in pool if _shared(d, held_texts) < SHARED_UTTERANCES]
        dropped += len(pool) - len(kept)
        train += [(prefix, d) for d in kept[:train_per_source]]
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, f"{name}.jsonl") for name in ("train", "heldout")}
    for name, rows in (("train", train), ("heldout", heldout)):
        write_text_atomic(paths[name], "".join(_canonical(p, d) + "\n" for p, d in rows))
    return {"train_file": paths["train"], "heldout_file": paths["heldout"], "train_dialogues": len(train),
            "heldout_dialogues": len(heldout), "dropped_for_overlap": dropped,
            "heldout_sources": {"msc_session_3_test": min(heldout_per_source, len(msc_test)),
                                "personachat_held_out": min(heldout_per_source, len(held_persona))},
            "rule": f"training dialogues sharing >= {SHARED_UTTERANCES} utterance texts with any held-apart dialogue "
                    f"are dropped; {PERSONACHAT_HELD_OUT} PersonaChat dialogues (seed {SPLIT_SEED}) held out"}
