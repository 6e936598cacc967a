"""`dsv4-agent mcp` driven as a host would: a server process over stdio and over streamable HTTP
(loopback), with the mcp SDK's client and with a third-party client (the MCP Inspector's CLI), on a
scripted backend. Runs that must overlap meet at a rendezvous folder (each waits for the other's
file), so no test depends on timing."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from agent import completion
from agent.history import History
from agent.trajectory import EngineCall, ExitEvent, RunResumed, SandboxEvent, ToolResultEvent, UserMessage, read_events
from encoding import AppendOnlyEncoder, Tokenizer

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
INSPECTOR = ROOT / ".tools" / "node_modules" / ".bin" / "mcp-inspector"
ANSWERS = [completion("Easy.", content="first answer"), completion("Again.", content="second answer"),
           completion("Once more.", content="third answer")]


def write_script(folder: Path, turns: list[str]) -> Path:
    path = folder / "script.json"
    path.write_text(json.dumps(turns))
    return path


def server_command(script: Path, out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "agent", "mcp", "--scripted", str(script), "-o", str(out), *flags]


def server_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def stdio_client(script: Path, out: Path, *flags: str) -> Client:
    command, *args = server_command(script, out, *flags)
    return Client(StdioServerParameters(command=command, args=args, env=server_env(), cwd=str(out.parent)))


def rendezvous(folder: Path) -> str:
    """A bash command that leaves a file in `folder`, then waits (up to 60 s) for a second one."""
    return (f"touch {folder}/$$; for i in $(seq 1200); do [ $(ls {folder} | wc -l) -ge 2 ] && echo met && exit 0; "
            "sleep 0.05; done; echo alone; exit 1")


def wait_for(folder: Path, name: str) -> str:
    """A bash command that waits (up to 60 s) for `folder/name`."""
    return f"for i in $(seq 1200); do [ -f {folder}/{name} ] && echo released && exit 0; sleep 0.05; done; exit 1"


def appended_ids(trajectory: Path, after_step: int, message: str) -> list[int]:
    """The ids of a reply's message after `after_step`, rendered apart from the server."""
    events = read_events(trajectory)
    history = History.from_events([e for e in events if not (isinstance(e, EngineCall) and e.step > after_step)])
    history.messages = [m for m in history.messages if m.step < after_step]
    effort = events[0].spec["config"]["effort"]
    encoder = AppendOnlyEncoder(Tokenizer.default(), thinking_mode="chat" if effort == "none" else "thinking",
                                reasoning_effort="max" if effort == "max" else None)
    history.replay_into(encoder)
    return encoder.append([{"role": "user", "content": message}])


async def call(client: Client, tool: str, arguments: dict, progress: list | None = None):
    async def on_progress(value, total, message):
        progress.append((value, message))

    return await client.call_tool(tool, arguments, progress_callback=on_progress if progress is not None else None)


# ---- stdio -------------------------------------------------------------------------------------
async def test_the_three_tools_are_listed_with_their_schemas(tmp_path):
    async with stdio_client(write_script(tmp_path, ANSWERS), tmp_path / "runs", "--sandbox", "none") as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {"run", "reply", "inspect"}
    run = tools["run"].input_schema
    assert run["required"] == ["task"] and set(run["properties"]) == {"task", "effort", "max_steps"}
    assert "max" in json.dumps(run["properties"]["effort"])
    assert set(tools["reply"].input_schema["required"]) == {"run_id", "message"}
    assert tools["inspect"].input_schema["required"] == ["run_id"]
    for name in ("run", "reply"):
        assert set(tools[name].output_schema["properties"]) == {
            "run_id", "status", "exit_code", "final_answer", "steps", "trajectory_path"}
    assert tools["inspect"].annotations.read_only_hint


