"""Dialogue adapters: canonical JSONL, PersonaChat JSON, MSC JSONL and chat JSONL (OpenAI ``messages``, ShareGPT
``conversations``; ``chat_records``) → ``Dialogue``; Hugging Face datasets go through ``hf_datasets``.

``iter_dialogues(path, fmt)`` yields a ``Dialogue`` or a ``DataError`` per input record, so the caller decides
(stop on the first error, or quarantine it); nothing is dropped silently.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterator, Literal

from data_prep.chat_records import MESSAGES, NO_MAPPING, SHAREGPT, ChatMapping, from_chat
from data_prep.lines import decode_document, json_lines, parse_json, skip_bom
from data_prep.schema import ID_TYPES, At, DataError, Dialogue, Turn, json_type, make_dialogue, make_turn
from data_prep.sources import is_uri, read_bytes, resolve_inputs

Format = Literal["auto", "canonical", "personachat", "msc", "messages", "sharegpt", "hf"]
HF = "hf"  # read the input through Hugging Face ``datasets`` (records in a format detected from the columns)
FORMATS = ("canonical", "personachat", "msc", MESSAGES, SHAREGPT, HF)
RECORD_FORMATS = ("canonical", "msc", MESSAGES, SHAREGPT)  # one JSON object per record (a line or a dataset row)


def record_adapter(fmt: str, mapping: ChatMapping = NO_MAPPING):
    """``adapt(obj, at) -> Dialogue`` for the one-object-per-record format ``fmt``."""
    if fmt in (MESSAGES, SHAREGPT):
        return lambda obj, at: from_chat(obj, at, fmt, mapping)
    if fmt not in _LINE_ADAPTERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of auto, {', '.join(FORMATS)}")
    return _LINE_ADAPTERS[fmt]


def adapt_records(source: str, fmt: str, records, mapping: ChatMapping = NO_MAPPING
                  ) -> Iterator[tuple[object, Dialogue | DataError]]:
    """(line, Dialogue | DataError) for each ``(line, JSON value | DataError)`` of ``records``."""
    adapt = record_adapter(fmt, mapping)
    for line, obj in records:
        if isinstance(obj, DataError):
            yield line, obj
            continue
        try:
            yield line, adapt(obj, At(source, line))
        except DataError as e:
            yield line, e


def parse_jsonl(path: str, fmt: str, data: bytes, first_line: int = 1, offset: int = 0,
                mapping: ChatMapping = NO_MAPPING) -> Iterator[tuple[int, Dialogue | DataError]]:
    """(line number, Dialogue | DataError) for each non-blank line of ``data`` (the bytes of a whole JSON-lines
    file, or of a chunk of it that starts at byte ``offset``, line ``first_line``); decoding rules in ``lines``."""
    yield from adapt_records(path, fmt, json_lines(path, data, first_line, offset), mapping)


def _turns(at: At, obj: dict, key: str, text: str, speaker: str, prefix: str = "") -> list[Turn]:
    """The turns of the list ``obj[key]`` (objects with a ``text`` key and an optional ``speaker`` key)."""
    path = f"{prefix}.{key}" if prefix else key
    turns = at.require(obj, key, ("list",), prefix)
    out = []
    for i, t in enumerate(turns):
        where = f"{path}[{i}]"
        at.expect(t, ("object",), where)
        out.append(make_turn(at, at.require(t, text, ("string",), where), t.get(speaker), f"{where}.{text}",
                             f"{where}.{speaker}"))
    return out


def _from_canonical(obj, at: At) -> Dialogue:
    at.expect(obj, ("object",), "record")
    missing = [k for k in ("id", "turns") if k not in obj]
    if missing:
        raise at.error(f"missing key(s) {missing} for the canonical format", "missing_field")
    turns = _turns(at, obj, "turns", "text", "speaker")
    session = at.expect(obj.get("session"), ("integer",), "session", nullable=True)
    return make_dialogue(at.expect(obj["id"], ID_TYPES, "id"), turns, at.source, at.line, session=session)


def _from_msc(obj, at: At) -> Dialogue:
    """All sessions of an MSC episode, oldest first: previous_dialogs[0].dialog + ... + dialog."""
    at.expect(obj, ("object",), "record")
    previous = at.expect(obj.get("previous_dialogs"), ("list",), "previous_dialogs", nullable=True) or []
    turns = []
    for i, p in enumerate(previous):
        at.expect(p, ("object",), f"previous_dialogs[{i}]")
        if "dialog" in p:  # a previous session without a dialog adds no turns
            turns += _turns(at, p, "dialog", "text", "id", prefix=f"previous_dialogs[{i}]")
    turns += _turns(at, obj, "dialog", "text", "id")
    meta = at.expect(obj.get("metadata"), ("object",), "metadata", nullable=True) or {}
    ep_id = at.expect(meta.get("initial_data_id"), ID_TYPES, "metadata.initial_data_id", nullable=True)
    return make_dialogue(ep_id if ep_id not in (None, "") else f"{os.path.basename(at.source)}:{at.line}", turns,
                         at.source, at.line, session=len(previous) + 1)


_SPACE = re.compile(r"[ \t\n\r]*")


def personachat_records(path: str, data: bytes) -> list:
    """Split a PersonaChat file ({dialogue id: [{dial_id, turn_id, text, session}]}) into records
    ``(key, turns, line)`` in file order; a key seen before is a DataError naming both lines; a file that is not
    such an object is one DataError."""
    text = decode_document(path, data)
    if isinstance(text, DataError):
        return [text]
    value = parse_json(path, 1, text)
    if isinstance(value, DataError):
        return [value]
    if not isinstance(value, dict):
        return [DataError(path, 1, f"file must be an object mapping dialogue id to a list of turns, got "
                                   f"{json_type(value)}", "wrong_type")]
    if not value:
        return [DataError(path, 1, "file is empty: an object with no dialogues", "empty_file")]
    decoder = json.JSONDecoder()
    out, first_line_of, line, counted = [], {}, 1, 0
    pos = _SPACE.match(text, 0).end() + 1  # after the opening brace (the document parsed above)
    while True:
        pos = _SPACE.match(text, pos).end()
        if text[pos] == "}":
            return out
        line += text.count("\n", counted, pos)
        counted = pos
        key, pos = json.decoder.scanstring(text, pos + 1)
        pos = _SPACE.match(text, _SPACE.match(text, pos).end() + 1).end()  # past the colon
        turns, pos = decoder.raw_decode(text, pos)
        if key in first_line_of:
            out.append(DataError(path, line, f"duplicate id {key!r} (first at line {first_line_of[key]})", "duplicate_id"))
        else:
            first_line_of[key] = line
            out.append((key, turns, line))
        pos = _SPACE.match(text, pos).end()
        pos += text[pos] == ","


def personachat_dialogue(path: str, key: str, turns, line) -> Dialogue:
    at, name = At(path, line), json.dumps(key)
    at.expect(turns, ("list",), name)
    for i, t in enumerate(turns):
        at.expect(t, ("object",), f"{name}[{i}]")
        at.require(t, "text", ("string",), f"{name}[{i}]")
        at.expect(t.get("turn_id"), ("integer",), f"{name}[{i}].turn_id", nullable=True)
        at.expect(t.get("session"), ("integer",), f"{name}[{i}].session", nullable=True)
    ordered = sorted(turns, key=lambda t: t["turn_id"]) if all(
        isinstance(t.get("turn_id"), int) for t in turns) else turns
    raw = [make_turn(at, t["text"], "AB"[i % 2], f"{name}[{i}].text", f"{name}[{i}].speaker")
           for i, t in enumerate(ordered)]
    session = ordered[0].get("session") if ordered else None
    return make_dialogue(key, raw, path, line, session=session)


def _iter_personachat(path: str, data: bytes) -> Iterator[Dialogue | DataError]:
    for rec in personachat_records(path, data):
        if isinstance(rec, DataError):
            yield rec
            continue
        try:
            yield personachat_dialogue(path, *rec)
        except DataError as e:
            yield e


_LINE_ADAPTERS = {"canonical": _from_canonical, "msc": _from_msc}


WHOLE_FILE_FORMATS = ("personachat",)


def detect_format_from_line(path: str, first: str) -> str:
    """Guess the format from the first non-blank line: a whole-file object is PersonaChat, else look at the keys."""
    if not first:
        raise DataError(path, 1, "file is empty: no records", "empty_file")
    try:
        obj = json.loads(first)
    except (ValueError, RecursionError):
        if first.startswith("{") or first.startswith("["):
            return "personachat"  # a pretty-printed whole-file JSON object
        raise DataError(path, 1, "cannot detect the format: the first line is not JSON", "malformed_json") from None
    fmt = record_format_of(obj)
    if fmt is not None:
        return fmt
    if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
        return "personachat"
    raise DataError(path, 1, f"cannot detect the format; pass --format {'|'.join(FORMATS)}")


def record_format_of(obj) -> str | None:
    """The one-object-per-record format whose key ``obj`` has (messages, conversations, dialog, turns), if any."""
    if isinstance(obj, dict):
        for key, fmt in (("messages", MESSAGES), ("conversations", SHAREGPT), ("dialog", "msc"), ("turns", "canonical")):
            if key in obj:
                return fmt
    return None


def first_line(data: bytes) -> str:
    """The first non-blank line of a file's bytes (a leading BOM skipped; bad bytes replaced), for format detection."""
    data, _ = skip_bom(data, 0)
    return next((raw.strip() for raw in data.split(b"\n") if raw.strip()), b"").decode("utf-8", errors="replace")


