"""The persistent shell both sandboxes speak: one bash process, one line per command, a sentinel per result.

Why this shape:
- A persistent shell costs a few milliseconds per command where a fresh `docker exec` costs ~60 ms.
- Each command runs in a child bash in its own process group, so a timeout can kill the command and
  everything it started (`kill -KILL -- -pgid`) while the session shell lives on. The child restores the
  session state (cwd, exported variables, functions, aliases, shell options) saved by the previous command
  and saves its own on exit, so state persists as in one interactive shell. A command killed at its timeout
  saves nothing: the state is the one from before it.
- The watchdog is a subshell blocked in the builtin `read -t` on a private fifo: no `sleep` process, so a
  fork bomb that exhausts the pids limit cannot stop the timeout from firing.
- Commands read /dev/null as stdin: an interactive program gets EOF instead of eating the protocol.
- When the session shell reads EOF (its owner closed it), its EXIT trap kills the process group of every
  command that outlived its run (background jobs).

Protocol: Python writes `__dsv4_run TOKEN TIMEOUT 'COMMAND'` (COMMAND shell-quoted, TIMEOUT 0 = none); the
shell answers `TOKEN EXIT_CODE TIMED_OUT` on stdout and `TOKEN` on stderr after the command's output.
"""
from __future__ import annotations

import secrets
import shlex
import time
from typing import Protocol

from sandboxes.base import CommandResult
from sandboxes.output import DEFAULT_OUTPUT_CAP, StreamCapture

# argv that starts the session shell; the boot script arrives on its stdin
SHELL_ARGV = ["bash", "--noprofile", "--norc", "-s"]

# Run by the child bash of each command: $1 = state dir, $2 = the command.
_RUNNER = r"""
__dsv4_state=$1/state
__dsv4_cmd=$2
set --
if [ -r "$__dsv4_state" ]; then . "$__dsv4_state" 2>/dev/null; fi
__dsv4_save() {
    { builtin printf 'builtin cd -- %q\n' "$PWD"; builtin export -p; builtin declare -f; builtin alias -p;
      builtin shopt -p; builtin set +o; } > "$__dsv4_state" 2>/dev/null
}
trap __dsv4_save EXIT
eval "$__dsv4_cmd"
"""


def boot_script(state_dir: str) -> str:
    """The script fed to the session shell once: defines `__dsv4_run`, then bash reads command lines."""
    return f"""
set +o history
exec 3>&1 4>&2 1>/dev/null 2>&1  # fd 3/4: the channel to the owner; the shell's own output goes nowhere
set -m                       # each command gets its own process group
__dsv4_dir={shlex.quote(state_dir)}
__dsv4_runner={shlex.quote(_RUNNER)}
__dsv4_groups=()
mkdir -p -- "$__dsv4_dir" && [ -p "$__dsv4_dir/tick" ] || mkfifo -- "$__dsv4_dir/tick"
exec 5<>"$__dsv4_dir/tick"   # never written: `read -t` on it is a sleep without a process
__dsv4_exit() {{
    local g
    for g in "${{__dsv4_groups[@]}}"; do kill -KILL -- -"$g"; done
}}
trap __dsv4_exit EXIT
__dsv4_run() {{
    local tok=$1 limit=$2 pid wd= rc mark= timed_out=0 i live=() g
    bash --noprofile --norc -c "$__dsv4_runner" bash "$__dsv4_dir" "$3" </dev/null >&3 2>&4 3>&- 4>&- 5>&- &
    pid=$!
    printf '%s' "$pid" > "$__dsv4_dir/current"
    if [ "$limit" != 0 ]; then
        (
            read -t "$limit" -u 5
            printf '%s' "$tok" > "$__dsv4_dir/timed_out"
            for ((i = 0; i < 200; i++)); do kill -KILL -- -"$pid" || break; read -t 0.01 -u 5; done
        ) 3>&- 4>&- &
        wd=$!
    fi
    wait "$pid"; rc=$?
    if [ -n "$wd" ]; then kill -KILL "$wd"; wait "$wd"; fi
    # Remember groups that outlive their command (background jobs) to end them with the session;
    # forget dead ones so a recycled pid is never signalled.
    for g in "${{__dsv4_groups[@]}}" "$pid"; do if kill -0 -- -"$g"; then live+=("$g"); fi; done
    __dsv4_groups=("${{live[@]}}")
    read -r mark < "$__dsv4_dir/timed_out"
    if [ "$mark" = "$tok" ] && [ "$rc" = 137 ]; then timed_out=1; fi
    printf '%s %d %d\\n' "$tok" "$rc" "$timed_out" >&3
    printf '%s\\n' "$tok" >&4
}}
"""