async def test_run_then_reply_prefills_only_the_message_and_reports_progress(tmp_path):
    turns = [completion("Write it.", calls=[("write_file", {"path": "a.txt", "content": "A"})]),
             completion("Done.", content="a.txt holds A"), completion("Reply.", content="it holds the letter A")]
    progress: list = []
    async with stdio_client(write_script(tmp_path, turns), tmp_path / "runs", "--sandbox", "local", "--yolo") as client:
        first = await call(client, "run", {"task": "write A to a.txt", "effort": "high"}, progress)
        run_id = first.structured_content["run_id"]
        second = await call(client, "reply", {"run_id": run_id, "message": "what is in a.txt?"})
        summary = await call(client, "inspect", {"run_id": run_id})

    assert not first.is_error and first.content[0].text == "a.txt holds A" and run_id in first.content[1].text
    assert first.structured_content | {"trajectory_path": None} == {
        "run_id": run_id, "status": "completed", "exit_code": 0, "final_answer": "a.txt holds A", "steps": 2,
        "trajectory_path": None}
    assert second.structured_content["final_answer"] == "it holds the letter A"
    assert second.structured_content["steps"] == 3

    messages = [m for _, m in progress]
    assert [v for v, _ in progress] == list(range(1, len(progress) + 1))
    assert "step 1/50" in messages and "step 1: calling write_file" in messages
    assert any("tokens computed" in m for m in messages)

    trajectory = Path(second.structured_content["trajectory_path"])
    events = read_events(trajectory)
    assert events[0].spec["config"]["effort"] == "high"
    calls = [e for e in events if isinstance(e, EngineCall)]
    reply_step = calls[2].usage
    assert reply_step.prefill_new == len(appended_ids(trajectory, 2, "what is in a.txt?")) < 30
    assert reply_step.prefill_reused == calls[1].usage.prefill_reused + calls[1].usage.prefill_new + len(
        calls[1].token_ids)  # the whole conversation, still resident
    assert not [e for e in events if isinstance(e, RunResumed)]
    assert (tmp_path / "runs" / run_id / "workspace" / "a.txt").read_text() == "A"

    assert summary.structured_content["status"] == "completed"
    assert summary.structured_content["replies"] == [{"after_step": 2, "text": "what is in a.txt?"}]
    assert "reply: what is in a.txt?" in summary.content[0].text


async def test_reply_after_a_restart_and_to_a_run_of_the_cli(tmp_path):
    script, out = write_script(tmp_path, ANSWERS), tmp_path / "runs"
    await anyio.run_process([sys.executable, "-m", "agent", "run", "say something", "--scripted", str(script),
                             "--sandbox", "none", "-o", str(out)], env=server_env(), cwd=tmp_path)
    (trajectory,) = out.glob("*/trajectory.jsonl")
    run_id = trajectory.parent.name

    async with stdio_client(script, out, "--sandbox", "none") as client:
        second = await call(client, "reply", {"run_id": run_id, "message": "and again?"})
    async with stdio_client(script, out, "--sandbox", "none") as client:  # a new server process
        third = await call(client, "reply", {"run_id": run_id, "message": "once more?"})
    assert [r.structured_content["final_answer"] for r in (second, third)] == ["second answer", "third answer"]

    events = read_events(trajectory)
    calls = [e for e in events if isinstance(e, EngineCall)]
    resumes = [e.reprefill_tokens for e in events if isinstance(e, RunResumed)]
    # each process rebuilt the recorded conversation once (no KV session to load on a scripted backend) ...
    assert resumes == [calls[1].usage.prefill_reused, calls[2].usage.prefill_reused]
    # ... and prefilled only the message after it
    assert calls[2].usage.prefill_new == len(appended_ids(trajectory, 2, "once more?"))
    assert [(m.step, m.text) for m in events if isinstance(m, UserMessage)] == [(1, "and again?"), (2, "once more?")]


async def test_two_runs_at_once(tmp_path):
    meet = tmp_path / "meet"
    meet.mkdir()
    turns = [completion("Meet.", calls=[("bash", {"command": rendezvous(meet)})]), completion("Met.", content="met")]
    async with stdio_client(write_script(tmp_path, turns), tmp_path / "runs", "--sandbox", "local", "--yolo") as client:
        results = {}

        async def one(name):
            results[name] = await call(client, "run", {"task": f"meet the other run ({name})"})

        async with anyio.create_task_group() as group:
            group.start_soon(one, "a")
            group.start_soon(one, "b")
    ids = {r.structured_content["run_id"] for r in results.values()}
    assert len(ids) == 2 and all(r.structured_content["final_answer"] == "met" for r in results.values())
    for run_id in ids:
        (result,) = [e for e in read_events(tmp_path / "runs" / run_id / "trajectory.jsonl")
                     if isinstance(e, ToolResultEvent)]
        assert not result.is_error and "met" in result.content  # each waited for the other: they overlapped
    assert len(list(meet.iterdir())) == 2  # one shell each: its own sandbox


