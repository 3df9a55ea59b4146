"""The canonical dialogue record and its validation.

A canonical record is one JSON line::

    {"id": "d1", "turns": [{"speaker": "A", "text": "hi"}, {"speaker": "B", "text": "hello"}], "session": 1}

Every error names the file and the line (or the record key for whole-file JSON formats).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class DataError(ValueError):
    """A bad input record. ``str(err)`` is one line: ``FILE:LINE: reason`` (a dataset row: ``DATASET[row N]: reason``;
    a whole dataset, line ``""``: ``DATASET: reason``). ``code`` is a short category (malformed_json, wrong_type,
    missing_field, empty_text, too_long, ...) counted in the manifest."""

    def __init__(self, source: str, line: int | str, reason: str, code: str = "invalid"):
        self.source, self.line, self.reason, self.code = source, line, reason, code
        super().__init__(f"{where(source, line)}: {reason}")

    def __reduce__(self):  # picklable with all fields (Ray workers send errors back)
        return (DataError, (self.source, self.line, self.reason, self.code))


def where(source: str, line: int | str) -> str:
    """``FILE:LINE``, ``DATASET[row N]`` (a line that is a string) or ``DATASET`` (no line)."""
    if line == "" or line is None:
        return source
    return f"{source}[{line}]" if isinstance(line, str) else f"{source}:{line}"


@dataclass(frozen=True)
class Turn:
    speaker: str
    text: str


@dataclass(frozen=True)
class Dialogue:
    """One dialogue: an ordered list of turns. ``source``/``line`` say where it came from."""

    id: str
    turns: tuple[Turn, ...]
    session: int | None = None
    source: str = "<memory>"
    line: int | str = 0
    meta: dict = field(default_factory=dict, compare=False)

    def to_json(self) -> dict:
        out = {"id": self.id, "turns": [{"speaker": t.speaker, "text": t.text} for t in self.turns]}
        if self.session is not None:
            out["session"] = self.session
        return out


JSON_TYPES = ((type(None), "null"), (bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
              (list, "list"), (dict, "object"))  # bool before int: True is an int in Python
PHRASES = {"object": "an object", "list": "a list", "string": "a string", "integer": "an integer"}


def json_type(value) -> str:
    """The JSON name of a parsed value's type (``null``, ``boolean``, ``integer``, ``number``, ``string``, ``list``,
    ``object``)."""
    return next(name for kind, name in JSON_TYPES if isinstance(value, kind))


@dataclass(frozen=True)
class At:
    """Where a record is (file and line): checks the record's fields, raising DataErrors that name both."""

    source: str
    line: int | str

    def error(self, reason: str, code: str) -> DataError:
        return DataError(self.source, self.line, reason, code)

    def expect(self, value, kinds: tuple[str, ...], key: str, nullable: bool = False):
        """``value`` (at key path ``key``) if its JSON type is one of ``kinds`` (or it is null and ``nullable``);
        else ``KEY must be TYPE, got TYPE``. A string must also be encodable as UTF-8 (no unpaired surrogate)."""
        got = json_type(value)
        if got == "null" and nullable:
            return None
        if got not in kinds:
            raise self.error(f"{key} must be {' or '.join(PHRASES[k] for k in kinds)}, got {got}", "wrong_type")
        if got == "string":
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise self.error(f"{key} contains an unpaired surrogate (U+{ord(value[e.start]):04X})",
                                 "invalid_text") from None
        return value

    def require(self, obj: dict, key: str, kinds: tuple[str, ...], prefix: str = ""):
        """``obj[key]`` checked as by ``expect``; a missing key is ``KEY is missing``."""
        path = f"{prefix}.{key}" if prefix else key
        if key not in obj:
            raise self.error(f"{path} is missing", "missing_field")
        return self.expect(obj[key], kinds, path)


ID_TYPES = ("string", "integer")


def make_turn(at: At, raw_text, speaker, text_key: str, speaker_key: str) -> Turn:
    """Validate one turn (its text at key path ``text_key``, its speaker, optional, at ``speaker_key``)."""
    text = at.expect(raw_text, ("string",), text_key)
    if not text.strip():
        raise at.error(f"{text_key} is empty", "empty_text")
    speaker = at.expect(speaker, ("string",), speaker_key, nullable=True)
    return Turn(speaker=speaker or "", text=text.strip())


def make_dialogue(dialogue_id, raw_turns: list, source: str, line, session=None, min_turns: int = 1) -> Dialogue:
    """A Dialogue from turns: ``Turn`` objects (validated by the adapter) or ``(text, speaker)`` pairs (validated
    here, as ``turns[i].text`` / ``turns[i].speaker``)."""
    at = At(source, line)
    at.expect(dialogue_id, ID_TYPES, "id")
    turns = [t if isinstance(t, Turn) else make_turn(at, t[0], t[1], f"turns[{i}].text", f"turns[{i}].speaker")
             for i, t in enumerate(raw_turns)]
    if len(turns) < min_turns:
        raise at.error(f"dialogue has {len(turns)} turns, need at least {min_turns}", "too_few_turns")
    return Dialogue(id=str(dialogue_id), turns=tuple(turns), session=session, source=source, line=line)
