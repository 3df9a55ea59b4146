"""Bad-input cases for prep, generated: the bytes of one input file each, and where and why prep must reject it.

Every case file holds good records around at most one bad one (at ``BAD_LINE``), so a case says exactly which
line error mode must name and how many records skip mode must keep. Kinds of cases:

* wrong JSON types at every nesting level of every format (each key path x every wrong JSON type);
* bytes: invalid UTF-8 (bad start byte, truncated and overlong sequences), a UTF-8 BOM (accepted at the start of
  a file, a stray one mid-file is malformed JSON), a line of Unicode spaces, CRLF line ends;
* JSON edge cases: malformed, too deeply nested, an integer of 5000 digits, an unpaired surrogate in a text;
* duplicate ids (error naming both lines), literal special-token text (kept as text);
* file-level: empty files (error in both modes) and one huge line (``huge_line_case``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

BAD_LINE = 3  # the bad record's line in every per-record case file
BOM = b"\xef\xbb\xbf"
SPECIAL_TEXT = "say <|im_end|> then <|endoftext|> and <|im_start|>user literally"


@dataclass(frozen=True)
class Case:
    """One input file: ``data`` (bytes) in format ``fmt``; ``line``/``reason`` (a regex over the reason) of the
    record prep must reject (``line=None``: every record is good); ``records`` non-blank records."""

    name: str
    fmt: str
    data: bytes
    line: int | None
    reason: str
    code: str
    records: int
    file_level: bool = False  # an error about the whole file: it stops prep in skip mode too

    @property
    def rejected(self) -> int:
        return 0 if self.line is None else 1

    @property
    def suffix(self) -> str:
        return ".json" if self.fmt == "personachat" else ".jsonl"


def good(fmt: str, i: int) -> dict:
    """A valid record of ``fmt`` (JSON-lines formats) with id number ``i``."""
    if fmt == "canonical":
        return {"id": f"c{i}", "turns": [{"speaker": "A", "text": f"hello {i}"}, {"speaker": "B", "text": "hi there"}],
                "session": 1}
    if fmt == "messages":
        return {"id": f"m{i}", "messages": [{"role": "user", "content": f"hello {i}"},
                                             {"role": "assistant", "content": "hi there"}]}
    if fmt == "sharegpt":
        return {"id": f"g{i}", "system": "be brief", "conversations": [{"from": "human", "value": f"hello {i}"},
                                                                      {"from": "gpt", "value": "hi there"}]}
    return {"dialog": [{"id": "A", "text": f"now {i}"}, {"id": "B", "text": "ok"}], "metadata": {"initial_data_id": f"e{i}"},
            "previous_dialogs": [{"dialog": [{"id": "A", "text": "first"}, {"id": "B", "text": "second"}]}]}


# key path -> (accepted JSON types, the phrase the error uses, whether null is accepted)
TYPED_PATHS = {
    "canonical": {
        "record": ({"object"}, "an object", False),
        "id": ({"string", "integer"}, "a string or an integer", False),
        "turns": ({"list"}, "a list", False),
        "turns[1]": ({"object"}, "an object", False),
        "turns[1].text": ({"string"}, "a string", False),
        "turns[1].speaker": ({"string"}, "a string", True),
        "session": ({"integer"}, "an integer", True),
    },
    "messages": {
        "record": ({"object"}, "an object", False),
        "id": ({"string", "integer"}, "a string or an integer", True),
        "messages": ({"list"}, "a list", False),
        "messages[1]": ({"object"}, "an object", False),
        "messages[1].content": ({"string", "list"}, "a string or a list", False),
        "messages[1].role": ({"string"}, "a string", False),
    },
    "sharegpt": {
        "record": ({"object"}, "an object", False),
        "id": ({"string", "integer"}, "a string or an integer", True),
        "system": ({"string"}, "a string", True),
        "conversations": ({"list"}, "a list", False),
        "conversations[1]": ({"object"}, "an object", False),
        "conversations[1].value": ({"string", "list"}, "a string or a list", False),
        "conversations[1].from": ({"string"}, "a string", False),
    },
    "msc": {
        "record": ({"object"}, "an object", False),
        "dialog": ({"list"}, "a list", False),
        "dialog[1]": ({"object"}, "an object", False),
        "dialog[1].text": ({"string"}, "a string", False),
        "dialog[1].id": ({"string"}, "a string", True),
        "previous_dialogs": ({"list"}, "a list", True),
        "previous_dialogs[0]": ({"object"}, "an object", False),
        "previous_dialogs[0].dialog": ({"list"}, "a list", False),
        "previous_dialogs[0].dialog[0]": ({"object"}, "an object", False),
        "previous_dialogs[0].dialog[0].text": ({"string"}, "a string", False),
        "metadata": ({"object"}, "an object", True),
        "metadata.initial_data_id": ({"string", "integer"}, "a string or an integer", True),
    },
}
PERSONACHAT_PATHS = {  # inside the record of key "p1" (a whole-file format: a path starts with the dialogue key)
    '"p1"': ({"list"}, "a list", False),
    '"p1"[1]': ({"object"}, "an object", False),
    '"p1"[1].text': ({"string"}, "a string", False),
    '"p1"[1].turn_id': ({"integer"}, "an integer", True),
    '"p1"[1].session': ({"integer"}, "an integer", True),
}
WRONG_VALUES = {"null": None, "boolean": True, "integer": 3, "number": 1.5, "string": "x", "list": [1], "object": {"k": 1}}


def _set(obj, path: str, value):
    """``obj`` with the value at key path ``path`` (``a[1].b``; ``record`` = the whole record) replaced."""
    if path == "record":
        return value
    obj = json.loads(json.dumps(obj))
    steps = path.replace("[", ".[").split(".")
    node = obj
    for step in steps[:-1]:
        node = node[int(step[1:-1])] if step.startswith("[") else node[step]
    last = steps[-1]
    if last.startswith("["):
        node[int(last[1:-1])] = value
    else:
        node[last] = value
    return obj


def _jsonl(records: list) -> bytes:
    """JSON lines: a dict is dumped, a string is the line's text as it is."""
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