async def test_cancelling_a_call_interrupts_its_run_and_closes_the_sandbox(tmp_path):
    turns = [completion("Wait.", calls=[("bash", {"command": "sleep 60"})]), completion("Done.", content="done")]
    async with stdio_client(write_script(tmp_path, turns), tmp_path / "runs", "--sandbox", "local", "--yolo") as client:
        calling = anyio.Event()

        async def on_progress(value, total, message):
            if "calling bash" in message:
                calling.set()

        started = time.monotonic()
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: client.call_tool("run", {"task": "wait"}, progress_callback=on_progress))
            await calling.wait()
            group.cancel_scope.cancel()  # the client sends notifications/cancelled
        (trajectory,) = (tmp_path / "runs").glob("*/trajectory.jsonl")
        run_id = trajectory.parent.name
        with anyio.fail_after(30):
            while (summary := await call(client, "inspect", {"run_id": run_id})).structured_content["status"] \
                    == "running":
                await anyio.sleep(0.1)
        assert time.monotonic() - started < 45  # not the 60 s of the command
        assert summary.structured_content["status"] == "interrupted"
    events = read_events(trajectory)
    assert isinstance(events[-1], ExitEvent) and events[-1].status == "interrupted"
    assert [e.kind for e in events if isinstance(e, SandboxEvent)] == ["started", "stopped"]


