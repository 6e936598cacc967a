"""A stdio transport for MCP servers that owns the server's whole process group.

The SDK's `stdio_client` hides the process and leaves the children of a server that exits
cleanly alive on POSIX (agent-anchors §8). Here the server starts in its own session
(process group); the transport exposes its pid, keeps the tail of its stderr for crash reports,
signals when the connection ends, and on exit always kills the whole group: SIGTERM after a
grace period, then SIGKILL, even when the surrounding scope is cancelled.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Any

import anyio
import mcp_types
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream
from mcp.client.stdio import get_default_environment
from mcp.shared.message import SessionMessage

logger = logging.getLogger(__name__)

GUARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guard.py")

# Time a server gets to exit by itself once its stdin closes (the MCP shutdown sequence).
EXIT_GRACE_S = 2.0
# Time between SIGTERM and SIGKILL to the process group.
TERM_GRACE_S = 1.0
# Lines that are not JSON-RPC before the server's first message, past which it is taken for no MCP
# server at all and the connection ends at once (a banner line or two is tolerated).
STRAY_LINES_LIMIT = 10
_POLL_S = 0.01


class StdioTransport:
    """`async with StdioTransport(...) as (read, write)`: an MCP `Transport` over a child's stdin/stdout."""

    def __init__(
        self,
        command: str,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stderr_lines: int = 20,
    ) -> None:
        self.command = command
        self.args = list(args)
        # the SDK's safe allow-list (PATH, HOME, ...) plus what the caller names
        self.env = get_default_environment() | dict(env or {})
        self.cwd = cwd
        self.pid: int | None = None
        self.returncode: int | None = None
        self.stderr_tail: deque[str] = deque(maxlen=stderr_lines)
        self.stopped_with: signal.Signals | None = None
        """The first signal the agent sent while the server still ran (it was stopped, it did not die)."""
        self.stray_lines = 0
        """stdout lines that were not JSON-RPC, counted until the server's first message."""
        self.first_stray_line = ""
        self._answered = False
        self.disconnected = anyio.Event()
        """Set when the server closed its stdout: it exited or crashed."""
        self._cm: AbstractAsyncContextManager[Any] | None = None

    async def __aenter__(self) -> Any:
        self._cm = self._connect()
        return await self._cm.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        assert self._cm is not None
        return await self._cm.__aexit__(*exc_info)

    def _argv(self) -> list[str]:
        """The server's command line, behind tools/mcp/guard.py on Linux so that its process group dies
        with this process even when it is SIGKILLed (standalone script: -I -S keep its start-up short)."""
        if shutil.which(self.command, path=self.env.get("PATH")) is None and not os.path.exists(self.command):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self.command)
        if not sys.platform.startswith("linux"):
            return [self.command, *self.args]
        return [sys.executable, "-I", "-S", GUARD, str(os.getpid()), self.command, *self.args]

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[tuple[Any, Any]]:
        process = await anyio.open_process(self._argv(), env=self.env, cwd=self.cwd, start_new_session=True)
        self.pid = process.pid
        # No await between the spawn and the shielded cleanup below, or a cancellation could leak the process.
        to_session, from_server = anyio.create_memory_object_stream[SessionMessage | Exception](0)
        to_server, from_session = anyio.create_memory_object_stream[SessionMessage](0)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump_stdout, process, to_session)
                tg.start_soon(self._pump_stdin, process, from_session)
                tg.start_soon(self._pump_stderr, process)
                try:
                    yield from_server, to_server
                finally:
                    from_server.close()
                    to_server.close()
                    with anyio.CancelScope(shield=True):
                        await self._stop(process)
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                self._signal(process, signal.SIGKILL)
                with anyio.move_on_after(TERM_GRACE_S):
                    await process.aclose()  # reap it and close the pipes
                self.returncode = process.returncode

    async def _stop(self, process: Process) -> None:
        """Close stdin, give the server EXIT_GRACE_S, then SIGTERM and SIGKILL its whole group.

        The group is killed even after a clean exit: a server's children must not outlive it.
        """
        with suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            assert process.stdin is not None
            await process.stdin.aclose()
        if not await _wait_exit(process, EXIT_GRACE_S):
            self._signal(process, signal.SIGTERM)
            await _wait_exit(process, TERM_GRACE_S)
        self._signal(process, signal.SIGKILL)
        await _wait_exit(process, TERM_GRACE_S)
        self.returncode = process.returncode

    def _signal(self, process: Process, sig: signal.Signals) -> None:
        """Signal the whole group; remember it when the server was still running, for `describe_exit`."""
        if process.returncode is None and self.stopped_with is None:
            self.stopped_with = sig
        _kill_group(process.pid, sig)

    def describe_exit(self) -> str:
        """How the server process ended, as words for a crash report ("" while it runs)."""
        code = self.returncode
        if code is None:
            return ""
        if self.stopped_with is not None:
            return f"was stopped by the agent with {self.stopped_with.name}"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:  # a real-time signal has no name
                name = f"signal {-code}"
            return f"was killed by {name} ({-code}), a signal the agent did not send"
        return f"exited with code {code}"

    def stray_output_hint(self) -> str:
        """What was wrong with the server's stdout before its first message ("" if nothing)."""
        if self._answered or not self.stray_lines:
            return ""
        first = self.first_stray_line if len(self.first_stray_line) <= 120 else self.first_stray_line[:117] + "..."
        return (
            f"its stdout held {self.stray_lines} line(s) that are not JSON-RPC, the first: {first!r}; "
            f"is {self.command!r} an MCP server? A stdio MCP server may write only JSON-RPC messages "
            "to stdout (logs belong on stderr)"
        )

    async def _pump_stdout(self, process: Process, to_session: Any) -> None:
        assert process.stdout is not None
        deliver = True
        buffer = ""
        try:
            async for chunk in TextReceiveStream(process.stdout, errors="replace"):
                *lines, buffer = (buffer + chunk).split("\n")
                for line in lines:
                    if not deliver or not line.strip():
                        continue  # after the session has gone, keep draining so the server never blocks
                    message = _parse(line)
                    if not self._answered and isinstance(message, Exception):
                        self.stray_lines += 1
                        self.first_stray_line = self.first_stray_line or line.strip()
                        if self.stray_lines >= STRAY_LINES_LIMIT:  # not an MCP server: end the handshake now
                            deliver = False
                            to_session.close()
                            continue
                    self._answered = self._answered or not isinstance(message, Exception)
                    try:
                        await to_session.send(message)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        deliver = False
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # our own shutdown closed the pipe
        finally:
            # A crash report wants the exit code: give a dying server a moment to be reaped.
            with anyio.CancelScope(shield=True):
                await _wait_exit(process, 0.5)
            self.returncode = process.returncode
            self.disconnected.set()
            to_session.close()

    async def _pump_stdin(self, process: Process, from_session: Any) -> None:
        assert process.stdin is not None
        with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            async for message in from_session:
                line = message.message.model_dump_json(by_alias=True, exclude_unset=True) + "\n"
                await process.stdin.send(line.encode())

    async def _pump_stderr(self, process: Process) -> None:
        assert process.stderr is not None
        buffer = ""
        with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            async for chunk in TextReceiveStream(process.stderr, errors="replace"):
                *lines, buffer = (buffer + chunk).split("\n")
                for line in lines:
                    logger.debug("[%s %s] %s", self.command, self.pid, line)
                    self.stderr_tail.append(line)


def _parse(line: str) -> SessionMessage | Exception:
    """One stdout line as a message; a malformed line is handed to the session as an error value."""
    try:
        return SessionMessage(mcp_types.jsonrpc_message_adapter.validate_json(line, by_name=False))
    except ValueError as exc:
        return exc


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _wait_exit(process: Process, timeout: float) -> bool:
    """Poll rather than `process.wait()`: on asyncio that also waits for pipe EOF, which a
    surviving grandchild holding the pipe would delay."""
    with anyio.move_on_after(timeout):
        while process.returncode is None:
            await anyio.sleep(_POLL_S)
    return process.returncode is not None
