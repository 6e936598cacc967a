"""Launcher that ties a stdio MCP server's whole process group to the agent's life, even under SIGKILL.

    python -I -S tools/mcp/guard.py AGENT_PID COMMAND [ARGS...]

The transport starts this in a new session, so it leads the server's process group. It asks the kernel
(Linux prctl PR_SET_PDEATHSIG) for SIGTERM when the agent dies, forks the server into its group, and on
that signal kills the whole group: the server and anything it spawned. A clean shutdown is untouched:
the server exits on stdin EOF and this exits with its status; a server killed by a signal makes this
end by the same signal, so the agent sees what happened (-9, not the exit code 247). Without prctl (not
Linux) it only execs the server, and the transport's own group kill on exit remains the guard.
"""
from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys

PR_SET_PDEATHSIG = 1


def _kill_group(signum: int, frame: object) -> None:
    os.killpg(0, signal.SIGKILL)  # this process included


def main(argv: list[str]) -> int:
    agent_pid, command = int(argv[0]), argv[1:]
    if not sys.platform.startswith("linux"):
        os.execvp(command[0], command)
    signal.signal(signal.SIGTERM, _kill_group)
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0 or os.getppid() != agent_pid:
        return 1  # no death signal available, or the agent died before it was armed
    child = os.fork()
    if child == 0:
        try:
            os.execvp(command[0], command)
        except OSError as exc:  # the transport reports stderr when the server fails to start
            print(f"{command[0]}: {exc.strerror}", file=sys.stderr)
            os._exit(127)
    while True:
        try:
            _, status = os.waitpid(child, 0)
        except InterruptedError:
            continue
        if os.WIFSIGNALED(status):
            _end_by(os.WTERMSIG(status))
        return os.waitstatus_to_exitcode(status)


def _end_by(signum: int) -> None:
    """End this process by `signum`, as the server ended."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the server's crash, not a core file of this launcher
    if signum != signal.SIGKILL:  # SIGKILL's action cannot be set (nor caught)
        signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
