"""Async face of a blocking `ShellSession`: one command at a time, in a worker thread, never on the event loop.

Shared by `LocalSandbox` and `DockerSandbox`. Cancelling `run()` kills the running command (through
`interrupt`) and waits for the shell to report, so the next command starts on a clean session. A shell that
dies or hangs is replaced, and the command's result says the session state was lost.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import anyio
import anyio.to_thread

from sandboxes.base import CommandResult
from sandboxes.shell import ShellDied, ShellSession


class ShellDriver:
    def __init__(self, open_session: Callable[[], ShellSession], interrupt: Callable[[], None],
                 revive: Callable[[], str] | None = None):
        self._open_session = open_session  # blocking; starts a fresh shell
        self._interrupt = interrupt  # blocking; kills the command now running, if any
        self._revive = revive  # blocking; after a shell died, repairs what killed it; returns a note or ""
        self._session: ShellSession | None = None
        self._lock = anyio.Lock()

    async def start(self) -> None:
        async with self._lock:
            if self._session is None:
                self._session = await anyio.to_thread.run_sync(self._open_session)

    async def run(self, command: str, timeout: float | None, background: bool = False) -> CommandResult:
        async with self._lock:
            if self._session is None:
                self._session = await anyio.to_thread.run_sync(self._open_session)
            session = self._session
            finished = threading.Event()
            started = time.monotonic()
            outcome: list[CommandResult | BaseException] = []

            def work() -> None:
                try:
                    outcome.append(session.run(command, timeout, background))
                except BaseException as exc:  # handed to the event loop below
                    outcome.append(exc)
                finally:
                    finished.set()

            try:
                await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._interrupt)
                    if not await anyio.to_thread.run_sync(finished.wait, 15.0):
                        await self._replace(session)
                raise
            result = outcome[0]
            if isinstance(result, ShellDied):
                await self._replace(session)
                note = await anyio.to_thread.run_sync(self._revive) if self._revive else ""
                return CommandResult(
                    exit_code=-1, stdout="", timed_out=result.hung, duration_s=time.monotonic() - started,
                    stderr=note or f"[sandbox error: {result}; a new shell was started, the session state (cwd, env) is lost]",
                )
            if isinstance(result, BaseException):
                raise result
            return result

    async def reset(self, kill_everything: Callable[[], None]) -> None:
        """Close the shell, run `kill_everything` (blocking), and let the next command open a fresh shell."""
        async with self._lock:
            with anyio.CancelScope(shield=True):
                if self._session is not None:
                    await self._replace(self._session)
                await anyio.to_thread.run_sync(kill_everything)

    async def _replace(self, session: ShellSession) -> None:
        await anyio.to_thread.run_sync(session.close)
        self._session = None

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            async with self._lock:
                if self._session is not None:
                    await anyio.to_thread.run_sync(self._session.close)
                    self._session = None
