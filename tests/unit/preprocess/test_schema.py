"""Record schemas -> normalized messages, and every validation reason."""

import pytest

from megatron_pack.preprocess.schema import Message, RecordError, detect_schema, normalize_record

M = Message


def test_openai_multi_turn_with_system_and_tool():
    rec = {"messages": [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "call get"},
        {"role": "tool", "content": '{"result": "sunny"}'},
        {"role": "assistant", "content": "sunny"},
    ]}
    schema, msgs = normalize_record(rec)
    assert schema == "openai"
    assert msgs == [M("system", "be nice"), M("user", "weather?"), M("assistant", "call get"),
                    M("tool", '{"result": "sunny"}'), M("assistant", "sunny")]


def test_openai_text_parts_are_joined():
    rec = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                        {"role": "assistant", "content": "c"}]}
    assert normalize_record(rec)[1][0] == M("user", "ab")


def test_sharegpt_aliases_and_side_system():
    rec = {"system": "sys", "conversations": [
        {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
        {"from": "user", "value": "q2"}, {"from": "chatgpt", "value": "a2"},
    ]}
    schema, msgs = normalize_record(rec)
    assert schema == "sharegpt"
    assert [m.role for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert [m.content for m in msgs] == ["sys", "q1", "a1", "q2", "a2"]


@pytest.mark.parametrize("rec,expected", [
    ({"instruction": "Add.", "input": "2 4", "output": "6"}, [M("user", "Add.\n\n2 4"), M("assistant", "6")]),
    ({"instruction": "Add.", "input": "", "output": "6"}, [M("user", "Add."), M("assistant", "6")]),
    ({"instruction": "Add.", "output": "6", "system": "s"}, [M("system", "s"), M("user", "Add."), M("assistant", "6")]),
])
def test_alpaca(rec, expected):
    assert normalize_record(rec) == ("alpaca", expected)


@pytest.mark.parametrize("rec,reason", [
    ({"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}, "missing_role"),
    ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown_role"),
    ({"messages": [{"role": 3, "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown_role"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]}, "empty_content"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "y"}]}, "empty_content"),
    ({"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "y"}]}, "non_string_content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}, {"role": "assistant", "content": "y"}]},
     "non_string_content"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no_assistant_turn"),
    ({"messages": []}, "empty"),
    ({"conversations": []}, "empty"),
    ({"conversations": [], "system": "a system prompt alone"}, "no_assistant_turn"),
    ({"messages": "hello"}, "unknown_schema"),
    ({"messages": ["hello"]}, "unknown_schema"),
    ({"text": "plain pretraining text"}, "unknown_schema"),
    (["not", "an", "object"], "unknown_schema"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": ""}]}, "empty_content"),
    ({"instruction": "x", "input": 5, "output": "y"}, "non_string_content"),
    ({"instruction": "x", "output": ""}, "empty_content"),
])
def test_bad_records_have_reasons(rec, reason):
    with pytest.raises(RecordError) as err:
        normalize_record(rec)
    assert err.value.reason == reason
    assert reason in str(err.value) and err.value.detail


def test_error_names_the_offending_turn():
    rec = {"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}
    with pytest.raises(RecordError, match=r"messages\[1\].*'robot'"):
        normalize_record(rec)


def test_detect_schema():
    assert detect_schema({"messages": []}) == "openai"
    assert detect_schema({"conversations": []}) == "sharegpt"
    assert detect_schema({"instruction": "", "output": ""}) == "alpaca"
