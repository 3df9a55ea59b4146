"""The canonical dialogue record and its validation.

A canonical record is one JSON line::

    {"id": "d1", "turns": [{"speaker": "A", "text": "hi"}, {"speaker": "B", "text": "hello"}], "session": 1}

Every error names the file and the line (or the record key for whole-file JSON formats).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class DataError(ValueError):
    """A bad input record. ``str(err)`` is one line: ``FILE:LINE: reason``. ``code`` is a short category
    (malformed_json, wrong_type, missing_field, empty_text, too_long, ...) counted in the manifest."""

    def __init__(self, source: str, line: int | str, reason: str, code: str = "invalid"):
        self.source, self.line, self.reason, self.code = source, line, reason, code
        super().__init__(f"{source}:{line}: {reason}")

    def __reduce__(self):  # picklable with all fields (Ray workers send errors back)
        return (DataError, (self.source, self.line, self.reason, self.code))


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


def make_turn(raw_text, speaker, source: str, line, index: int) -> Turn:
    """Validate one turn; raise DataError naming the file, line and turn index."""
    if not isinstance(raw_text, str):
        raise DataError(source, line, f"turn {index}: text must be a string, got {type(raw_text).__name__}", "wrong_type")
    if not raw_text.strip():
        raise DataError(source, line, f"turn {index}: text is empty", "empty_text")
    if speaker is None:
        speaker = ""
    if not isinstance(speaker, str):
        speaker = str(speaker)
    return Turn(speaker=speaker, text=raw_text.strip())


def make_dialogue(dialogue_id, raw_turns, source: str, line, session=None, min_turns: int = 1) -> Dialogue:
    """Build a Dialogue from ``[(text, speaker), ...]``, validating every turn."""
    if not isinstance(dialogue_id, (str, int)):
        raise DataError(source, line, f"id must be a string, got {type(dialogue_id).__name__}", "wrong_type")
    if not isinstance(raw_turns, list):
        raise DataError(source, line, f"turns must be a list, got {type(raw_turns).__name__}", "wrong_type")
    turns = tuple(make_turn(text, spk, source, line, i) for i, (text, spk) in enumerate(raw_turns))
    if len(turns) < min_turns:
        raise DataError(source, line, f"dialogue has {len(turns)} turns, need at least {min_turns}", "too_few_turns")
    return Dialogue(id=str(dialogue_id), turns=turns, session=session, source=source, line=line)
