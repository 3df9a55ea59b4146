"""Dialogue adapters: canonical JSONL, PersonaChat JSON, MSC JSONL and chat ``messages`` JSONL → ``Dialogue``.

``iter_dialogues(path, fmt)`` yields a ``Dialogue`` or a ``DataError`` per input record, so the caller decides
(stop on the first error, or quarantine it); nothing is dropped silently.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Literal

from .schema import DataError, Dialogue, make_dialogue

Format = Literal["auto", "canonical", "personachat", "msc", "messages"]
FORMATS = ("canonical", "personachat", "msc", "messages")


def _jsonl(path: str) -> Iterator[tuple[int, object]]:
    """Yield (line number, parsed object | DataError) for each non-blank line."""
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw)
            except json.JSONDecodeError as e:
                yield lineno, DataError(path, lineno, f"malformed JSON: {e.msg} (column {e.colno})")


def _from_canonical(obj, path, lineno) -> Dialogue:
    if not isinstance(obj, dict):
        raise DataError(path, lineno, f"expected an object with 'id' and 'turns', got {type(obj).__name__}")
    missing = [k for k in ("id", "turns") if k not in obj]
    if missing:
        raise DataError(path, lineno, f"missing key(s) {missing} for the canonical format")
    turns = obj["turns"]
    if not isinstance(turns, list):
        raise DataError(path, lineno, f"turns must be a list, got {type(turns).__name__}")
    raw = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "text" not in t:
            raise DataError(path, lineno, f"turn {i}: expected an object with 'text'")
        raw.append((t["text"], t.get("speaker", "")))
    return make_dialogue(obj["id"], raw, path, lineno, session=obj.get("session"))


def _from_messages(obj, path, lineno) -> Dialogue:
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise DataError(path, lineno, "expected an object with a 'messages' list")
    raw = []
    for i, m in enumerate(obj["messages"]):
        if not isinstance(m, dict) or "content" not in m:
            raise DataError(path, lineno, f"message {i}: expected an object with 'role' and 'content'")
        raw.append((m["content"], m.get("role", "")))
    return make_dialogue(obj.get("id", f"{os.path.basename(path)}:{lineno}"), raw, path, lineno)


def _from_msc(obj, path, lineno) -> Dialogue:
    """All sessions of an MSC episode, oldest first: previous_dialogs[0].dialog + ... + dialog."""
    if not isinstance(obj, dict) or not isinstance(obj.get("dialog"), list):
        raise DataError(path, lineno, "expected an MSC episode with a 'dialog' list")
    sessions = [p.get("dialog", []) for p in obj.get("previous_dialogs", []) or []] + [obj["dialog"]]
    raw = []
    for s in sessions:
        if not isinstance(s, list):
            raise DataError(path, lineno, "a session's 'dialog' must be a list")
        for i, t in enumerate(s):
            if not isinstance(t, dict) or "text" not in t:
                raise DataError(path, lineno, f"turn {len(raw)}: expected an object with 'text'")
            raw.append((t["text"], t.get("id", "")))
    ep_id = (obj.get("metadata") or {}).get("initial_data_id") or f"{os.path.basename(path)}:{lineno}"
    return make_dialogue(ep_id, raw, path, lineno, session=len(sessions))


def _iter_personachat(path: str) -> Iterator[Dialogue | DataError]:
    """PersonaChat as shipped by the StreamingDialogue reference: {dialogue id: [{dial_id, turn_id, text, session}]}."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        yield DataError(path, e.lineno, f"malformed JSON: {e.msg} (column {e.colno})")
        return
    if not isinstance(data, dict):
        yield DataError(path, 1, "expected one JSON object mapping dialogue id -> list of turns")
        return

    def line_of(key: str) -> int:
        pos = text.find(json.dumps(key))
        return text.count("\n", 0, pos) + 1 if pos >= 0 else 1

    for key, turns in data.items():
        try:
            if not isinstance(turns, list):
                raise DataError(path, line_of(key), f"dialogue {key!r}: expected a list of turns")
            for i, t in enumerate(turns):
                if not isinstance(t, dict) or "text" not in t:
                    raise DataError(path, line_of(key), f"dialogue {key!r} turn {i}: expected an object with 'text'")
            ordered = sorted(turns, key=lambda t: t.get("turn_id", 0)) if all(
                isinstance(t.get("turn_id"), int) for t in turns) else turns
            raw = [(t["text"], "AB"[i % 2]) for i, t in enumerate(ordered)]
            session = ordered[0].get("session") if ordered else None
            yield make_dialogue(key, raw, path, line_of(key), session=session)
        except DataError as e:
            yield e


_LINE_ADAPTERS = {"canonical": _from_canonical, "messages": _from_messages, "msc": _from_msc}


def detect_format(path: str) -> str:
    """Guess the format from the first record: a whole-file object is PersonaChat, else look at the keys."""
    with open(path, encoding="utf-8") as f:
        first = ""
        for raw in f:
            if raw.strip():
                first = raw.strip()
                break
    if not first:
        raise DataError(path, 1, "file is empty")
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        if first.startswith("{") or first.startswith("["):
            return "personachat"  # a pretty-printed whole-file JSON object
        raise DataError(path, 1, "cannot detect the format: the first line is not JSON")
    if isinstance(obj, dict):
        if "messages" in obj:
            return "messages"
        if "dialog" in obj:
            return "msc"
        if "turns" in obj:
            return "canonical"
        if obj and all(isinstance(v, list) for v in obj.values()):
            return "personachat"
    raise DataError(path, 1, "cannot detect the format; pass --format canonical|personachat|msc|messages")


def iter_dialogues(path: str, fmt: str = "auto") -> Iterator[Dialogue | DataError]:
    """Yield one Dialogue (or the DataError that rejects it) per input record of ``path``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: input file not found")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "personachat":
        yield from _iter_personachat(path)
        return
    if fmt not in _LINE_ADAPTERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of auto, {', '.join(FORMATS)}")
    adapt = _LINE_ADAPTERS[fmt]
    for lineno, obj in _jsonl(path):
        if isinstance(obj, DataError):
            yield obj
            continue
        try:
            yield adapt(obj, path, lineno)
        except DataError as e:
            yield e
