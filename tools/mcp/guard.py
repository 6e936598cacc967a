"""Launcher that ties a stdio MCP server's whole process group to the agent's life, even under SIGKILL.

    python -I -S tools/mcp/guard.py AGENT_PID COMMAND [ARGS...]

The transport starts this in a new session, so it leads the server's process group. It asks the kernel
(Linux prctl PR_SET_PDEATHSIG) for SIGTERM when the agent dies, forks the server into its group, and on
that signal kills the whole group: the server and anything it spawned. A clean shutdown is untouched:
the server exits on stdin EOF and this exits with its status. Without prctl (not Linux) it only execs
the server, and the transport's own group kill on exit remains the guard.
"""
from __future__ import annotations

import ctypes
import os
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
            return os.waitstatus_to_exitcode(status)
        except InterruptedError:
            continue


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
