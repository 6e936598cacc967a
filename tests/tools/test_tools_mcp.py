"""The MCP client against real server processes: our fixture server (stdio and streamable HTTP) and
the third-party `mcp-server-time` package."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import anyio
import pytest

from tools import Toolset
from tools.mcp import MCPServer, MCPServerDown

FIXTURE = str(Path(__file__).with_name("mcp_fixture_server.py"))


@pytest.fixture
def anyio_backend():
    return "asyncio"


def fixture_stdio(*extra: str, timeout_s: float = 10.0) -> MCPServer:
    return MCPServer.stdio(sys.executable, [FIXTURE, "stdio", *extra], name="fx", timeout_s=timeout_s,
                           start_timeout_s=30)


def running(pid: int) -> bool:
    """True while the process exists and is not a zombie (a killed orphan may wait unreaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


async def wait_gone(*pids: int, within: float = 3.0) -> list[int]:
    """The pids still running after `within` seconds (a SIGKILL lands asynchronously)."""
    deadline = time.monotonic() + within
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        await anyio.sleep(0.02)
    return [p for p in pids if running(p)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_http_fixture(port: int, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, FIXTURE, "http", "--port", str(port), *extra])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the HTTP fixture server did not start")


@pytest.mark.anyio
async def test_stdio_listing_is_paginated_and_tools_map_to_prefixed_names():
    async with fixture_stdio("--page-size", "4", "--tools", "5") as server:
        # 11 fixed + 5 filler tools over pages of 4: only a client that follows cursors sees them all
        assert len(server.tools) == 16
        assert len(await server.list_tools()) == 16
        tools = server.as_tools()
        names = [t.name for t in tools]
        assert names == sorted(names) and "fx__echo" in names and "fx__extra_04" in names
        by_name = {t.name: t for t in tools}
        assert by_name["fx__add"].parameters["required"] == ["a", "b"]
        assert by_name["fx__echo"].parallel_safe and not by_name["fx__crash"].parallel_safe
        toolset = Toolset(tools)
        result = await toolset.invoke("fx__add", {"a": 20, "b": 22})
        assert (result.content, result.is_error) == ("42", False)
        assert result.metadata["mcp_server"] == "fx"


@pytest.mark.anyio
async def test_errors_and_timeouts_come_back_as_tool_errors():
    async with fixture_stdio() as server:
        rejected = await server.call_tool("reject", {})
        assert rejected.is_error and rejected.metadata["mcp_error_code"] == -32602
        assert "JSON-RPC error -32602" in rejected.content and "reject always refuses" in rejected.content
        exploded = await server.call_tool("explode", {})
        assert exploded.is_error and exploded.metadata["mcp_error_code"] == -32603
        soft = await server.call_tool("soft_fail", {})
        assert soft.is_error and soft.content == "soft failure reported by the tool"
        unknown = await server.call_tool("no_such_tool", {})
        assert unknown.is_error and "no_such_tool" in unknown.content
        with anyio.fail_after(5):
            slow = await server.call_tool("sleep", {"seconds": 30}, timeout_s=0.3)
        assert slow.is_error and slow.metadata["timed_out"] and "timed out after 0.3 s" in slow.content
        # a timeout is not a dead connection: the same server keeps answering
        assert (await server.call_tool("echo", {"text": "still here"})).content == "still here"
        assert server.restarts == 0


@pytest.mark.anyio
async def test_requests_run_concurrently_and_a_cancelled_caller_leaves_the_server_usable():
    async with fixture_stdio() as server:
        finished = []

        async def slow_call():
            finished.append(await server.call_tool("sleep", {"seconds": 1.0}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow_call)
            await anyio.sleep(0.1)
            assert (await server.call_tool("echo", {"text": "meanwhile"})).content == "meanwhile"
            assert finished == []  # the echo did not wait behind the sleep
        assert finished[0].content == "slept 1.0"

        with anyio.move_on_after(0.2) as scope:
            await server.call_tool("sleep", {"seconds": 30})
        assert scope.cancelled_caught
        assert (await server.call_tool("add", {"a": 1, "b": 1})).content == "2"


@pytest.mark.anyio
async def test_a_crashed_server_is_reported_and_restarted_once():
    async with fixture_stdio() as server:
        first_pid = server.pid
        crash = await server.call_tool("crash", {})
        assert crash.is_error and crash.metadata["server_lost"]
        assert "exited with code 3" in crash.content and "being restarted" in crash.content
        again = await server.call_tool("echo", {"text": "back"})
        assert (again.content, again.is_error) == ("back", False)
        assert server.restarts == 1 and server.pid != first_pid and not running(first_pid)
        assert len(server.crash_reports) == 1 and "code 3" in server.crash_reports[0]

        second = await server.call_tool("crash", {})
        assert second.is_error and "will not be restarted again" in second.content
        down = await server.call_tool("echo", {"text": "anyone?"})
        assert down.is_error and down.metadata["server_down"] and "is now down" in down.content
        assert server.restarts == 1
        with pytest.raises(MCPServerDown):
            await server.list_tools()


@pytest.mark.anyio
async def test_a_restart_that_fails_marks_the_server_down(tmp_path):
    async with fixture_stdio("--start-once", str(tmp_path / "started")) as server:
        crash = await server.call_tool("crash", {})
        assert crash.is_error and "being restarted" in crash.content
        refused = await server.call_tool("echo", {"text": "x"})
        assert refused.is_error and refused.metadata["server_down"]
        assert "exited with code 4 (stderr: refusing to start twice)" in refused.content
        assert server.restarts == 1 and len(server.crash_reports) == 2


@pytest.mark.anyio
async def test_no_server_process_outlives_the_context():
    async with fixture_stdio() as server:
        server_pid = server.pid
        child_pid = int((await server.call_tool("spawn_child", {})).content)
        assert running(server_pid) and running(child_pid)
    # the server exits on stdin EOF; its child would survive it without the group kill
    assert await wait_gone(server_pid, child_pid) == []


@pytest.mark.anyio
async def test_no_server_process_outlives_a_cancelled_context():
    server = fixture_stdio()
    with anyio.CancelScope() as scope:
        async with server:
            child_pid = int((await server.call_tool("spawn_child", {})).content)
            scope.deadline = anyio.current_time() + 0.5  # armed once started: a slow start cannot fire it early
            await server.call_tool("sleep", {"seconds": 60})
    assert scope.cancelled_caught
    assert await wait_gone(server.pid, child_pid) == []


@pytest.mark.anyio
async def test_a_server_that_cannot_start_raises_a_clear_error():
    with pytest.raises(MCPServerDown, match="failed to start.*No such file"):
        async with MCPServer.stdio("/nonexistent/mcp-server", name="ghost"):
            pass
    script = "import sys; print('config missing', file=sys.stderr); sys.exit(2)"
    with pytest.raises(MCPServerDown, match=r"exited with code 2 \(stderr: config missing\)"):
        async with MCPServer.stdio(sys.executable, ["-c", script], name="bad"):
            pass


@pytest.mark.anyio
async def test_streamable_http_server_errors_timeouts_and_reconnect():
    port = free_port()
    proc = start_http_fixture(port, "--page-size", "3")
    try:
        async with MCPServer.http(f"http://127.0.0.1:{port}/mcp", timeout_s=10) as server:
            assert server.name == "127_0_0_1" and server.pid is None
            assert len(server.tools) == 11  # four pages of three (the last holds two)
            assert (await server.call_tool("add", {"a": 2, "b": 3})).content == "5"
            rejected = await server.call_tool("reject", {})
            assert rejected.is_error and rejected.metadata["mcp_error_code"] == -32602
            slow = await server.call_tool("sleep", {"seconds": 30}, timeout_s=0.3)
            assert slow.is_error and slow.metadata["timed_out"]

            proc.kill()
            proc.wait()
            lost = await server.call_tool("echo", {"text": "x"})
            assert lost.is_error and lost.metadata["server_lost"]
            proc = start_http_fixture(port, "--page-size", "3")  # the operator brings it back
            back = await server.call_tool("echo", {"text": "reconnected"})
            assert (back.content, back.is_error) == ("reconnected", False)
            assert server.restarts == 1
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.anyio
async def test_third_party_server_mcp_server_time():
    server = MCPServer.stdio(sys.executable, ["-m", "mcp_server_time", "--local-timezone", "UTC"], name="time")
    async with server:
        tools = {t.name: t for t in server.as_tools()}
        assert set(tools) == {"time__get_current_time", "time__convert_time"}
        assert tools["time__get_current_time"].parameters["required"] == ["timezone"]
        result = await tools["time__get_current_time"].invoke({"timezone": "UTC"})
        assert not result.is_error
        answer = json.loads(result.content)
        assert answer["timezone"] == "UTC"
        reported = datetime.fromisoformat(answer["datetime"])
        assert abs((reported - datetime.now(timezone.utc)).total_seconds()) < 60
        converted = await tools["time__convert_time"].invoke(
            {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"}
        )
        assert json.loads(converted.content)["target"]["datetime"].endswith("21:00:00+09:00")
        bad = await tools["time__get_current_time"].invoke({"timezone": "Mars/Olympus_Mons"})
        assert bad.is_error and "Mars/Olympus_Mons" in bad.content
        pid = server.pid
    assert await wait_gone(pid) == []


OWNER_SCRIPT = """
import sys, anyio
sys.path.insert(0, sys.argv[2])
from tools.mcp import MCPServer

async def main():
    async with MCPServer.stdio(sys.executable, [sys.argv[3], "stdio"], name="fx") as server:
        server_pid = (await server.call_tool("pid", {})).content
        child_pid = (await server.call_tool("spawn_child", {})).content
        print(server.pid, server_pid, child_pid, flush=True)
        await anyio.sleep(60)

anyio.run(main)
"""


def test_no_server_process_outlives_an_agent_killed_with_sigkill(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(OWNER_SCRIPT)
    repo = str(Path(__file__).resolve().parents[2])
    owner = subprocess.Popen([sys.executable, str(script), "x", repo, FIXTURE], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in owner.stdout.readline().split()]   # guard, server, the server's own child
        assert len(pids) == 3 and all(running(p) for p in pids)
        owner.kill()                                               # SIGKILL: no cleanup code runs
        owner.wait(10)
        assert anyio.run(wait_gone, *pids) == []
    finally:
        owner.kill()
