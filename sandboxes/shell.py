"""The persistent shell both sandboxes speak: one bash process, one line per command, a sentinel per result.

Why this shape:
- A persistent shell costs a few milliseconds per command where a fresh `docker exec` costs ~60 ms.
- Each command runs in a child bash in its own process group. When the command returns, whatever it left
  in that group (`cmd &`, a fork bomb) is killed, so nothing but background commands outlives its call; at
  a timeout the whole group is killed while the session shell lives on. The child restores the session
  state (cwd, exported variables, functions, aliases, shell options) saved by the previous command and
  saves its own on exit, so state persists as in one interactive shell. A command killed at its timeout
  saves nothing: the state is the one from before it.
- A background command (`background=True`, for servers) gets its own group too, but the shell does not
  wait for it: its output goes to a log file, and it is ended with the session (or by `reset`).
- The watchdog is a subshell blocked in the builtin `read -t` on a private fifo: no `sleep` process, so a
  fork bomb that exhausts the pids limit cannot stop the timeout from firing. It reports by its exit
  status, not a file, so a full or deleted state folder cannot turn a timeout into a plain exit 137.
- The state folder is made again when a command deletes it, so the session heals.
- Commands read /dev/null as stdin: an interactive program gets EOF instead of eating the protocol.
- When the session shell reads EOF (its owner closed it), its EXIT trap kills the background commands.

Protocol: Python writes `__dsv4_run TOKEN TIMEOUT LOG 'COMMAND'` (COMMAND shell-quoted, TIMEOUT 0 = none,
LOG `-` for a foreground command, else the log file of a background one); the shell answers
`TOKEN EXIT_CODE TIMED_OUT [PGID]` on stdout and `TOKEN` on stderr after the command's output (PGID: the
process group of a background command).
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

# Run by the child bash of each command: $1 = state dir, $2 = the command, $3 = "save" to keep its state
# (a background command saves none: it would overwrite the state of later commands whenever it ends).
_RUNNER = r"""
__dsv4_state=$1/state
__dsv4_cmd=$2
__dsv4_keep=$3
set --
if [ -r "$__dsv4_state" ]; then . "$__dsv4_state" 2>/dev/null; fi
__dsv4_save() {  # a state file cut short (its filesystem full) would restore half the state: none then
    [ -d "${__dsv4_state%/*}" ] || mkdir -p -- "${__dsv4_state%/*}"
    if ! { builtin printf 'builtin cd -- %q\n' "$PWD" && builtin export -p && builtin declare -f &&
           builtin alias -p && builtin shopt -p && builtin set +o; } > "$__dsv4_state" 2>/dev/null; then
        rm -f -- "$__dsv4_state"
        builtin printf '[sandbox: the shell state (cwd, environment) could not be saved in %s; %s]\n' \
            "${__dsv4_state%/*}" "the next command starts afresh" >&2
    fi
}
if [ "$__dsv4_keep" = save ]; then trap __dsv4_save EXIT; fi
eval "$__dsv4_cmd"
"""

START_TIMEOUT_S = 30.0  # how long starting a background command, or the shell itself, may take


def boot_script(state_dir: str, data_limit: int | None = None) -> str:
    """The script fed to the session shell once: defines `__dsv4_run`, then bash reads command lines.
    `data_limit`: bytes of heap and private writable memory each command's process may take (RLIMIT_DATA,
    soft and hard, so a command cannot raise it again)."""
    limit = "" if data_limit is None else f"ulimit -d {data_limit // 1024} || exit 1\n"
    return f"""{limit}
