"""Async face of a blocking `ShellSession`: one command at a time, in a worker thread, never on the event loop.

Shared by `LocalSandbox` and `DockerSandbox`. Cancelling `run()` kills the running command (through
`interrupt`) and waits for the shell to report, so the next command starts on a clean session. A shell that
dies or hangs is replaced at once (through `revive`, which repairs what killed it), and the command's result
says what was lost; when no new shell starts, the result says so and the next command tries again.

A cancel can come before the command exists: the worker thread may still be sending it, or the shell
not yet have started it (on a loaded machine that takes seconds). `interrupt` is therefore repeated
until the run ends; one kill would miss it, and the command would run on until the wait gave up.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import anyio
import anyio.to_thread

from sandboxes.base import CommandResult
from sandboxes.shell import ShellDied, ShellSession

STOP_WAIT_S = 15.0  # how long a cancelled run may take to end before its shell is called hung and replaced
INTERRUPT_EVERY_S = 0.2  # how often a cancelled run's command is killed again while its run has not ended

# After a shell died: a new session and the note for the model (blocking; raises when none can be started).
Revive = Callable[[ShellDied], tuple[ShellSession, str]]


def shell_restarted(died: ShellDied) -> str:
    """The note for a command whose shell died and was replaced by a new one in the same place."""
    return (f"[sandbox error: {died}, so this command did not complete. A new shell was started with the cwd "
            "and environment saved by the previous command; what this one changed is lost.]")


class ShellDriver:
    def __init__(self, open_session: Callable[[], ShellSession], interrupt: Callable[[], None],
                 revive: Revive | None = None):
        self._open_session = open_session  # blocking; starts a fresh shell
        self._interrupt = interrupt  # blocking; kills the command now running, if any
        self._revive = revive or self._fresh_shell
        self._session: ShellSession | None = None
        self._lock = anyio.Lock()

    def _fresh_shell(self, died: ShellDied) -> tuple[ShellSession, str]:
        return self._open_session(), shell_restarted(died)

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
                    if not await anyio.to_thread.run_sync(self._stop_command, finished):
                        await self._replace(session)
                raise
            result = outcome[0]
            if isinstance(result, ShellDied):
                note = await self._recover(session, result)
                return CommandResult(exit_code=-1, stdout="", stderr=note, timed_out=result.hung,
                                     duration_s=time.monotonic() - started)
            if isinstance(result, BaseException):
                raise result
            return result

    def _stop_command(self, finished: threading.Event) -> bool:
        """Kill the command of a cancelled run until the run ends (blocking); False if it has not ended
        after STOP_WAIT_S."""
        deadline = time.monotonic() + STOP_WAIT_S
        while True:
            self._interrupt()
            if finished.wait(max(0.0, min(INTERRUPT_EVERY_S, deadline - time.monotonic()))):
                return True
            if time.monotonic() >= deadline:
                return False

    async def recover(self, died: ShellDied, still_broken: Callable[[], bool]) -> str | None:
        """What `run` does when its shell dies, for a caller that found it out otherwise (file IO). None when
        `still_broken()`, asked once the lock is held, says a command meanwhile repaired it."""
        async with self._lock:
            if not still_broken():
                return None
            return await self._recover(self._session, died)

    async def _recover(self, session: ShellSession | None, died: ShellDied) -> str:
        with anyio.CancelScope(shield=True):
            if session is not None:
                await self._replace(session)
            try:
                self._session, note = await anyio.to_thread.run_sync(self._revive, died)
            except Exception as exc:  # the next command tries again
                return f"[sandbox error: {died}, and no new shell could be started: {exc}]"
            return note

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
