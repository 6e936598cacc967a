"""`LocalSandbox`: the Sandbox protocol on the host, for trusted use and tests.

NO ISOLATION. Commands run as the current user with the host's network, files and environment; only the
per-command timeout, the output cap and the workspace confinement of `read_file`/`write_file` apply (a
command itself can touch any path the user can). Use `DockerSandbox` for model-written code.

The shell leads its own session. Closing it ends every process of that session; should the owner die
without closing it (SIGKILL), the owner's guard (guard.py) ends them and removes the state folder.
"""
from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import anyio
import anyio.to_thread

from sandboxes.base import CommandResult
from sandboxes.driver import ShellDriver
from sandboxes.guard import end_session, tell_guard
from sandboxes.output import DEFAULT_OUTPUT_CAP
from sandboxes.paths import MAX_READ_BYTES, file_too_big, host_path_in_workspace
from sandboxes.shell import SHELL_ARGV, ShellSession

DEFAULT_TIMEOUT_S = 120.0


class PipeTransport:
    """A session shell as a host child process in its own session, talked to over its three pipes."""

    def __init__(self, cwd: Path, env: dict[str, str]):
        self.proc = subprocess.Popen(
            SHELL_ARGV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=cwd, env=env, start_new_session=True,
        )
        tell_guard("session", self.proc.pid)  # its session holds the shell, its commands and their watchdogs
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.proc.stdout, selectors.EVENT_READ, 1)
        self._selector.register(self.proc.stderr, selectors.EVENT_READ, 2)

    def send(self, data: bytes) -> None:
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise EOFError("the shell's stdin is closed") from exc

    def recv(self, timeout: float | None) -> tuple[int, bytes] | None:
        if not self._selector.get_map():
            raise EOFError("the shell closed its output")
        for key, _ in self._selector.select(timeout):
            data = os.read(key.fd, 65536)
            if data:
                return key.data, data
            self._selector.unregister(key.fileobj)
        return None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """End the shell and everything in its session (what escaped a command's group, a shell that died
        before its exit trap could end its background jobs)."""
        try:
            self.proc.stdin.close()  # EOF: the shell's exit trap ends its background jobs
        except OSError:
            pass
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            pass
        end_session(self.proc.pid)
        self.proc.wait()
        tell_guard("ended", self.proc.pid)
        self._selector.close()
        self.proc.stdout.close()
        self.proc.stderr.close()


class LocalSandbox:
    """A persistent bash in `workspace` on the host. Async context manager; also starts on first use."""

    def __init__(self, workspace: str | os.PathLike, timeout: float | None = DEFAULT_TIMEOUT_S,
                 output_cap: int = DEFAULT_OUTPUT_CAP, env: dict[str, str] | None = None):
        self.workspace = Path(workspace).absolute()
        self.timeout = timeout  # default per-command timeout in seconds; None = no limit
        self.output_cap = output_cap
        self._env = {**os.environ, **(env or {})}
        self._state_dir: str | None = None
        self._driver = ShellDriver(self._open_session, self._interrupt)

    async def __aenter__(self) -> LocalSandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def start(self) -> None:
        await self._driver.start()

    def _open_session(self) -> ShellSession:
        self.workspace.mkdir(parents=True, exist_ok=True)
        if self._state_dir is None:
            self._state_dir = tempfile.mkdtemp(prefix="dsv4-local-shell-")  # outside the workspace
            tell_guard("folder", self._state_dir)
        return ShellSession(PipeTransport(self.workspace, self._env), self._state_dir, log_dir=self._state_dir,
                            output_cap=self.output_cap)

    def _interrupt(self) -> None:
        if self._state_dir is None:
            return
        try:
            pgid = int(Path(self._state_dir, "current").read_text())
            os.killpg(pgid, signal.SIGKILL)
        except (OSError, ValueError):
            pass  # no command running, or it already ended

    async def run(self, command: str, timeout: float | None = None, *, background: bool = False) -> CommandResult:
        """Run `command` in the persistent shell; `timeout` defaults to the sandbox's `timeout`. With
        `background`, start it and return at once; its output goes to `log_path` in the state folder."""
        return await self._driver.run(command, self.timeout if timeout is None else timeout, background)

    async def reset(self) -> None:
        """End the shell and the background jobs it left, forget the shell state; the next command starts fresh."""
        await self._driver.reset(self._forget_state)

    def _forget_state(self) -> None:
        if self._state_dir is not None:
            Path(self._state_dir, "state").unlink(missing_ok=True)

    async def write_file(self, path: str, data: bytes | str) -> None:
        target = host_path_in_workspace(self.workspace, path)
        payload = data.encode() if isinstance(data, str) else bytes(data)

        def write() -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(payload)

        await anyio.to_thread.run_sync(write)

    async def read_file(self, path: str) -> bytes:
        target = host_path_in_workspace(self.workspace, path)
        if not target.exists():
            raise FileNotFoundError(f"no file {path!r} in the workspace {self.workspace}")
        if target.is_file() and target.stat().st_size > MAX_READ_BYTES:
            raise file_too_big(path)
        return await anyio.to_thread.run_sync(target.read_bytes)

    async def close(self) -> None:
        await self._driver.close()
        if self._state_dir is not None:
            shutil.rmtree(self._state_dir, ignore_errors=True)
            tell_guard("removed", self._state_dir)
            self._state_dir = None
