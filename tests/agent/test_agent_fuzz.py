"""Whatever the model writes, the loop ends with a stop status and a readable trajectory, never a crash."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent import Agent, AgentConfig, ExitStatus, ScriptedBackend, completion
from agent.trajectory import read_events
from encoding import StreamParser, ToolCallComplete
from tools import tool

SPECIALS = [
    "</think>",
    "<think>",
    "<｜end▁of▁sentence｜>",
    "<｜DSML｜tool_calls>",
    "</｜DSML｜tool_calls>",
    '<｜DSML｜invoke name="echo">',
    "</｜DSML｜invoke>",
    '<｜DSML｜parameter name="text" string="true">',
    '<｜DSML｜parameter name="n" string="false">',
    "</｜DSML｜parameter>",
    "\n\n",
    "{",
    '"',
    "<｜User｜>",
]


@tool(parallel_safe=True)
def echo(text: str = "", n: int = 0) -> str:
    """Echo."""
    return f"{text}{n}"


VALID = completion("Echo twice.", calls=[("echo", {"text": "a"}), ("echo", {"n": 3})])


@st.composite
def mangled(draw) -> str:
    text = VALID
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["cut", "insert", "delete"]))
        at = draw(st.integers(0, len(text)))
        if op == "cut":
            text = text[:at]
        elif op == "insert":
            text = text[:at] + draw(st.sampled_from(SPECIALS) | st.text(max_size=8)) + text[at:]
        else:
            text = text[:at] + text[at + draw(st.integers(1, 20)) :]
    return text


def call_names(text: str) -> list[str]:
    parser = StreamParser("thinking", tool_names=["echo"])
    events = parser.feed(text) + parser.close()
    return [e.name for e in events if isinstance(e, ToolCallComplete)]


def run_turns(tmp_path, first, second):
    agent = Agent(
        backend=ScriptedBackend([first, second, completion("Fine.", content="done")]),
        tools=[echo],
        config=AgentConfig(max_format_errors=2, max_turn_tokens=400),
        output_dir=tmp_path,
    )
    return anyio.run(agent.run, "echo things")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=mangled(), second=mangled())
def test_mangled_completions_never_crash_the_loop(tmp_path, first, second):
    assume(all(call_names(first)) and all(call_names(second)))  # see the xfail below
    result = run_turns(tmp_path, first, second)
    assert result.status in (ExitStatus.completed, ExitStatus.format_error, ExitStatus.stuck), result.message
    events = read_events(result.trajectory_path)
    assert events[0].event == "run_started" and events[-1].event == "exit"


def test_a_call_with_a_garbled_name_is_survived(tmp_path):
    garbled = VALID.replace('<｜DSML｜invoke name="echo">', '<｜DSML｜invoke</｜DSML｜tool_calls> name="echo">', 1)
    assert "" in call_names(garbled)
    result = run_turns(tmp_path, garbled, completion("Fine.", content="done"))
    assert result.status is ExitStatus.completed, result.message