def _around(fmt: str, bad) -> bytes:
    """Good records at lines 1, 2 and 4, ``bad`` (a record, or a line's text) at line 3."""
    return _jsonl([good(fmt, 0), good(fmt, 1), bad, good(fmt, 3)])


def wrong_type_cases() -> list[Case]:
    """Every key path of every format, set to every JSON type it must not be."""
    cases = []
    for fmt, paths in TYPED_PATHS.items():
        for path, (ok, phrase, nullable) in paths.items():
            for got, value in WRONG_VALUES.items():
                if got in ok or (got == "null" and nullable):
                    continue
                bad = json.dumps(_set(good(fmt, 2), path, value))
                cases.append(Case(f"{fmt}-{path}-{got}", fmt, _around(fmt, bad), BAD_LINE,
                                  re.escape(f"{path} must be {phrase}, got {got}"), "wrong_type", 4))
    for path, (ok, phrase, nullable) in PERSONACHAT_PATHS.items():
        for got, value in WRONG_VALUES.items():
            if got in ok or (got == "null" and nullable):
                continue
            cases.append(personachat_case(f"personachat-{path}-{got}", path, value, phrase, got))
    return cases


def personachat_case(name: str, path: str, value, phrase: str, got: str) -> Case:
    """A PersonaChat file of three dialogues; the one of key ``p1`` (at line 3) has ``value`` at ``path``."""
    dialogue = [{"turn_id": 0, "text": "hello", "session": 1}, {"turn_id": 1, "text": "hi there", "session": 1}]
    data = {"p0": dialogue, "p1": dialogue, "p2": dialogue}
    inner = path[len('"p1"'):]
    data["p1"] = _set({"v": dialogue}, "v" + inner, value)["v"] if inner else value
    text = "{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in data.items()) + "\n}\n"
    return Case(name, "personachat", text.encode(), BAD_LINE, re.escape(f"{path} must be {phrase}, got {got}"),
                "wrong_type", 3)


def _bad_bytes_case(name: str, fmt: str, bad: bytes, at: int) -> Case:
    """``bad`` (one line's bytes, no newline) at line 3; the first invalid byte is at ``at`` inside it."""
    head = _jsonl([good(fmt, 0), good(fmt, 1)])
    data = head + bad + b"\n" + _jsonl([good(fmt, 3)])
    return Case(name, fmt, data, BAD_LINE, re.escape(f"invalid UTF-8 at byte {len(head) + at} of the file"),
                "invalid_utf8", 4)


