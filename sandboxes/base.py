"""What every sandbox offers the tools: run a command, move files. No Docker or torch here."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from pydantic import BaseModel, Field


class CommandResult(BaseModel):
    """The outcome of one command in a sandbox. A failed or killed command is data, not an exception."""

    exit_code: int = Field(description="process exit status; -1 when it never finished (timeout, sandbox error)")
    stdout: str = Field(description="standard output, capped (see `truncated`)")
    stderr: str = Field(description="standard error, capped (see `truncated`)")
    timed_out: bool = Field(default=False, description="the command was killed at its timeout")
    truncated: bool = Field(default=False, description="output was cut to the cap; the elision is stated in the text")
    duration_s: float = Field(default=0.0, description="wall time of the command")
    background_pid: int | None = Field(
        default=None, description="a background command: its process (and process group) id")
    log_path: str | None = Field(default=None, description="a background command: the file its output goes to")


@runtime_checkable
class Sandbox(Protocol):
    """An isolated place where tools run. `DockerSandbox` is the hardened implementation."""

    async def run(self, command: str, timeout: float | None = None, *, background: bool = False) -> CommandResult:
        """Run `command` in the sandbox's persistent shell. Processes it leaves behind end when it returns;
        with `background`, it is started and left running (output to `log_path`) until the sandbox closes."""

    async def write_file(self, path: str, data: bytes | str) -> None: ...

    async def read_file(self, path: str) -> bytes: ...
