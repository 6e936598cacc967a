"""The four official conformance cases (encoding/tests of the DSV4 release), byte for byte,
with the parse checks of the official harness (see MANIFEST.md of the data folder)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from encoding import encode_messages, parse_message_from_completion_text

DATA = Path(__file__).parent / "official"  # byte-exact copies of the release's test data


def load_case(n: int) -> tuple[list[dict], str]:
    data = json.loads((DATA / f"test_input_{n}.json").read_text(encoding="utf-8"))
    if isinstance(data, dict):  # case 1: tools are attached to the system message
        messages = data["messages"]
        messages[0]["tools"] = data["tools"]
    else:
        messages = data
    return messages, (DATA / f"test_output_{n}.txt").read_bytes().decode("utf-8")


@pytest.mark.parametrize("case, mode", [(1, "thinking"), (2, "thinking"), (3, "thinking"), (4, "chat")])
def test_official_case_byte_exact(case, mode):
    messages, expected = load_case(case)
    assert encode_messages(messages, thinking_mode=mode) == expected


def _after(text: str, marker: str, last: bool = False) -> str:
    at = text.rindex(marker) if last else text.index(marker)
    return text[at + len(marker):]


def test_case1_turns_parse_back():
    _, text = load_case(1)
    first = _after(text, "<｜Assistant｜><think>")
    first = first[: first.index("<｜User｜>")]
    msg = parse_message_from_completion_text(first, thinking_mode="thinking")
    assert msg["reasoning_content"] == "The user wants to know the weather in Beijing. I should use the get_weather tool."
    assert msg["content"] == ""
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather"]
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"location": "Beijing", "unit": "celsius"}

    last = parse_message_from_completion_text(_after(text, "<｜Assistant｜><think>", last=True), "thinking")
    assert last["reasoning_content"] == "Got the weather data. Let me format a nice response."
    assert "22°C" in last["content"] and last["tool_calls"] == []


def test_case2_drops_earlier_reasoning_and_parses_last_turn():
    _, text = load_case(2)
    assert "The user said hello" not in text
    assert "<｜Assistant｜></think>Hi there!" in text
    last = parse_message_from_completion_text(_after(text, "<｜Assistant｜><think>", last=True), "thinking")
    assert last["reasoning_content"] == "The user asks about the capital of France. It is Paris."
    assert last["content"] == "The capital of France is Paris."


@pytest.mark.parametrize("case, mode", [(1, "thinking"), (3, "thinking"), (4, "chat")])
def test_official_outputs_round_trip_through_the_parser(case, mode):
    """Replace every assistant turn by what the parser reads back from the official output:
    encoding the parsed conversation reproduces the output byte for byte."""
    messages, text = load_case(case)
    segments = text.split("<｜end▁of▁sentence｜>")[:-1]
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(segments) == len(assistants)
    rebuilt = [dict(m) for m in messages]
    opener = "<｜Assistant｜><think>" if mode == "thinking" else "<｜Assistant｜></think>"
    for index, segment in zip(assistants, segments):
        after_action = messages[index - 1].get("task") == "action"
        marker = "<｜action｜>" if after_action else opener
        body = segment[segment.rindex(marker) + len(marker):]
        parsed = parse_message_from_completion_text(body + "<｜end▁of▁sentence｜>", mode)
        rebuilt[index] = {k: v for k, v in messages[index].items() if k not in ("content", "reasoning_content", "tool_calls")}
        rebuilt[index].update(parsed)
    assert encode_messages(rebuilt, thinking_mode=mode) == text
