"""How a run ends: one status, saved in the trajectory and mapped to a documented process exit code."""

from __future__ import annotations

import sys
from enum import Enum

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


class ExitStatus(str, Enum):
    """The reason a run stopped. `exit_code` is the contract for scripts that call `dsv4-agent run`."""

    completed = "completed"  # the model answered without calling a tool
    error = "error"  # an internal error: the backend failed, a sandbox died, a bug
    usage = "usage"  # bad command line or configuration; nothing ran
    max_steps = "max_steps"  # the step budget ran out
    max_tokens = "max_tokens"  # the token budget ran out
    timeout = "timeout"  # the wall-clock budget ran out
    format_error = "format_error"  # too many consecutive malformed or empty turns
    stuck = "stuck"  # the model repeated the same tool calls turn after turn
    context_full = "context_full"  # the conversation outgrew the model's context or the KV memory budget
    interrupted = "interrupted"  # Ctrl-C, or the process was killed (see `resume`)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self]


EXIT_CODES: dict[ExitStatus, int] = {
    ExitStatus.completed: 0,
    ExitStatus.error: 1,
    ExitStatus.usage: 2,
    ExitStatus.max_steps: 3,
    ExitStatus.max_tokens: 4,
    ExitStatus.timeout: 5,
    ExitStatus.format_error: 6,
    ExitStatus.stuck: 7,
    ExitStatus.context_full: 8,
    ExitStatus.interrupted: 130,  # 128 + SIGINT, as shells report it
}


class RunStopped(Exception):
    """Raised inside the loop to end a run with a status; caught in one place (`Agent.run`)."""

    def __init__(self, status: ExitStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def single_leaf(exc: BaseException) -> BaseException:
    """The one exception inside (nested) exception groups, or the group itself when it holds several:
    an error raised inside a task group arrives wrapped in one."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