def byte_cases() -> list[Case]:
    line = json.dumps(good("canonical", 2)).encode()
    at = line.index(b"hello")
    cases = [
        _bad_bytes_case("utf8-bad-start-byte", "canonical", line[:at] + b"\xff" + line[at:], at),
        _bad_bytes_case("utf8-truncated", "canonical", line[:at] + b"\xe2\x82" + line[at:], at),
        _bad_bytes_case("utf8-overlong", "canonical", line[:at] + b"\xc0\xaf" + line[at:], at),
        _bad_bytes_case("utf8-bad-in-msc", "msc", json.dumps(good("msc", 2)).encode().replace(b"now", b"n\xfe"),
                        json.dumps(good("msc", 2)).encode().index(b"now") + 1),
        Case("bom-at-start", "canonical", BOM + _jsonl([good("canonical", i) for i in range(4)]), None, "", "", 4),
        Case("bom-at-start-auto-format", "auto", BOM + _jsonl([good("msc", i) for i in range(4)]), None, "", "", 4),
        Case("bom-mid-file", "canonical", _around("canonical", "\ufeff" + json.dumps(good("canonical", 2))), BAD_LINE,
             "malformed JSON", "malformed_json", 4),
        Case("unicode-space-line", "canonical", _around("canonical", "\u3000"), BAD_LINE, "malformed JSON",
             "malformed_json", 4),
        Case("crlf-line-ends", "canonical", _jsonl([good("canonical", i) for i in range(4)]).replace(b"\n", b"\r\n"),
             None, "", "", 4),
    ]
    pc = ("{\n" + '"p0": [{"turn_id": 0, "text": "h\xff"}]\n}\n').encode("latin-1")
    cases.append(Case("utf8-bad-personachat", "personachat", pc, 2,
                      re.escape(f"invalid UTF-8 at byte {pc.index(bytes([0xff]))} of the file"), "invalid_utf8", 1))
    return cases


def json_cases() -> list[Case]:
    deep = "[" * 100_000 + "]" * 100_000
    surrogate = json.dumps(good("canonical", 2)).replace("hello 2", "hello \\ud800")
    return [
        Case("malformed-json", "canonical", _around("canonical", '{"id": "c2", "turns": ['), BAD_LINE,
             "malformed JSON", "malformed_json", 4),
        Case("too-deep", "canonical", _around("canonical", deep), BAD_LINE, "malformed JSON.*nested", "malformed_json", 4),
        Case("huge-integer", "canonical", _around("canonical", '{"id": 1' + "0" * 5000 + ', "turns": []}'), BAD_LINE,
             "malformed JSON", "malformed_json", 4),
        Case("unpaired-surrogate", "canonical", _around("canonical", surrogate), BAD_LINE,
             re.escape("turns[0].text") + ".*unpaired surrogate", "invalid_text", 4),
        Case("duplicate-id", "canonical", _jsonl([good("canonical", 0), good("canonical", 1), good("canonical", 2),
                                                  good("canonical", 1)]), 4,
             re.escape("duplicate id 'c1' (first at line 2)"), "duplicate_id", 4),
        Case("duplicate-id-msc", "msc", _jsonl([good("msc", 0), good("msc", 1), good("msc", 1), good("msc", 3)]), BAD_LINE,
             re.escape("duplicate id 'e1' (first at line 2)"), "duplicate_id", 4),
        Case("duplicate-key-personachat", "personachat",
             b'{\n"p0": [{"text": "a"}],\n"p0": [{"text": "b"}],\n"p2": [{"text": "c"}]\n}\n', 3,
             re.escape("duplicate id 'p0' (first at line 2)"), "duplicate_id", 3),
        Case("personachat-no-dialogues", "personachat", b"{\n}\n", 1, "file is empty", "empty_file", 1),
        Case("special-token-text", "canonical",
             _jsonl([good("canonical", 0), {"id": "s", "turns": [{"text": SPECIAL_TEXT}, {"text": "<|im_end|>"}]}]),
             None, "", "", 2),
    ]


def file_cases() -> list[Case]:
    """Files with no record: an error naming the file, in both modes."""
    return [Case(name, "auto", data, 1, "file is empty", "empty_file", 0, file_level=True)
            for name, data in (("empty", b""), ("blank-lines", b"\n  \n\n"), ("bom-only", BOM + b"\n"))] + [
        Case("empty-explicit-format", "canonical", b"", 1, "file is empty", "empty_file", 0, file_level=True)]


def record_cases() -> list[Case]:
    """Every case about one record (prep can quarantine it)."""
    return wrong_type_cases() + byte_cases() + json_cases()


def one_per_kind(cases: list[Case]) -> list[Case]:
    """One case per (format, key path) or per named case: what error mode is run on (each is one prep)."""
    seen, out = set(), []
    for c in cases:
        key = c.name.rsplit("-", 1)[0] if c.code == "wrong_type" else c.name
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def huge_line_case(megabytes: int = 50) -> Case:
    """One line of ``megabytes`` MB (a single utterance) between good records."""
    big = '{"id": "big", "turns": [{"text": "' + "word " * (megabytes * (1 << 20) // 5) + '"}]}'
    return Case("huge-line", "canonical", _around("canonical", big), BAD_LINE, "record is .* bytes, over the limit",
                "record_too_large", 4)


def write(case: Case, folder) -> str:
    """Write the case's file into ``folder``; its path."""
    path = folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', case.name)}{case.suffix}"  # no glob characters in names
    path.write_bytes(case.data)
    return str(path)
