"""The real loop driven by scripted completions: tools in a LocalSandbox, failures as results, stop rules."""

from __future__ import annotations

import json
import time

import anyio
import pytest

from agent import Agent, AgentConfig, ExitStatus, Observer, ScriptedBackend, completion
from agent.trajectory import (
    EngineCall,
    ExitEvent,
    Notice,
    RunStarted,
    ToolResultEvent,
    read_events,
)
from sandboxes import LocalSandbox
from tools import builtin_tools, tool

pytestmark = pytest.mark.anyio


def make_agent(tmp_path, turns, tools=None, sandbox=True, **config):
    return Agent(
        backend=ScriptedBackend(turns),
        tools=builtin_tools() if tools is None else tools,
        sandbox=LocalSandbox(tmp_path / "ws") if sandbox else None,
        config=AgentConfig(**config),
        output_dir=tmp_path / "runs",
    )


def events_of(result, kind):
    return [e for e in read_events(result.trajectory_path) if isinstance(e, kind)]


async def test_writes_runs_and_reads_files_in_the_sandbox(tmp_path):
    script = "print(sum(range(10)))\n"
    turns = [
        completion("Write the script.", calls=[("write_file", {"path": "sum.py", "content": script})]),
        completion("Run it.", calls=[("bash", {"command": "python3 sum.py > out.txt && echo ran"})]),
        completion("Read the output.", calls=[("read_file", {"path": "out.txt"})]),
        completion("It printed 45.", content="The script prints 45."),
    ]
    result = await make_agent(tmp_path, turns).run("write sum.py, run it, read out.txt")
    assert result.status is ExitStatus.completed and result.exit_code == 0
    assert result.final_answer == "The script prints 45."
    assert (tmp_path / "ws" / "sum.py").read_text() == script
    assert (tmp_path / "ws" / "out.txt").read_text() == "45\n"
    results = events_of(result, ToolResultEvent)
    assert [r.name for r in results] == ["write_file", "bash", "read_file"]
    assert not any(r.is_error for r in results)
    assert "ran" in results[1].content and "45" in results[2].content
    events = read_events(result.trajectory_path)
    assert isinstance(events[0], RunStarted) and isinstance(events[-1], ExitEvent)
    assert events[-1].status == "completed" and events[-1].steps == 4


async def test_each_turn_prefills_only_the_new_tokens(tmp_path):
    turns = [
        completion("One.", calls=[("bash", {"command": "echo one"})]),
        completion("Two.", calls=[("bash", {"command": "echo two"})]),
        completion("Done.", content="one two"),
    ]
    result = await make_agent(tmp_path, turns).run("echo one then two")
    calls = events_of(result, EngineCall)
    started = events_of(result, RunStarted)[0]
    assert calls[0].usage.prefill_new == started.prompt_tokens and calls[0].usage.prefill_reused == 0
    session = started.prompt_tokens
    for previous, call in zip(calls, calls[1:]):
        session += len(previous.token_ids)
        # the whole history is reused; only the tool result turn is new, and it is small
        assert call.usage.prefill_reused == session
        assert 0 < call.usage.prefill_new < 40
        session += call.usage.prefill_new
    assert result.usage.prefill_new == sum(c.usage.prefill_new for c in calls)


async def test_parallel_safe_calls_run_concurrently_and_results_keep_call_order(tmp_path):
    @tool(parallel_safe=True)
    async def nap(seconds: float, label: str) -> str:
        """Sleep, then answer the label."""
        await anyio.sleep(seconds)
        return label

    turns = [
        completion("Three naps at once.", calls=[("nap", {"seconds": 0.6, "label": f"n{i}"}) for i in range(3)]),
        completion("Done.", content="slept"),
    ]
    started = time.monotonic()
    result = await make_agent(tmp_path, turns, tools=[nap], sandbox=False).run("nap three times")
    elapsed = time.monotonic() - started
    assert result.status is ExitStatus.completed
    assert elapsed < 1.5, f"three 0.6 s naps took {elapsed:.2f} s: they did not overlap"
    results = events_of(result, ToolResultEvent)
    assert sorted(r.content for r in results) == ["n0", "n1", "n2"]
    # the model reads them in call order whatever order they finished in
    assert events_of(result, EngineCall)[1].usage.prefill_new > 0


