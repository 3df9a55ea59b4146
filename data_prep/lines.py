"""Input bytes → JSON values: the one way both engines split, decode and parse input, so they accept and reject the
same records with the same words.

* UTF-8 is strict: a line with invalid UTF-8 is rejected (``invalid UTF-8 at byte N of the file``, N counted from 0);
  a UTF-8 byte-order mark at the very start of a file is skipped (anywhere else it is text, and malformed JSON).
* A line is blank when it holds only ASCII whitespace (what the driver's chunk scan counts, too).
* A record (one line) longer than ``MAX_RECORD_BYTES`` is rejected before it is decoded or parsed, so one huge line
  costs its bytes and no more.
* JSON that Python's parser cannot take (too deeply nested, an integer of thousands of digits) is malformed JSON.
"""

from __future__ import annotations

import json
from typing import Iterator

from data_prep.schema import DataError

BOM = b"\xef\xbb\xbf"
MAX_RECORD_BYTES = 16 << 20  # 16 MiB per JSON line: far above any dialogue (an MSC episode is ~10 KB)


def skip_bom(raw: bytes, offset: int) -> tuple[bytes, int]:
    """``raw`` (bytes that start at byte ``offset`` of a file) without a byte-order mark at the file's start, and
    the offset of what remains."""
    if offset == 0 and raw.startswith(BOM):
        return raw[len(BOM):], len(BOM)
    return raw, offset


def parse_json(path: str, line: int, text: str):
    """The JSON value of ``text`` (from ``path`` at ``line``), or a DataError saying why it is malformed."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return DataError(path, line + e.lineno - 1, f"malformed JSON: {e.msg} (column {e.colno})", "malformed_json")
    except RecursionError:
        return DataError(path, line, "malformed JSON: nested too deeply", "malformed_json")
    except ValueError as e:  # e.g. an integer beyond Python's digit limit
        return DataError(path, line, f"malformed JSON: {str(e).splitlines()[0]}", "malformed_json")


def json_lines(path: str, data: bytes, first_line: int = 1, offset: int = 0) -> Iterator[tuple[int, object]]:
    """(line number, JSON value | DataError) for each non-blank line of ``data``: bytes of a JSON-lines file that
    start at byte ``offset``, line ``first_line``."""
    pos = offset
    for lineno, raw in enumerate(data.split(b"\n"), start=first_line):
        start, pos = pos, pos + len(raw) + 1
        raw, start = skip_bom(raw, start)
        if not raw.strip():
            continue
        if len(raw) > MAX_RECORD_BYTES:
            yield lineno, DataError(path, lineno, f"record is {len(raw)} bytes, over the limit of {MAX_RECORD_BYTES} "
                                    "bytes per record", "record_too_large")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, DataError(path, lineno, f"invalid UTF-8 at byte {start + e.start} of the file", "invalid_utf8")
            continue
        yield lineno, parse_json(path, lineno, text)


def decode_document(path: str, data: bytes) -> str | DataError:
    """A whole-file JSON document's text (strict UTF-8, a leading BOM skipped), or the DataError at its first
    invalid byte."""
    data, start = skip_bom(data, 0)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        return DataError(path, data.count(b"\n", 0, e.start) + 1, f"invalid UTF-8 at byte {start + e.start} of the file",
                         "invalid_utf8")
