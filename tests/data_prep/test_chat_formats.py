"""Chat formats: ShareGPT, OpenAI messages (system, developer, tool, content parts, tool calls) and the
column/role mapping; every role becomes one of ``contract.ROLES``; bad records are one-line errors."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from data_prep.adapters import ChatMapping, detect_format, iter_dialogues
from data_prep.config import DataConfig
from data_prep.contract import ASSISTANT, ROLES, SYSTEM, TOOL, USER
from data_prep.prep import prepare
from data_prep.schema import DataError


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _only_error(path, fmt, mapping=ChatMapping()) -> DataError:
    [err] = [r for r in iter_dialogues(path, fmt, mapping) if isinstance(r, DataError)]
    assert "\n" not in str(err)
    return err


SHAREGPT = {"id": "s1", "system": "be kind", "conversations": [
    {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}, {"from": "function_call", "value": "{}"},
    {"from": "observation", "value": "42"}, {"from": "bot", "value": "it is 42"}, {"from": "user", "value": "thanks"},
    {"from": "system", "value": "wrap up"}, {"from": "chatgpt", "value": "bye"}, {"from": "tool", "value": "t"},
    {"from": "function", "value": "f"}, {"from": "assistant", "value": "done"}]}


def test_sharegpt_roles_are_normalised_and_system_column_leads(tmp_path):
    p = _write(tmp_path / "sg.jsonl", [SHAREGPT])
    assert detect_format(p) == "sharegpt"
    [d] = iter_dialogues(p)
    assert d.id == "s1"
    assert [t.speaker for t in d.turns] == [SYSTEM, USER, ASSISTANT, ASSISTANT, TOOL, ASSISTANT, USER, SYSTEM, ASSISTANT,
                                            TOOL, TOOL, ASSISTANT]
    assert [t.text for t in d.turns][:3] == ["be kind", "hi", "hello"]
    assert set(t.speaker for t in d.turns) <= set(ROLES)


def test_sharegpt_unknown_role_is_one_line_naming_line_key_and_role(tmp_path):
    rec = {"conversations": [{"from": "human", "value": "hi"}, {"from": "narrator", "value": "once"}]}
    p = _write(tmp_path / "sg.jsonl", [SHAREGPT, rec])
    err = _only_error(p, "sharegpt")
    assert err.line == 2 and err.code == "unknown_role"
    assert str(err).startswith(f"{p}:2: conversations[1].from: unknown role 'narrator'")
    assert "data.roles" in str(err)


def test_mapping_renames_columns_and_maps_extra_roles(tmp_path):
    rec = {"dialog_turns": [{"who": "customer", "says": "my order?"}, {"who": "agent", "says": "on its way"},
                            {"who": "narrator", "says": "the end"}], "prompt": "shop bot", "uid": 7}
    p = _write(tmp_path / "mapped.jsonl", [rec])
    mapping = ChatMapping(columns={"messages": "dialog_turns", "role": "who", "content": "says", "system": "prompt",
                                   "id": "uid"}, roles={"customer": USER, "agent": ASSISTANT, "narrator": SYSTEM})
    [d] = iter_dialogues(p, "sharegpt", mapping)
    assert d.id == "7"
    assert [(t.speaker, t.text) for t in d.turns] == [(SYSTEM, "shop bot"), (USER, "my order?"),
                                                     (ASSISTANT, "on its way"), (SYSTEM, "the end")]


def test_missing_mapped_column_names_the_column_and_the_mapping_key(tmp_path):
    p = _write(tmp_path / "mapped.jsonl", [{"conversations": [{"from": "human", "value": "hi"}]}])
    err = _only_error(p, "sharegpt", ChatMapping(columns={"messages": "dialog_turns"}))
    assert err.code == "missing_field" and str(err) == f"{p}:1: dialog_turns is missing"


def test_openai_messages_system_developer_tool_parts_and_tool_calls(tmp_path):
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}
    rec = {"messages": [
        {"role": "developer", "content": "terse"}, {"role": "system", "content": "be kind"},
        {"role": "user", "content": [{"type": "text", "text": "weather"}, {"type": "text", "text": "in Oslo?"}]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "-3 C"},
        {"role": "assistant", "content": "It is -3 C."}]}
    p = _write(tmp_path / "oa.jsonl", [rec])
    assert detect_format(p) == "messages"
    [d] = iter_dialogues(p)
    assert [t.speaker for t in d.turns] == [SYSTEM, SYSTEM, USER, ASSISTANT, TOOL, ASSISTANT]
    assert d.turns[2].text == "weather\nin Oslo?"
    assert json.loads(d.turns[3].text) == [{"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}]
    assert d.turns[4].text == "-3 C"


@pytest.mark.parametrize("message, key, reason", [
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "messages[0].content[0].type",
     "only text parts are supported, got 'image_url'"),
    ({"role": "user", "content": [{"type": "text", "text": 5}]}, "messages[0].content[0].text", "must be a string"),
    ({"role": "user", "content": 5}, "messages[0].content", "must be a string or a list, got integer"),
    ({"role": "assistant", "content": None}, "messages[0].content", "must be a string or a list, got null"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": 3}}]},
     "messages[0].tool_calls[0].function.name", "must be a string"),
    ({"role": "wizard", "content": "x"}, "messages[0].role", "unknown role 'wizard'"),
    ({"role": None, "content": "x"}, "messages[0].role", "must be a string, got null"),
])
def test_openai_bad_messages_are_one_line_errors_naming_the_key(tmp_path, message, key, reason):
    p = _write(tmp_path / "oa.jsonl", [{"messages": [message]}])
    err = _only_error(p, "messages")
    assert str(err).startswith(f"{p}:1: {key}") and reason in str(err), str(err)


def test_config_mapping_fields_are_strict():
    cfg = DataConfig(format="sharegpt", columns={"messages": "turns_col", "role": "who"}, roles={"narrator": "system"})
    assert cfg.columns.messages == "turns_col" and cfg.roles == {"narrator": "system"}
    with pytest.raises(ValidationError, match="roles"):
        DataConfig(roles={"narrator": "boss"})
    with pytest.raises(ValidationError, match="speaker"):
        DataConfig(columns={"speaker": "who"})


def test_prepare_reads_sharegpt_with_the_configured_mapping(tmp_path):
    recs = [{"dialog_turns": [{"who": "customer", "says": f"question {i}"}, {"who": "agent", "says": "answer"}]}
            for i in range(3)]
    p = _write(tmp_path / "mapped.jsonl", recs)
    cfg = DataConfig(engine="local", format="sharegpt", seq_len=64, columns={"messages": "dialog_turns", "role": "who",
                     "content": "says"}, roles={"customer": "user", "agent": "assistant"})
    manifest = prepare([p], str(tmp_path / "out"), cfg, progress=False)
    assert manifest["inputs"][0]["format"] == "sharegpt"
    assert manifest["counts"]["dialogues"] == 3 and manifest["inputs"][0]["kept"] == 3
