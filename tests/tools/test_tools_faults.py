"""Faults injected into tools and MCP servers (issue 13, "Runs" 11 and 14): each test states the invariant.

A sync tool blocked forever neither hangs the call nor the process; `sys.exit` and lone surrogates stay
inside their call; `true` is no integer; MCP names that clean to the same text stay distinct; a server's
death by signal, a server that writes no JSON-RPC and one that never answers are each reported in words
that say what happened, within the start bound.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mcp_types
import pytest

from tools import ToolResult, Toolset, tool
from tools.mcp import MCPServer, MCPServerDown

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = str(Path(__file__).with_name("mcp_fixture_server.py"))


@pytest.fixture
def anyio_backend():
    return "asyncio"


def test_a_sync_tool_blocked_forever_times_out_and_the_process_still_exits(tmp_path):
    script = tmp_path / "blocked.py"
    script.write_text(textwrap.dedent("""
        import threading
        import anyio
        from tools import tool

        @tool(timeout_s=0.5)
        def wait_forever() -> str:
            '''Block on an event nobody sets.'''
            threading.Event().wait()
            return "never"

        result = anyio.run(wait_forever.invoke, {})
        print(result.metadata.get("timed_out"), result.content)
    """))
    # Without a daemon thread the interpreter joins the blocked worker at exit and never ends.
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("True tool 'wait_forever' timed out after 0.5 s"), done.stdout


@pytest.mark.anyio
async def test_sys_exit_in_a_tool_is_that_calls_error():
    @tool
    def exits_sync(code: int) -> str:
        """Exit the process."""
        sys.exit(code)

    @tool
    async def exits_async() -> str:
        """Exit the process."""
        sys.exit()

    for t, args, code in ((exits_sync, {"code": 3}, "3"), (exits_async, {}, "None")):
        result = await t.invoke(args)  # SystemExit would end this test process
        assert result.is_error and f"called sys.exit({code})" in result.content, result.content


@pytest.mark.anyio
async def test_lone_surrogates_from_a_tool_become_replacement_characters():
    @tool
    def surrogates() -> str:
        """Return text decoded with surrogateescape, and a surrogate pair split in two code points."""
        return b"caf\xe9".decode("utf-8", "surrogateescape") + " \ud83d\ude00 \ud800"

    @tool
    def as_result() -> ToolResult:
        """Return a ToolResult built directly."""
        return ToolResult(content="x\udcffy")

    result = await surrogates.invoke({})
    assert not result.is_error and result.content == "caf\ufffd \U0001F600 \ufffd"
    assert (await as_result.invoke({})).content == "x\ufffdy"
    result.content.encode("utf-8")  # what the trajectory and the tokenizer need


@pytest.mark.anyio
async def test_true_is_not_an_integer():
    @tool
    def repeat(text: str, times: int, scale: float = 1.0) -> str:
        """Repeat a text."""
        return text * times

    for arguments, parameter in (({"text": "a", "times": True}, "times"),
                                 ({"text": "a", "times": 2, "scale": False}, "scale"),
                                 ({"text": "a", "times": "2"}, "times")):
        result = await repeat.invoke(arguments)
        assert result.is_error and f"parameter {parameter!r}" in result.content, (arguments, result.content)
    assert (await repeat.invoke({"text": "a", "times": 2, "scale": 3})).content == "aa"  # an int is a number


def test_mcp_names_that_collide_after_cleaning_get_distinct_deterministic_names():
    remote = ["get.time", "get_time", "get time", "get-time"]
    server = MCPServer.stdio("unused", name="srv")
    schema = {"type": "object", "properties": {}}
    server.tools = [mcp_types.Tool(name=n, input_schema=schema) for n in remote]
    names = {t.name for t in server.as_tools()}
    Toolset(server.as_tools())  # refuses duplicate names
    assert len(names) == 4 and {"srv__get_time", "srv__get-time"} <= names  # clean names are kept
    server.tools = list(reversed(server.tools))
    assert {t.name for t in server.as_tools()} == names  # whatever the listing order
    long = ["x" * 70 + ".a", "x" * 70 + "_a"]
    server.tools = [mcp_types.Tool(name=n, input_schema=schema) for n in long]
    assert len({t.name for t in server.as_tools()}) == 2 and all(len(t.name) <= 64 for t in server.as_tools())


@pytest.mark.anyio
async def test_an_mcp_server_killed_by_a_signal_is_reported_by_signal_not_exit_code():
    server = MCPServer.stdio(sys.executable, [FIXTURE, "stdio"], name="fx", timeout_s=10, start_timeout_s=60)
    async with server:
        lost = await server.call_tool("kill_self", {})
    assert lost.is_error
    assert "was killed by SIGKILL (9), a signal the agent did not send" in lost.content, lost.content
    assert "247" not in lost.content and "-9" not in lost.content


@pytest.mark.anyio
async def test_an_mcp_server_that_never_answers_is_stopped_at_its_start_bound():
    server = MCPServer.stdio(sys.executable, ["-c", "import time; time.sleep(600)"], name="mute",
                             timeout_s=60, start_timeout_s=1)
    started = time.monotonic()
    with pytest.raises(MCPServerDown) as down:
        async with server:
            pass
    message = str(down.value)
    assert "no answer to the MCP handshake (initialize, tools/list) within 1 s" in message, message
    assert "was stopped by the agent with SIGTERM" in message, message
    # the bound, plus the fixed grace of the shutdown (stdin EOF, SIGTERM, SIGKILL: about 4 s); not the
    # 60 s request timeout, nor the SDK's 10 s discovery probe on top
    assert time.monotonic() - started < 1 + 20


@pytest.mark.anyio
async def test_an_mcp_server_that_writes_no_json_rpc_fails_at_once_with_a_hint():
    noisy = "import time\nwhile True:\n    print('listening on port 8080', flush=True)\n    time.sleep(0.01)"
    server = MCPServer.stdio(sys.executable, ["-c", noisy], name="noisy", timeout_s=600, start_timeout_s=600)
    with pytest.raises(MCPServerDown) as down:
        async with server:
            pass
    message = str(down.value)
    assert "not JSON-RPC, the first: 'listening on port 8080'" in message, message
    assert "logs belong on stderr" in message
    assert "MCPHandshakeTimeout" not in message  # it failed on what it wrote, not at the (600 s) bound