set +o history
exec 3>&1 4>&2 1>/dev/null 2>&1  # fd 3/4: the channel to the owner; the shell's own output goes nowhere
set -m                       # each command gets its own process group
__dsv4_dir={shlex.quote(state_dir)}
__dsv4_runner={shlex.quote(_RUNNER)}
__dsv4_jobs=()               # process groups of background commands, ended with the session
mkdir -p -- "$__dsv4_dir" || exit 1
__dsv4_tick=$__dsv4_dir/tick.$$
rm -f -- "$__dsv4_tick" && mkfifo -- "$__dsv4_tick" && exec 5<>"$__dsv4_tick" || exit 1
rm -f -- "$__dsv4_tick"      # fd 5 stays: never written, `read -t` on it is a sleep without a process
__dsv4_exit() {{
    local g
    for g in "${{__dsv4_jobs[@]}}"; do kill -KILL -- -"$g"; done
}}
trap __dsv4_exit EXIT
__dsv4_run() {{
    local tok=$1 limit=$2 log=$3 pid wd= rc fired=0 timed_out=0 live=() g
    [ -d "$__dsv4_dir" ] || mkdir -p -- "$__dsv4_dir"   # a command may have deleted it
    # Forget background groups that ended, so a recycled id is never signalled.
    for g in "${{__dsv4_jobs[@]}}"; do if kill -0 -- -"$g"; then live+=("$g"); fi; done
    __dsv4_jobs=("${{live[@]}}")
    if [ "$log" != - ]; then
        if ! : > "$log"; then
            printf 'cannot create the log file %s\\n' "$log" >&4
            printf '%s 1 0\\n' "$tok" >&3; printf '%s\\n' "$tok" >&4; return
        fi
        bash --noprofile --norc -c "$__dsv4_runner" bash "$__dsv4_dir" "$4" </dev/null >"$log" 2>&1 3>&- 4>&- 5>&- &
        __dsv4_jobs+=("$!")
        printf '%s 0 0 %s\\n' "$tok" "$!" >&3; printf '%s\\n' "$tok" >&4
        return
    fi
    bash --noprofile --norc -c "$__dsv4_runner" bash "$__dsv4_dir" "$4" save </dev/null >&3 2>&4 3>&- 4>&- 5>&- &
    pid=$!
    printf '%s' "$pid" > "$__dsv4_dir/current"
    if [ "$limit" != 0 ]; then
        (   # exit 99: it fired and killed the command; ended by the session before that: exit 0
            trap 'exit 0' TERM
            read -t "$limit" -u 5
            trap '' TERM
            kill -KILL -- -"$pid"
            exit 99
        ) 3>&- 4>&- &
        wd=$!
    fi
    wait "$pid"; rc=$?
    : > "$__dsv4_dir/current"  # no command runs: a late interrupt must not signal a recycled pid
    # What the command left behind ends with it. One signal is enough: the kernel aborts a fork that races
    # with a signal to the parent's group, so not even a fork bomb can slip a child past it.
    kill -KILL -- -"$pid"
    if [ -n "$wd" ]; then kill -TERM "$wd"; wait "$wd"; [ $? = 99 ] && fired=1; fi
    if [ "$fired" = 1 ] && [ "$rc" = 137 ]; then timed_out=1; fi
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
        """Whether the shell process still runs (its output may outlive it, held open by its children);
        raises ShellDied when it cannot answer for another reason (its container is paused)."""

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

    def __init__(self, transport: Transport, state_dir: str, log_dir: str, output_cap: int = DEFAULT_OUTPUT_CAP,
                 data_limit: int | None = None):
        self.transport = transport
        self.log_dir = log_dir  # where background commands write their output
        self.output_cap = output_cap
        transport.send(boot_script(state_dir, data_limit).encode())
        # A first round trip proves the shell is up and the boot script was accepted.
        probe = self.run("true", timeout=START_TIMEOUT_S)
        if probe.exit_code != 0:
            raise ShellDied(f"the session shell failed to start: {probe.stderr.strip() or probe.exit_code}")

    def run(self, command: str, timeout: float | None, background: bool = False) -> CommandResult:
        """Run `command`; with `background`, start it with its output in a new log file and return at once."""
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive seconds or None, got {timeout}")
        if "\x00" in command:
            raise ValueError("a shell command cannot contain NUL characters")
        self._drain()
        token = f"__dsv4_{secrets.token_hex(8)}"
        limit = "0" if timeout is None or background else f"{timeout:.3f}"
        log = f"{self.log_dir}/dsv4-bg-{secrets.token_hex(4)}.log" if background else None
        started = time.monotonic()
        line = f"__dsv4_run {token} {limit} {shlex.quote(log or '-')} {shlex.quote(command)}\n"
        try:
            self.transport.send(line.encode())
        except EOFError as exc:
            raise ShellDied("the session shell exited") from exc
        out = StreamCapture(token.encode(), self.output_cap)
        err = StreamCapture(token.encode(), self.output_cap)
        allowed = START_TIMEOUT_S if background else timeout
        give_up = None if allowed is None else started + allowed + GRACE_S
        while not (out.done and err.done):
            wait = None if give_up is None else give_up - time.monotonic()
            if wait is not None and wait <= 0:
                raise ShellDied(f"the shell gave no result {GRACE_S:.0f}s past the command's {allowed:g}s timeout",
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
        code, timed_out, *group = (int(x) for x in out.trailer.split())
        return CommandResult(
            exit_code=-1 if timed_out else code,
            stdout=out.text(),
            stderr=err.text() + (f"\n[killed: the command passed its {timeout:g}s timeout]\n" if timed_out else ""),
            timed_out=bool(timed_out),
            truncated=out.truncated or err.truncated,
            duration_s=time.monotonic() - started,
            background_pid=group[0] if group else None,
            log_path=log if group else None,
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
