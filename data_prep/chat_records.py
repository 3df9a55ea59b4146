"""Chat records (ShareGPT and OpenAI messages, with any column/role names) → ``Dialogue`` with normalised roles.

Both formats are a list of messages, each with a role and a content; they differ in names only:

* ShareGPT: ``{"conversations": [{"from": "human", "value": "..."}], "system": "..."}``;
* OpenAI messages: ``{"messages": [{"role": "user", "content": "..."}]}``.

``ChatMapping`` renames the columns (``messages``, ``role``, ``content``, ``system``, ``id``) and adds role names
(LLaMA-Factory's dataset_info ``columns``/``tags``). Every turn's speaker becomes one of ``contract.ROLES``. A content
is a string or a list of ``{"type": "text", "text": ...}`` parts (joined by newlines); an assistant message's
``tool_calls`` are rendered as JSON text (``[{"name", "arguments"}]``) after its content, so the model learns to
emit them; an optional top-level system column becomes a leading system turn.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from data_prep.contract import ASSISTANT, ROLES, SYSTEM, TOOL, USER
from data_prep.schema import ID_TYPES, At, Dialogue, make_dialogue, make_turn

SHAREGPT, MESSAGES = "sharegpt", "messages"
COLUMN_KEYS = ("messages", "role", "content", "system", "id")
DEFAULT_COLUMNS = {
    SHAREGPT: {"messages": "conversations", "role": "from", "content": "value", "system": "system", "id": "id"},
    MESSAGES: {"messages": "messages", "role": "role", "content": "content", "system": "system", "id": "id"},
}
ROLE_ALIASES = {
    "system": SYSTEM, "developer": SYSTEM,
    "human": USER, "user": USER,
    "gpt": ASSISTANT, "assistant": ASSISTANT, "bot": ASSISTANT, "chatgpt": ASSISTANT, "model": ASSISTANT,
    "function_call": ASSISTANT,  # LLaMA-Factory: the assistant's call; its result is an observation
    "tool": TOOL, "function": TOOL, "observation": TOOL, "ipython": TOOL,
}


@dataclass(frozen=True)
class ChatMapping:
    """Column names (keys of ``COLUMN_KEYS``; unset = the format's default) and extra role names → ``ROLES``."""

    columns: dict = field(default_factory=dict)
    roles: dict = field(default_factory=dict)

    @classmethod
    def of(cls, cfg) -> "ChatMapping":
        """The mapping of a ``DataConfig`` (``data.columns``, ``data.roles``)."""
        columns = {} if cfg.columns is None else cfg.columns.model_dump(exclude_none=True)
        return cls(columns=columns, roles=dict(cfg.roles))

    def column(self, fmt: str, key: str) -> str:
        return self.columns.get(key) or DEFAULT_COLUMNS[fmt][key]

    def role(self, name: str) -> str | None:
        return self.roles.get(name) or ROLE_ALIASES.get(name)


NO_MAPPING = ChatMapping()


def default_id(at: At) -> str:
    """The id of a record that has none: ``FILE:LINE`` (or ``DATASET[row N]``), by base name."""
    name = os.path.basename(at.source.rstrip("/"))
    return f"{name}[{at.line}]" if isinstance(at.line, str) else f"{name}:{at.line}"


def _text_of_parts(at: At, parts: list, key: str) -> str:
    texts = []
    for i, part in enumerate(parts):
        where = f"{key}[{i}]"
        at.expect(part, ("object",), where)
        kind = at.require(part, "type", ("string",), where)
        if kind != "text":
            raise at.error(f"{where}.type: only text parts are supported, got {kind!r}", "unsupported_content")
        texts.append(at.require(part, "text", ("string",), where))
    return "\n".join(texts)


def _tool_calls_text(at: At, calls: list, key: str) -> str:
    rendered = []
    for i, call in enumerate(calls):
        where = f"{key}[{i}]"
        at.expect(call, ("object",), where)
        fn = at.require(call, "function", ("object",), where)
        name = at.require(fn, "name", ("string",), f"{where}.function")
        args = at.expect(fn.get("arguments"), ("string", "object"), f"{where}.function.arguments", nullable=True)
        rendered.append({"name": name, "arguments": args})
    return json.dumps(rendered, ensure_ascii=False)


def _content(at: At, msg: dict, content_key: str, where: str) -> str:
    """The text of one message: its content (a string or text parts) and its rendered tool calls."""
    calls = at.expect(msg.get("tool_calls"), ("list",), f"{where}.tool_calls", nullable=True)
    value = msg.get(content_key)
    key = f"{where}.{content_key}"
    if value is None and calls:
        return _tool_calls_text(at, calls, f"{where}.tool_calls")
    if content_key not in msg:
        raise at.error(f"{key} is missing", "missing_field")
    at.expect(value, ("string", "list"), key)
    text = value if isinstance(value, str) else _text_of_parts(at, value, key)
    return f"{text}\n{_tool_calls_text(at, calls, f'{where}.tool_calls')}" if calls else text


def _role(at: At, msg: dict, role_key: str, where: str, mapping: ChatMapping) -> str:
    key = f"{where}.{role_key}"
    if role_key not in msg:
        raise at.error(f"{key} is missing", "missing_field")
    name = at.expect(msg[role_key], ("string",), key)
    role = mapping.role(name)
    if role is None:
        known = sorted(set(ROLE_ALIASES) | set(mapping.roles))
        raise at.error(f"{key}: unknown role {name!r}; known roles: {', '.join(known)} (map others with data.roles, "
                       f"e.g. {{{name}: {USER}}}; targets: {', '.join(ROLES)})", "unknown_role")
    return role


def from_chat(obj, at: At, fmt: str, mapping: ChatMapping = NO_MAPPING) -> Dialogue:
    """One chat record of ``fmt`` (``sharegpt`` or ``messages``) under ``mapping`` → a Dialogue."""
    at.expect(obj, ("object",), "record")
    col = {k: mapping.column(fmt, k) for k in COLUMN_KEYS}
    messages = at.require(obj, col["messages"], ("list",))
    turns = []
    system = at.expect(obj.get(col["system"]), ("string",), col["system"], nullable=True)
    if system is not None and system.strip():
        turns.append(make_turn(at, system, SYSTEM, col["system"], col["system"]))
    for i, msg in enumerate(messages):
        where = f"{col['messages']}[{i}]"
        at.expect(msg, ("object",), where)
        role = _role(at, msg, col["role"], where, mapping)
        turns.append(make_turn(at, _content(at, msg, col["content"], where), role, f"{where}.{col['content']}",
                               f"{where}.{col['role']}"))
    ep_id = at.expect(obj.get(col["id"]), ID_TYPES, col["id"], nullable=True)
    return make_dialogue(default_id(at) if ep_id is None else ep_id, turns, at.source, at.line)