class Transport(Protocol):
    """A duplex byte channel to a session shell (host pipes or a Docker exec socket). Blocking calls."""

    def send(self, data: bytes) -> None: ...

    def recv(self, timeout: float | None) -> tuple[int, bytes] | None:
        """(1 for stdout | 2 for stderr, bytes); None when `timeout` passed; raises EOFError when closed."""

    def alive(self) -> bool:
        """Whether the shell process still runs (its output may outlive it, held open by its children)."""

    def close(self) -> None: ...


class ShellDied(RuntimeError):
    """The session shell closed or stopped answering; the sandbox must start a new one."""

    def __init__(self, message: str, hung: bool = False):
        super().__init__(message)
        self.hung = hung  # it outlived the command's timeout rather than dying


GRACE_S = 10.0  # beyond a command's own timeout, how long the owner waits before calling the shell hung
LIVENESS_CHECK_S = 1.0  # while a command is silent, how often to check that the shell itself still runs


class ShellSession:
    """Runs commands one at a time over a transport. Blocking: call it from a worker thread."""

    def __init__(self, transport: Transport, state_dir: str, output_cap: int = DEFAULT_OUTPUT_CAP):
        self.transport = transport
        self.output_cap = output_cap
        transport.send(boot_script(state_dir).encode())
        # A first round trip proves the shell is up and the boot script was accepted.
        probe = self.run("true", timeout=30.0)
        if probe.exit_code != 0:
            raise ShellDied(f"the session shell failed to start: {probe.stderr.strip() or probe.exit_code}")

    def run(self, command: str, timeout: float | None) -> CommandResult:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive seconds or None, got {timeout}")
        if "\x00" in command:
            raise ValueError("a shell command cannot contain NUL characters")
        self._drain()
        token = f"__dsv4_{secrets.token_hex(8)}"
        limit = "0" if timeout is None else f"{timeout:.3f}"
        started = time.monotonic()
        self.transport.send(f"__dsv4_run {token} {limit} {shlex.quote(command)}\n".encode())
        out = StreamCapture(token.encode(), self.output_cap)
        err = StreamCapture(token.encode(), self.output_cap)
        give_up = None if timeout is None else started + timeout + GRACE_S
        while not (out.done and err.done):
            wait = None if give_up is None else give_up - time.monotonic()
            if wait is not None and wait <= 0:
                raise ShellDied(f"the shell gave no result {GRACE_S:.0f}s past the command's {timeout}s timeout",
                                hung=True)
            try:
                chunk = self.transport.recv(LIVENESS_CHECK_S if wait is None else min(wait, LIVENESS_CHECK_S))
            except EOFError as exc:
                raise ShellDied("the session shell exited") from exc
            if chunk is not None:
                stream, data = chunk
                (out if stream == 1 else err).feed(data)
            elif not self.transport.alive():
                raise ShellDied("the session shell was killed")
        code, timed_out = (int(x) for x in out.trailer.split())
        return CommandResult(
            exit_code=-1 if timed_out else code,
            stdout=out.text(),
            stderr=err.text() + (f"\n[killed: the command passed its {timeout:g}s timeout]\n" if timed_out else ""),
            timed_out=bool(timed_out),
            truncated=out.truncated or err.truncated,
            duration_s=time.monotonic() - started,
        )

    def _drain(self) -> None:
        """Drop what background jobs printed since the last command: it belongs to no command."""
        try:
            while self.transport.recv(0.0) is not None:
                pass
        except EOFError as exc:
            raise ShellDied("the session shell exited") from exc

    def close(self) -> None:
        self.transport.close()