def detect_format(path: str) -> str:
    return detect_format_from_line(path, first_line(read_bytes(path)))


def iter_dialogues(path: str, fmt: str = "auto", mapping: ChatMapping = NO_MAPPING) -> Iterator[Dialogue | DataError]:
    """Yield one Dialogue (or the DataError that rejects it) per input record of ``path`` (a local path or a
    URI pyarrow reads, or a Hugging Face dataset: ``hf_datasets.is_dataset_input``)."""
    from data_prep import hf_datasets

    if hf_datasets.is_dataset_input(path, fmt):
        yield from dataset_dialogues(hf_datasets.dataset_records(path, fmt, mapping), mapping)
        return
    if not (os.path.isfile(path) or (is_uri(path) and resolve_inputs([path]))):
        raise FileNotFoundError(f"{path}: input file not found")
    data = read_bytes(path)
    if fmt == "auto":
        fmt = detect_format_from_line(path, first_line(data))
    if fmt == "personachat":
        yield from _iter_personachat(path, data)
        return
    for _, rec in parse_jsonl(path, fmt, data, mapping=mapping):
        yield rec


def dataset_dialogues(records, mapping: ChatMapping = NO_MAPPING) -> Iterator[Dialogue | DataError]:
    """One Dialogue (or DataError) per row of a loaded dataset (``hf_datasets.DatasetRecords``), in row order."""
    for _, rec in adapt_records(records.spec, records.fmt, records.rows_as_objects(0, records.rows), mapping):
        yield rec
