"""Goldens for every rendering feature the four official cases leave out.

Each expected string was derived by hand from the official `encoding_dsv4.py` (render_message,
merge_tool_messages, sort_tool_results_by_call_order, _drop_thinking_messages, encode_messages)
and docs/dsv4-reference.md §5.2, and is written here with the raw token spellings (not this
package's constants). The tools block is cut from official output 1, so its text is upstream's.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from encoding import encode_messages

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)
RF = "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"

_OUT1 = (Path(__file__).parent / "official" / "test_output_1.txt").read_text(encoding="utf-8")
_TOOLS_HEAD = _OUT1[_OUT1.index("## Tools") : _OUT1.index("### Available Tool Schemas\n\n") + len("### Available Tool Schemas\n\n")]
_TOOLS_TAIL = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"

RUN = {"type": "function", "function": {"name": "run", "description": "Run a command", "parameters": {
    "type": "object", "properties": {"cmd": {"type": "string"}, "timeout": {"type": "number", "default": None}}}}}


def tools_block(*tools: dict) -> str:
    return "\n\n" + _TOOLS_HEAD + "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools) + _TOOLS_TAIL


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def param(name, is_str, value):
    return f'<｜DSML｜parameter name="{name}" string="{is_str}">{value}</｜DSML｜parameter>'


GOLDENS = {
    "effort_max_thinking": (
        dict(messages=[{"role": "system", "content": "SYS"}, {"role": "user", "content": "hi"}],
             thinking_mode="thinking", reasoning_effort="max"),
        BOS + EFFORT_MAX + "SYS<｜User｜>hi<｜Assistant｜><think>",
    ),
    "effort_max_before_a_first_user_turn": (
        dict(messages=[{"role": "user", "content": "hi"}], thinking_mode="thinking", reasoning_effort="max"),
        BOS + EFFORT_MAX + "<｜User｜>hi<｜Assistant｜><think>",
    ),
    "effort_max_ignored_in_chat_mode": (
        dict(messages=[{"role": "system", "content": "SYS"}, {"role": "user", "content": "hi"}],
             thinking_mode="chat", reasoning_effort="max"),
        BOS + "SYS<｜User｜>hi<｜Assistant｜></think>",
    ),
    "effort_high_is_default_thinking": (
        dict(messages=[{"role": "user", "content": "hi"}], thinking_mode="thinking", reasoning_effort="high"),
        BOS + "<｜User｜>hi<｜Assistant｜><think>",
    ),
    "no_bos": (
        dict(messages=[{"role": "user", "content": "hi"}], thinking_mode="chat", add_default_bos_token=False),
        "<｜User｜>hi<｜Assistant｜></think>",
    ),
    "response_format_on_system": (
        dict(messages=[{"role": "system", "content": "SYS", "response_format": {"type": "json_schema", "name": "整数"}},
                       {"role": "user", "content": "q"}], thinking_mode="chat"),
        BOS + "SYS" + RF + '{"type": "json_schema", "name": "整数"}<｜User｜>q<｜Assistant｜></think>',
    ),
    "tools_then_response_format": (
        dict(messages=[{"role": "system", "content": "SYS", "tools": [RUN], "response_format": {"a": 1}},
                       {"role": "user", "content": "q"}], thinking_mode="thinking"),
        BOS + "SYS" + tools_block(RUN) + RF + '{"a": 1}<｜User｜>q<｜Assistant｜><think>',
    ),
    "developer_with_response_format": (
        dict(messages=[{"role": "developer", "content": "D", "response_format": {"b": [1, 2]}}], thinking_mode="chat"),
        BOS + "<｜User｜>D" + RF + '{"b": [1, 2]}<｜Assistant｜></think>',
    ),
    "chat_mode_tools_all_json_types": (
        dict(messages=[
            {"role": "system", "content": "S", "tools": [RUN]},
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": "ok", "tool_calls": [call("c1", "run", {
                "cmd": "ls", "n": 3, "force": True, "tags": ["x", "y"], "opt": {"k": "ü"}, "none": None, "ratio": 0.5})]},
            {"role": "tool", "tool_call_id": "c1", "content": "R"},
            {"role": "assistant", "content": "done"},
        ], thinking_mode="chat"),
        BOS + "S" + tools_block(RUN) + "<｜User｜>go<｜Assistant｜></think>ok\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="run">\n'
        + "\n".join([param("cmd", "true", "ls"), param("n", "false", "3"), param("force", "false", "true"),
                     param("tags", "false", '["x", "y"]'), param("opt", "false", '{"k": "ü"}'),
                     param("none", "false", "null"), param("ratio", "false", "0.5")])
        + "\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS
        + "<｜User｜><tool_result>R</tool_result><｜Assistant｜></think>done" + EOS,
    ),
    "two_calls_empty_arguments_and_results_reordered": (
        dict(messages=[
            {"role": "system", "content": "S", "tools": [RUN]},
            {"role": "user", "content": "go"},
            {"role": "assistant", "reasoning_content": "r", "tool_calls": [
                call("a", "run", {"cmd": "1"}), call("b", "run", {}), call("c", "run", {"cmd": "3"})]},
            {"role": "tool", "tool_call_id": "c", "content": "Rc"},
            {"role": "tool", "tool_call_id": "a", "content": "Ra"},
            {"role": "tool", "tool_call_id": "b", "content": "Rb"},
            {"role": "user", "content": "more"},
        ], thinking_mode="thinking"),
        BOS + "S" + tools_block(RUN) + "<｜User｜>go<｜Assistant｜><think>r</think>\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="run">\n' + param("cmd", "true", "1") + "\n</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="run">\n\n</｜DSML｜invoke>\n'
        '<｜DSML｜invoke name="run">\n' + param("cmd", "true", "3") + "\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS
        + "<｜User｜><tool_result>Ra</tool_result>\n\n<tool_result>Rb</tool_result>\n\n<tool_result>Rc</tool_result>"
        "\n\nmore<｜Assistant｜><think>",
    ),
    "tool_result_content_parts": (
        dict(messages=[
            {"role": "assistant", "content": "", "tool_calls": [call("x", "run", {"cmd": "a"})]},
            {"role": "tool", "tool_call_id": "x", "content": [
                {"type": "text", "text": "p1"}, {"type": "image_url", "image_url": {"url": "u"}}, {"type": "text", "text": "p2"}]},
        ], thinking_mode="chat"),
        BOS + '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="run">\n' + param("cmd", "true", "a")
        + "\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS
        + "<｜User｜><tool_result>p1\n\n[Unsupported image_url]\n\np2</tool_result><｜Assistant｜></think>",
    ),
    "consecutive_users_share_a_turn": (
        dict(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], thinking_mode="thinking"),
        BOS + "<｜User｜>a\n\nb<｜Assistant｜><think>",
    ),
    "a_task_user_is_not_joined_and_gets_no_transition_before_a_user": (
        dict(messages=[{"role": "user", "content": "a", "task": "query"}, {"role": "user", "content": "b"}],
             thinking_mode="thinking"),
        BOS + "<｜User｜>a<｜User｜>b<｜Assistant｜><think>",
    ),
    "task_query": (
        dict(messages=[{"role": "user", "content": "q", "task": "query"}], thinking_mode="thinking"),
        BOS + "<｜User｜>q<｜query｜>",
    ),
    "task_query_answered_without_thinking": (
        dict(messages=[{"role": "user", "content": "q", "task": "query"}, {"role": "assistant", "content": "kw"}],
             thinking_mode="thinking"),
        BOS + "<｜User｜>q<｜query｜>kw" + EOS,
    ),
    "task_action_thinking_mode": (
        dict(messages=[{"role": "user", "content": "q", "task": "action"}], thinking_mode="thinking"),
        BOS + "<｜User｜>q<｜Assistant｜><think><｜action｜>",
    ),
    "task_title_on_assistant": (
        dict(messages=[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi!", "task": "title"}],
             thinking_mode="chat"),
        BOS + "<｜User｜>hello<｜Assistant｜></think>Hi!" + EOS + "<｜title｜>",
    ),
    "task_read_url": (
        dict(messages=[{"role": "user", "content": "<｜extracted_url｜>https://x.org", "task": "read_url"}],
             thinking_mode="chat"),
        BOS + "<｜User｜><｜extracted_url｜>https://x.org<｜read_url｜>",
    ),
    "tasks_authority_and_domain": (
        dict(messages=[{"role": "user", "content": "a", "task": "authority"}, {"role": "assistant", "content": "1"},
                       {"role": "user", "content": "d", "task": "domain"}], thinking_mode="chat"),
        BOS + "<｜User｜>a<｜authority｜>1" + EOS + "<｜User｜>d<｜domain｜>",
    ),
    "latest_reminder_after_the_user_turn": (
        dict(messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "u"},
                       {"role": "latest_reminder", "content": "R"}], thinking_mode="thinking"),
        BOS + "S<｜User｜>u<｜Assistant｜><think><｜latest_reminder｜>R",
    ),
    "drop_removes_earlier_developer_turns": (
        dict(messages=[{"role": "system", "content": "S"}, {"role": "developer", "content": "D"},
                       {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
                       {"role": "user", "content": "u2"}], thinking_mode="thinking"),
        BOS + "Sa1" + EOS + "<｜User｜>u2<｜Assistant｜><think>",
    ),
    "drop_thinking_off_keeps_every_turn": (
        dict(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "reasoning_content": "r1", "content": "b"},
                       {"role": "user", "content": "c"}], thinking_mode="thinking", drop_thinking=False),
        BOS + "<｜User｜>a<｜Assistant｜><think>r1</think>b" + EOS + "<｜User｜>c<｜Assistant｜><think>",
    ),
    "empty_assistant_after_last_user": (
        dict(messages=[{"role": "user", "content": "a"}, {"role": "assistant"}], thinking_mode="thinking"),
        BOS + "<｜User｜>a<｜Assistant｜><think></think>" + EOS,
    ),
    "assistant_prefill_without_eos": (
        dict(messages=[{"role": "user", "content": "q"},
                       {"role": "assistant", "reasoning_content": "r", "content": "partial", "wo_eos": True}],
             thinking_mode="thinking"),
        BOS + "<｜User｜>q<｜Assistant｜><think>r</think>partial",
    ),
    "context_renders_only_new_turns": (
        dict(context=[{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                      {"role": "assistant", "reasoning_content": "r1", "content": "b"}],
             messages=[{"role": "user", "content": "c"}], thinking_mode="thinking"),
        "<｜User｜>c<｜Assistant｜><think>",
    ),
    "context_then_the_completion": (
        dict(context=[{"role": "user", "content": "a"}],
             messages=[{"role": "assistant", "reasoning_content": "r", "content": "b"}], thinking_mode="thinking"),
        "r</think>b" + EOS,
    ),
    "context_tool_results_follow_context_call_order": (
        dict(context=[{"role": "user", "content": "go"},
                      {"role": "assistant", "content": "", "tool_calls": [call("p", "run", {}), call("q", "run", {})]}],
             messages=[{"role": "tool", "tool_call_id": "q", "content": "Q"}, {"role": "tool", "tool_call_id": "p", "content": "P"}],
             thinking_mode="chat"),
        "<｜User｜><tool_result>P</tool_result>\n\n<tool_result>Q</tool_result><｜Assistant｜></think>",
    ),
    # The worked strings of docs/dsv4-reference.md §5.2, produced there by running the official encoder.
    "reference_multi_turn_thinking_without_tools": (
        dict(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "reasoning_content": "r", "content": "b"},
                       {"role": "user", "content": "c"}], thinking_mode="thinking"),
        BOS + "<｜User｜>a<｜Assistant｜></think>b" + EOS + "<｜User｜>c<｜Assistant｜><think>",
    ),
    "reference_tool_results_out_of_order": (
        dict(messages=[{"role": "user", "content": "go"},
                       {"role": "assistant", "content": "", "tool_calls": [call("1", "run", {}), call("2", "run", {})]},
                       {"role": "tool", "tool_call_id": "2", "content": "R2"}, {"role": "tool", "tool_call_id": "1", "content": "R1"},
                       {"role": "user", "content": "more"}], thinking_mode="chat"),
        BOS + "<｜User｜>go<｜Assistant｜></think>\n\n<｜DSML｜tool_calls>\n" + '<｜DSML｜invoke name="run">\n\n</｜DSML｜invoke>\n' * 2
        + "</｜DSML｜tool_calls>" + EOS
        + "<｜User｜><tool_result>R1</tool_result>\n\n<tool_result>R2</tool_result>\n\nmore<｜Assistant｜></think>",
    ),
    # Upstream counts the turns to render after dropping; a dropped developer turn in the
    # context shifts that count, so nothing is rendered. Pinned as upstream does it.
    "context_with_a_dropped_developer_turn": (
        dict(context=[{"role": "system", "content": "S"}, {"role": "developer", "content": "D"},
                      {"role": "assistant", "content": "x"}],
             messages=[{"role": "user", "content": "u"}], thinking_mode="thinking"),
        "",
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_golden(name):
    kwargs, expected = GOLDENS[name]
    kwargs = dict(kwargs)
    messages = kwargs.pop("messages")
    thinking_mode = kwargs.pop("thinking_mode")
    assert encode_messages(messages, thinking_mode, **kwargs) == expected


def test_goldens_cover_the_features_the_official_cases_miss():
    names = " ".join(GOLDENS)
    for feature in ("effort_max", "response_format", "context", "without_eos", "task_query", "task_title",
                    "task_read_url", "chat_mode_tools", "reordered", "drop_thinking_off"):
        assert feature in names, feature


def test_encoding_does_not_modify_the_messages():
    kwargs, _ = GOLDENS["two_calls_empty_arguments_and_results_reordered"]
    before = json.dumps(kwargs["messages"])
    encode_messages(kwargs["messages"], "thinking")
    assert json.dumps(kwargs["messages"]) == before
