"""Dialogue adapters: canonical JSONL, PersonaChat JSON, MSC JSONL and chat ``messages`` JSONL → ``Dialogue``.

``iter_dialogues(path, fmt)`` yields a ``Dialogue`` or a ``DataError`` per input record, so the caller decides
(stop on the first error, or quarantine it); nothing is dropped silently.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Literal

from data_prep.schema import DataError, Dialogue, make_dialogue
from data_prep.sources import is_uri, read_text, resolve_inputs

Format = Literal["auto", "canonical", "personachat", "msc", "messages"]
FORMATS = ("canonical", "personachat", "msc", "messages")


def parse_jsonl(path: str, fmt: str, text: str, first_line: int = 1) -> Iterator[tuple[int, Dialogue | DataError]]:
    """(line number, Dialogue | DataError) for each non-blank line of ``text`` (a whole JSON-lines file, or
    a chunk of it that starts at line ``first_line``)."""
    if fmt not in _LINE_ADAPTERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of auto, {', '.join(FORMATS)}")
    adapt = _LINE_ADAPTERS[fmt]
    for lineno, raw in enumerate(text.split("\n"), start=first_line):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            yield lineno, DataError(path, lineno, f"malformed JSON: {e.msg} (column {e.colno})", "malformed_json")
            continue
        try:
            yield lineno, adapt(obj, path, lineno)
        except DataError as e:
            yield lineno, e


def _from_canonical(obj, path, lineno) -> Dialogue:
    if not isinstance(obj, dict):
        raise DataError(path, lineno, f"expected an object with 'id' and 'turns', got {type(obj).__name__}", "wrong_type")
    missing = [k for k in ("id", "turns") if k not in obj]
    if missing:
        raise DataError(path, lineno, f"missing key(s) {missing} for the canonical format", "missing_field")
    turns = obj["turns"]
    if not isinstance(turns, list):
        raise DataError(path, lineno, f"turns must be a list, got {type(turns).__name__}", "wrong_type")
    raw = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "text" not in t:
            raise DataError(path, lineno, f"turn {i}: expected an object with 'text'", "missing_field")
        raw.append((t["text"], t.get("speaker", "")))
    return make_dialogue(obj["id"], raw, path, lineno, session=obj.get("session"))


def _from_messages(obj, path, lineno) -> Dialogue:
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise DataError(path, lineno, "expected an object with a 'messages' list", "missing_field")
    raw = []
    for i, m in enumerate(obj["messages"]):
        if not isinstance(m, dict) or "content" not in m:
            raise DataError(path, lineno, f"message {i}: expected an object with 'role' and 'content'", "missing_field")
        raw.append((m["content"], m.get("role", "")))
    return make_dialogue(obj.get("id", f"{os.path.basename(path)}:{lineno}"), raw, path, lineno)


def _from_msc(obj, path, lineno) -> Dialogue:
    """All sessions of an MSC episode, oldest first: previous_dialogs[0].dialog + ... + dialog."""
    if not isinstance(obj, dict) or not isinstance(obj.get("dialog"), list):
        raise DataError(path, lineno, "expected an MSC episode with a 'dialog' list", "missing_field")
    sessions = [p.get("dialog", []) for p in obj.get("previous_dialogs", []) or []] + [obj["dialog"]]
    raw = []
    for s in sessions:
        if not isinstance(s, list):
            raise DataError(path, lineno, "a session's 'dialog' must be a list", "wrong_type")
        for i, t in enumerate(s):
            if not isinstance(t, dict) or "text" not in t:
                raise DataError(path, lineno, f"turn {len(raw)}: expected an object with 'text'", "missing_field")
            raw.append((t["text"], t.get("id", "")))
    ep_id = (obj.get("metadata") or {}).get("initial_data_id") or f"{os.path.basename(path)}:{lineno}"
    return make_dialogue(ep_id, raw, path, lineno, session=len(sessions))


def personachat_records(path: str, text: str) -> list:
    """Split a PersonaChat file ({dialogue id: [{dial_id, turn_id, text, session}]}) into records
    ``(key, turns, line)``; a file that is not such an object is one DataError."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return [DataError(path, e.lineno, f"malformed JSON: {e.msg} (column {e.colno})", "malformed_json")]
    if not isinstance(data, dict):
        return [DataError(path, 1, "expected one JSON object mapping dialogue id -> list of turns", "wrong_type")]
    out, pos, line = [], 0, 1
    for key, turns in data.items():  # keys appear in file order: search (and count lines) on from the previous one
        at = text.find(json.dumps(key), pos)
        if at < 0:
            out.append((key, turns, 1))
            continue
        line += text.count("\n", pos, at)
        pos = at
        out.append((key, turns, line))
    return out


def personachat_dialogue(path: str, key: str, turns, line) -> Dialogue:
    if not isinstance(turns, list):
        raise DataError(path, line, f"dialogue {key!r}: expected a list of turns", "wrong_type")
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "text" not in t:
            raise DataError(path, line, f"dialogue {key!r} turn {i}: expected an object with 'text'", "missing_field")
    ordered = sorted(turns, key=lambda t: t.get("turn_id", 0)) if all(
        isinstance(t.get("turn_id"), int) for t in turns) else turns
    raw = [(t["text"], "AB"[i % 2]) for i, t in enumerate(ordered)]
    session = ordered[0].get("session") if ordered else None
    return make_dialogue(key, raw, path, line, session=session)


def _iter_personachat(path: str, text: str) -> Iterator[Dialogue | DataError]:
    for rec in personachat_records(path, text):
        if isinstance(rec, DataError):
            yield rec
            continue
        try:
            yield personachat_dialogue(path, *rec)
        except DataError as e:
            yield e


_LINE_ADAPTERS = {"canonical": _from_canonical, "messages": _from_messages, "msc": _from_msc}


WHOLE_FILE_FORMATS = ("personachat",)


def detect_format_from_line(path: str, first: str) -> str:
    """Guess the format from the first non-blank line: a whole-file object is PersonaChat, else look at the keys."""
    if not first:
        raise DataError(path, 1, "file is empty", "empty_file")
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        if first.startswith("{") or first.startswith("["):
            return "personachat"  # a pretty-printed whole-file JSON object
        raise DataError(path, 1, "cannot detect the format: the first line is not JSON", "malformed_json")
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


def detect_format(path: str) -> str:
    text = read_text(path)
    first = next((line.strip() for line in text.split("\n") if line.strip()), "")
    return detect_format_from_line(path, first)


def iter_dialogues(path: str, fmt: str = "auto") -> Iterator[Dialogue | DataError]:
    """Yield one Dialogue (or the DataError that rejects it) per input record of ``path`` (a local path or a
    URI pyarrow reads)."""
    if not (os.path.isfile(path) or (is_uri(path) and resolve_inputs([path]))):
        raise FileNotFoundError(f"{path}: input file not found")
    text = read_text(path)
    if fmt == "auto":
        first = next((line.strip() for line in text.split("\n") if line.strip()), "")
        fmt = detect_format_from_line(path, first)
    if fmt == "personachat":
        yield from _iter_personachat(path, text)
        return
    for _, rec in parse_jsonl(path, fmt, text):
        yield rec