async def test_a_side_effecting_call_waits_for_the_calls_before_it(tmp_path):
    log: list[str] = []

    @tool(parallel_safe=True)
    async def look(label: str) -> str:
        """Read-only probe."""
        log.append(f"start {label}")
        await anyio.sleep(0.3)
        log.append(f"end {label}")
        return label

    @tool
    async def change(label: str) -> str:
        """Side effect."""
        log.append(f"change {label}")
        return label

    turns = [
        completion("Mixed.", calls=[("look", {"label": "a"}), ("change", {"label": "b"}), ("look", {"label": "c"})]),
        completion("Done.", content="ok"),
    ]
    result = await make_agent(tmp_path, turns, tools=[look, change], sandbox=False).run("mix")
    assert result.status is ExitStatus.completed
    assert log.index("end a") < log.index("change b") < log.index("start c")


async def test_every_failure_goes_back_to_the_model(tmp_path):
    @tool(timeout_s=0.3)
    async def slow() -> str:
        """Takes too long."""
        await anyio.sleep(10)
        return "never"

    @tool
    def boom(x: int) -> str:
        """Raises."""
        raise RuntimeError(f"kaboom {x}")

    bad_json = completion("Bad JSON.") + (  # a string="false" value that is not JSON
        '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="boom">\n'
        '<｜DSML｜parameter name="x" string="false">{not json</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
    )
    turns = [
        completion(
            "Try things.", calls=[("slow", {}), ("boom", {"x": 1}), ("missing_tool", {}), ("boom", {"x": "nan"})]
        ),
        bad_json,
        completion("Recovered.", content="done despite errors"),
    ]
    started = time.monotonic()
    result = await make_agent(tmp_path, turns, tools=[slow, boom], sandbox=False).run("break things")
    assert time.monotonic() - started < 5
    assert result.status is ExitStatus.completed and result.final_answer == "done despite errors"
    kinds = [(r.name, r.error_kind) for r in events_of(result, ToolResultEvent)]
    assert kinds == [
        ("slow", "timeout"),
        ("boom", "exception"),
        ("missing_tool", "unknown_tool"),
        ("boom", "bad_arguments"),
        ("boom", "malformed"),
    ]
    boom_result = events_of(result, ToolResultEvent)[1]
    assert "kaboom 1" in boom_result.content


async def test_a_default_timeout_covers_tools_without_their_own(tmp_path):
    @tool
    async def hang() -> str:
        """Never returns."""
        await anyio.sleep(30)
        return "never"

    turns = [completion("Hang.", calls=[("hang", {})]), completion("Ok.", content="gave up")]
    result = await make_agent(tmp_path, turns, tools=[hang], sandbox=False, tool_timeout_s=0.3).run("hang")
    assert result.status is ExitStatus.completed
    assert events_of(result, ToolResultEvent)[0].error_kind == "timeout"


async def test_consecutive_format_errors_stop_the_run(tmp_path):
    turns = [completion("Nothing to say.")] * 5  # no call, no answer: an empty turn each time
    result = await make_agent(tmp_path, turns, sandbox=False, tools=[], max_format_errors=3).run("say nothing")
    assert result.status is ExitStatus.format_error and result.exit_code == 6
    assert result.steps == 3
    notices = events_of(result, Notice)
    assert [n.kind for n in notices] == ["empty_turn"] * 3


async def test_a_good_turn_resets_the_format_error_count(tmp_path):
    turns = [
        completion("Hmm."),
        completion("Hmm."),
        completion("Act.", calls=[("bash", {"command": "true"})]),
        completion("Hmm."),
        completion("Hmm."),
        completion("Ok.", content="fine"),
    ]
    result = await make_agent(tmp_path, turns, max_format_errors=3).run("keep going")
    assert result.status is ExitStatus.completed and result.steps == 6


async def test_repeated_identical_calls_count_as_stuck(tmp_path):
    same = completion("Again.", calls=[("bash", {"command": "echo same"})])
    result = await make_agent(tmp_path, [same] * 5, stuck_repeats=3).run("loop")
    assert result.status is ExitStatus.stuck and result.exit_code == 7 and result.steps == 3


async def test_step_budget(tmp_path):
    turns = [completion(f"Step {i}.", calls=[("bash", {"command": f"echo {i}"})]) for i in range(5)]
    result = await make_agent(tmp_path, turns, max_steps=2).run("count")
    assert result.status is ExitStatus.max_steps and result.exit_code == 3 and result.steps == 2


async def test_token_budget_counts_prefill_and_decode(tmp_path):
    turns = [completion("x " * 50, calls=[("bash", {"command": "echo hi"})])] * 3
    agent = make_agent(tmp_path, turns, max_tokens=700)
    result = await agent.run("spend tokens")
    assert result.status is ExitStatus.max_tokens and result.exit_code == 4
    assert result.usage.processed >= 700 - 1
    exit_event = events_of(result, ExitEvent)[0]
    assert exit_event.usage.prefill_new == result.usage.prefill_new