async def test_failures_are_tool_errors_and_the_server_keeps_serving(tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    turns = [completion("Wait.", calls=[("bash", {"command": wait_for(gate, "open")})]),
             completion("Done.", content="done")]
    async with stdio_client(write_script(tmp_path, turns), tmp_path / "runs", "--sandbox", "local", "--yolo") as client:
        for tool, arguments, expected in [
            ("run", {}, "task"),
            ("run", {"task": ""}, "at least 1 character"),
            ("run", {"task": "x", "effort": "extreme"}, "effort"),
            ("run", {"task": "x", "max_steps": 0}, "greater than or equal to 1"),
            ("reply", {"run_id": "20990101-000000-abcdef", "message": "hi"}, "unknown run id"),
            ("reply", {"run_id": "../../etc", "message": "hi"}, "run_id"),
            ("inspect", {"run_id": "nope"}, "unknown run id"),
            ("nope", {}, "nope"),
        ]:
            result = await call(client, tool, arguments)
            assert result.is_error and expected in result.content[0].text, (tool, arguments, result.content)

        calling = anyio.Event()
        box = {}

        async def on_progress(value, total, message):
            if "calling bash" in message:
                calling.set()

        async def run():
            box["result"] = await client.call_tool("run", {"task": "wait"}, progress_callback=on_progress)

        async with anyio.create_task_group() as group:
            group.start_soon(run)
            await calling.wait()
            run_id = next((tmp_path / "runs").glob("*/trajectory.jsonl")).parent.name
            busy = await call(client, "reply", {"run_id": run_id, "message": "hurry"})
            assert busy.is_error and "still working" in busy.content[0].text
            working = await call(client, "inspect", {"run_id": run_id})
            assert working.structured_content["status"] == "running"
            (gate / "open").touch()
        assert box["result"].structured_content["final_answer"] == "done"


# ---- streamable HTTP ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@asynccontextmanager
async def http_server(script: Path, out: Path, *flags: str):
    port = free_port()
    process = subprocess.Popen(server_command(script, out, "--port", str(port), *flags), env=server_env(),
                               cwd=str(out.parent), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read().decode()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not listen"
                await anyio.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(30)


async def test_over_streamable_http(tmp_path):
    progress: list = []
    async with http_server(write_script(tmp_path, ANSWERS), tmp_path / "runs", "--sandbox", "none") as url:
        async with Client(url) as client:
            assert {t.name for t in (await client.list_tools()).tools} == {"run", "reply", "inspect"}
            first = await call(client, "run", {"task": "say something"}, progress)
            run_id = first.structured_content["run_id"]
            second = await call(client, "reply", {"run_id": run_id, "message": "and again?"})
            bad = await call(client, "reply", {"run_id": run_id})
    assert first.structured_content["final_answer"] == "first answer"
    assert second.structured_content["final_answer"] == "second answer"
    assert bad.is_error and "message" in bad.content[0].text
    assert "step 1/50" in [m for _, m in progress]
    calls = [e for e in read_events(Path(second.structured_content["trajectory_path"])) if isinstance(e, EngineCall)]
    assert calls[1].usage.prefill_new == len(
        appended_ids(Path(second.structured_content["trajectory_path"]), 1, "and again?"))


# ---- a third-party client ------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("node") is None or not INSPECTOR.exists(),
                    reason="the MCP Inspector CLI is not installed (scripts/setup.sh installs it into .tools/ "
                           "with npm when Node.js is present)")
def test_the_mcp_inspector_cli_lists_and_calls_the_tools(tmp_path):
    server = server_command(write_script(tmp_path, ANSWERS), tmp_path / "runs", "--sandbox", "none")

    def inspector(*args: str) -> dict:
        done = subprocess.run([str(INSPECTOR), "--cli", *server, *args], env=server_env(), cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)

    listed = inspector("--method", "tools/list")
    assert {t["name"] for t in listed["tools"]} == {"run", "reply", "inspect"}
    ran = inspector("--method", "tools/call", "--tool-name", "run", "--tool-arg", "task=say something")
    assert ran["isError"] is False and ran["content"][0]["text"] == "first answer"
    run_id = ran["structuredContent"]["run_id"]
    replied = inspector("--method", "tools/call", "--tool-name", "reply", "--tool-arg", f"run_id={run_id}",
                        "--tool-arg", "message=and again?")
    assert replied["structuredContent"]["final_answer"] == "second answer"


# ---- several runs on one engine under a KV budget ----------------------------------------------
async def test_idle_sessions_spill_under_the_kv_budget_and_come_back_on_reply(tmp_path):
    from agent.config import AgentConfig
    from agent.mcp_server import AgentRuns
    from agent.spec import BackendSpec, RunSpec, SandboxSpec
    from dsv4 import ModelConfig
    from dsv4.loading.testing import write_random_checkpoint

    cfg = ModelConfig.tiny().model_copy(update={"vocab_size": Tokenizer.default().vocab_size})
    checkpoint = write_random_checkpoint(tmp_path / "ckpt", cfg, seed=5)
    # random weights: each run decodes 4 sampled tokens (seeded), then its step budget stops it
    config = AgentConfig(max_steps=1, max_turn_tokens=4, session_save_max_bytes=0)
    spec = RunSpec(backend=BackendSpec(kind="engine", model=str(checkpoint), device="cpu", seed=0),
                   sandbox=SandboxSpec(kind="none"), config=config)
    runs = AgentRuns(spec, tmp_path / "runs")

    async def report(progress, message):
        pass

    try:
        a = await runs.run("the first task", None, None, report)
        session_a = runs.conversations[a.run_id].agent.backend.session
        engine = session_a.engine
        engine.kv_budget_bytes = engine.memory().resident_bytes * 3 // 2  # one run's session fits, not two
        b = await runs.run("the second task", None, None, report)
        session_b = runs.conversations[b.run_id].agent.backend.session
        assert a.status.value == b.status.value == "max_steps"
        assert session_a.location == "host"  # the engine's scheduler made room with the idle run's session

        replied = await runs.reply(a.run_id, "and now?", report)
        assert replied.steps == 2
        assert session_a.location == "device" and session_b.location == "host"
    finally:
        await runs.aclose()
    events = read_events(replied.trajectory_path)
    assert not [e for e in events if isinstance(e, RunResumed)]  # the same session, back from host memory
    step1, step2 = [e for e in events if isinstance(e, EngineCall)]
    assert step2.usage.prefill_reused == step1.backend_info["session_tokens"] - 1
    assert step2.usage.prefill_new < 40  # the truncation notice and the message, not the history
