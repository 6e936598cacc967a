"""Messages: pydantic models render like the dicts they stand for; malformed messages raise a
MessageError naming the message index and the field."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from encoding import (
    AssistantMessage,
    DeveloperMessage,
    FunctionCall,
    LatestReminderMessage,
    MessageError,
    SystemMessage,
    ToolCall,
    ToolMessage,
    ToolSpec,
    UserMessage,
    encode_messages,
)
from test_encoding_official import load_case


def test_models_render_like_the_official_dicts():
    data, expected = load_case(3)
    models = [
        SystemMessage(content=data[0]["content"]),
        LatestReminderMessage(content=data[1]["content"]),
        DeveloperMessage(content=data[2]["content"], tools=[ToolSpec.model_validate(t) for t in data[2]["tools"]]),
        AssistantMessage(content="", reasoning_content=data[3]["reasoning_content"], tool_calls=[
            ToolCall(function=FunctionCall(**data[3]["tool_calls"][0]["function"]))]),
        ToolMessage(content="[0]"),
        AssistantMessage(content=data[5]["content"], reasoning_content=data[5]["reasoning_content"], tool_calls=[]),
    ]
    assert encode_messages(models, "thinking") == expected
    mixed = data[:3] + models[3:]
    assert encode_messages(mixed, "thinking") == expected


def test_tool_schema_keeps_none_defaults_and_extra_keys():
    spec = ToolSpec.model_validate({"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"default": None}}}, "strict": True}})
    as_dict = {"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"default": None}}}, "strict": True}}
    user = {"role": "user", "content": "q"}
    assert encode_messages([SystemMessage(content="S", tools=[spec]), user], "chat") == \
        encode_messages([{"role": "system", "content": "S", "tools": [as_dict]}, user], "chat")
    assert '"default": null' in encode_messages([SystemMessage(tools=[spec]), user], "chat")


def test_dict_arguments_are_taken_as_decoded():
    args = {"path": "a.txt", "n": 2}
    as_text = [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": json.dumps(args)}}]}]
    as_dict = [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": args}}]}]
    assert encode_messages(as_dict, "chat") == encode_messages(as_text, "chat")


NOT_JSON_ARGUMENTS = {
    "not_json": "{cmd: ls}",
    "empty": "",
    "cut_off": '{"path": "a.txt"',
    "nested_too_deep_for_json": '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "integer_too_long_for_json": '{"n": ' + "1" * 5000 + "}",
}


@pytest.mark.parametrize("name", sorted(NOT_JSON_ARGUMENTS))
def test_arguments_json_cannot_decode_render_as_one_string_parameter(name):
    # The official encoder catches json.loads' failure and renders {"arguments": raw}; histories from
    # other clients carry such calls, so they render instead of raising.
    arguments = NOT_JSON_ARGUMENTS[name]
    messages = [{"role": "user", "content": "go"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "run", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": "c", "content": "R"}]
    assert encode_messages(messages, "chat") == (
        "<｜begin▁of▁sentence｜><｜User｜>go<｜Assistant｜></think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"run\">\n"
        f'<｜DSML｜parameter name="arguments" string="true">{arguments}</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        "</｜DSML｜tool_calls><｜end▁of▁sentence｜><｜User｜><tool_result>R</tool_result><｜Assistant｜></think>")


BAD = {
    "unknown_role": ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "messages[1].role"),
    "not_a_message": (["hello"], "messages[0]"),
    "content_not_text": ([{"role": "user", "content": 3}], "messages[0].content"),
    "empty_developer": ([{"role": "developer", "content": ""}], "messages[0].content"),
    "reminder_without_content": ([{"role": "latest_reminder"}], "messages[0].content"),
    "unknown_task": ([{"role": "user", "content": "a", "task": "translate"}], "messages[0].task"),
    "tool_without_call": ([{"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": "x", "content": "r"}], "messages[1]"),
    "tool_result_for_another_call": ([
        {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "b", "content": "r"}], "messages[1].tool_call_id"),
    "second_result_for_a_call": ([
        {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                                             {"id": "b", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "r"}, {"role": "tool", "tool_call_id": "a", "content": "r"}],
        "messages[2].tool_call_id"),
    "more_results_than_calls": ([
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "r"}, {"role": "tool", "content": "r"}], "messages[2]"),
    # JSON that is not an object: upstream fails on `.items()`.
    "arguments_a_json_array": ([{"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "[1]"}}]}], "messages[0].tool_calls[0].function.arguments"),
    "arguments_json_null": ([{"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "null"}}]}], "messages[0].tool_calls[0].function.arguments"),
    "arguments_a_json_string": ([{"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": '"ls"'}}]}], "messages[0].tool_calls[0].function.arguments"),
    "arguments_not_text": ([{"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": 3}}]}], "messages[0].tool_calls[0].function.arguments"),
    "call_without_name": ([{"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"arguments": "{}"}}]}], "messages[0].tool_calls[0].function.name"),
    "tools_not_openai_shape": ([{"role": "system", "content": "S", "tools": [{"name": "f"}]}], "messages[0].tools[0]"),
    "response_format_not_json": ([{"role": "system", "content": "S", "response_format": {"s": {1, 2}}}], "messages[0].response_format"),
    "tool_schema_not_json": ([{"role": "system", "tools": [{"type": "function", "function": {"name": "f", "x": object()}}]}],
                             "messages[0].tools[0].function"),
    "tool_content_none": ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                           {"role": "tool", "content": None}], "messages[1].content"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_message_names_index_and_field(name):
    messages, where = BAD[name]
    with pytest.raises(MessageError) as info:
        encode_messages(messages, "thinking")
    assert info.value.where == where
    assert str(info.value).startswith(where + ": ")


def test_context_errors_name_the_context():
    with pytest.raises(MessageError, match=r"^context\[0\].role"):
        encode_messages([{"role": "user", "content": "a"}], "chat", context=[{"role": "bot"}])


def test_a_tool_result_may_answer_a_call_in_the_context():
    context = [{"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]
    assert encode_messages([{"role": "tool", "tool_call_id": "a", "content": "R"}], "chat", context=context) == \
        "<｜User｜><tool_result>R</tool_result><｜Assistant｜></think>"


def test_bad_modes_are_value_errors():
    with pytest.raises(ValueError, match="thinking_mode"):
        encode_messages([UserMessage(content="a")], "deep")
    with pytest.raises(ValueError, match="reasoning_effort"):
        encode_messages([UserMessage(content="a")], "thinking", reasoning_effort="low")
    with pytest.raises(MessageError, match="^messages:"):
        encode_messages("hello", "chat")


_JUNK = st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2),
                  st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_CALL = st.fixed_dictionaries({"id": st.one_of(st.none(), st.sampled_from(["a", "b"])), "type": st.just("function"),
                               "function": st.fixed_dictionaries({"name": st.one_of(st.sampled_from(["f", ""]), _JUNK),
                                                                  "arguments": st.one_of(st.sampled_from(['{"x": 1}', "{}", "[1]", "{x"]), _JUNK)})})
_MESSAGE = st.one_of(_JUNK, st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "latest_reminder", "bot"])},
    optional={"content": st.one_of(st.text(max_size=8), _JUNK), "reasoning_content": st.one_of(st.text(max_size=4), _JUNK),
              "tool_calls": st.one_of(st.lists(_CALL, max_size=2), _JUNK), "tool_call_id": st.one_of(st.sampled_from(["a", "b"]), _JUNK),
              "task": st.one_of(st.sampled_from(["query", "action", "title", "nope"]), _JUNK),
              "tools": st.one_of(st.just([{"type": "function", "function": {"name": "f"}}]), _JUNK),
              "response_format": st.one_of(st.just({"type": "json_object"}), st.just({1, 2}), _JUNK)}))


@settings(max_examples=800, deadline=None, database=None, derandomize=True)
@given(messages=st.lists(_MESSAGE, max_size=6), mode=st.sampled_from(["chat", "thinking"]), drop=st.booleans())
def test_any_input_renders_or_raises_message_error(messages, mode, drop):
    try:
        text = encode_messages(messages, mode, drop_thinking=drop)
    except MessageError as err:
        assert err.where.startswith("messages")
    else:
        assert isinstance(text, str)