async def test_a_turn_cut_at_the_turn_cap_is_reported_to_the_model(tmp_path):
    long = completion("word " * 200, calls=[("bash", {"command": "echo x"})])
    turns = [long, completion("Short now.", content="ok")]
    result = await make_agent(tmp_path, turns, max_turn_tokens=50).run("think long")
    assert result.status is ExitStatus.completed
    first = events_of(result, EngineCall)[0]
    assert first.stop_reason == "max_tokens" and len(first.token_ids) == 50
    assert [n.kind for n in events_of(result, Notice)] == ["truncated"]
    # the cut-off turn gets its EOS prepended to the next prefill: the session stays well formed
    assert events_of(result, EngineCall)[1].usage.prefill_new > 0


async def test_wall_clock_budget_stops_decoding(tmp_path):
    agent = Agent(
        backend=ScriptedBackend([completion("slow " * 400, content="late")], token_delay_s=0.01),
        tools=[],
        config=AgentConfig(max_wall_s=0.5),
        output_dir=tmp_path / "runs",
    )
    started = time.monotonic()
    result = await agent.run("be slow")
    assert result.status is ExitStatus.timeout and result.exit_code == 5
    assert time.monotonic() - started < 2


async def test_cancel_stops_decoding_at_once_and_closes_the_sandbox(tmp_path):
    sandbox = LocalSandbox(tmp_path / "ws")
    agent = Agent(
        backend=ScriptedBackend([completion("slow " * 1000, content="late")], token_delay_s=0.01),
        tools=builtin_tools(),
        sandbox=sandbox,
        output_dir=tmp_path / "runs",
    )
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: anyio.sleep(0.3))

        async def run():
            group.result = await agent.run("be slow")

        group.start_soon(run)
        await anyio.sleep(0.3)
        cancelled_at = time.monotonic()
        agent.cancel()
    assert time.monotonic() - cancelled_at < 1
    result = group.result
    assert result.status is ExitStatus.interrupted and result.exit_code == 130
    assert sandbox._state_dir is None  # closed
    kinds = [e.event for e in read_events(result.trajectory_path)]
    assert kinds[-1] == "exit" and "sandbox_event" in kinds


async def test_approval_mode_denies_and_the_model_hears_it(tmp_path):
    class Deny(Observer):
        asked: list[str] = []

        async def confirm(self, call):
            self.asked.append(call.name)
            return call.name != "bash"

    observer = Deny()
    turns = [
        completion(
            "Run.",
            calls=[("bash", {"command": "touch should_not_exist"}), ("write_file", {"path": "ok.txt", "content": "y"})],
        ),
        completion("Fine.", content="denied"),
    ]
    agent = Agent(
        backend=ScriptedBackend(turns),
        tools=builtin_tools(),
        sandbox=LocalSandbox(tmp_path / "ws"),
        config=AgentConfig(approval="confirm"),
        output_dir=tmp_path / "runs",
        observer=observer,
    )
    result = await agent.run("try")
    assert observer.asked == ["bash", "write_file"]
    assert not (tmp_path / "ws" / "should_not_exist").exists()
    assert (tmp_path / "ws" / "ok.txt").read_text() == "y"
    assert [r.error_kind for r in events_of(result, ToolResultEvent)] == ["denied", None]


async def test_tools_render_in_a_fixed_order_whatever_order_they_are_given(tmp_path):
    tools = builtin_tools()
    a = await make_agent(tmp_path / "a", [completion("x", content="y")], tools=tools).run("t")
    b = await make_agent(tmp_path / "b", [completion("x", content="y")], tools=list(reversed(tools))).run("t")
    schemas_a = events_of(a, RunStarted)[0].tools
    assert schemas_a == events_of(b, RunStarted)[0].tools
    assert [s["function"]["name"] for s in schemas_a] == sorted(t.name for t in tools)


async def test_script_exhaustion_is_an_error_with_a_clear_message(tmp_path):
    result = await make_agent(tmp_path, [completion("Go.", calls=[("bash", {"command": "true"})])]).run("go")
    assert result.status is ExitStatus.error and result.exit_code == 1
    assert "script holds 1 completions" in result.message


async def test_bad_settings_are_rejected_before_running(tmp_path):
    with pytest.raises(ValueError, match="effort"):
        Agent(backend=ScriptedBackend([]), effort="extreme", output_dir=tmp_path)
    with pytest.raises(ValueError, match="task is empty"):
        await make_agent(tmp_path, []).run("  ")
    with pytest.raises(TypeError, match="list of completion"):
        ScriptedBackend("one string")
    assert json.loads(AgentConfig().model_dump_json())["effort"] == "max"
