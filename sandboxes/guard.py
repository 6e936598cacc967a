"""The owner guard: a small process that ends what a sandbox owner leaves behind when it dies, SIGKILL included.

No handler runs in a process killed by SIGKILL, so another process has to notice. The first sandbox of an
owner process starts its guard (`tell_guard`), in a new session so that a signal to the owner's process
group (Ctrl-C, `kill -- -PGID`) spares it, and keeps the write end of the guard's stdin: the kernel closes
it when the owner exits, however it exits (and children forked from the owner, which share that end), and
the guard reads EOF. Until then the owner tells the guard,
one JSON array per line, what to end:

    ["docker"]                             Docker sandboxes: every container labelled with this owner
    ["session", SID] / ["ended", SID]      a LocalSandbox shell's session: the shell, commands, watchdogs, jobs
    ["folder", PATH] / ["removed", PATH]   a LocalSandbox state folder
    ["exit"]                               the owner exits normally (atexit): no Docker request is in flight

At EOF the guard kills every process of each open session, removes the folders, and removes the owner's
containers (created, running or paused alike) through the engine of its environment (DOCKER_HOST), sweeping
again for `SWEEP_S` after an unclean death, because a create or start the owner sent just before it died
may still be in flight. Started by path, not as a module, so it does not import the package (and docker-py)
until it has work to do.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

SWEEP_S = 20.0  # after an unclean death, how long to look for containers whose creation was in flight
_ROOT = Path(__file__).resolve().parents[1]  # the folder that holds the `sandboxes` package


def session_members(sid: int) -> list[int]:
    """Live processes of session `sid` (zombies excluded: they are dead, waiting for a parent to reap them)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # it ended while we looked
            continue
        state, _, _, session = stat.rsplit(")", 1)[1].split()[:4]  # the command name may hold spaces or ")"
        if int(session) == sid and state not in ("Z", "X"):
            members.append(int(entry))
    return members


def end_session(sid: int) -> None:
    """SIGKILL every process of session `sid`, looking again until none is left (one may fork as we look)."""
    if not os.path.isdir("/proc"):
        return
    for _ in range(100):
        members = session_members(sid)
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


# --- the owner's side --------------------------------------------------------------------------------------

class _Guard:
    """This process's guard and what it was told (replayed to a new guard if the old one died)."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        self.proc: subprocess.Popen | None = None
        self.docker = False
        self.sessions: set[int] = set()
        self.folders: set[str] = set()

    def tell(self, message: list) -> None:
        kind, *args = message
        if kind == "docker":
            self.docker = True
        elif kind == "session":
            self.sessions.add(args[0])
        elif kind == "ended":
            self.sessions.discard(args[0])
        elif kind == "folder":
            self.folders.add(args[0])
        elif kind == "removed":
            self.folders.discard(args[0])
        if self.proc is None or self.proc.poll() is not None:
            self._start()  # the replay includes this message
            return
        try:
            self._send(message)
        except (BrokenPipeError, ValueError):  # it died since the poll
            self._start()

    def _start(self) -> None:
        from sandboxes.owner import process_start

        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(self.owner), process_start(self.owner)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
            start_new_session=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])},
        )
        if self.docker:
            self._send(["docker"])
        for sid in self.sessions:
            self._send(["session", sid])
        for folder in self.folders:
            self._send(["folder", folder])

    def _send(self, message: list) -> None:
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def exiting(self) -> None:
        if self.owner == os.getpid() and self.proc is not None and self.proc.poll() is None:
            try:
                self._send(["exit"])
            except (BrokenPipeError, ValueError):
                pass


_guard: _Guard | None = None
_lock = threading.Lock()


def tell_guard(*message: str | int) -> None:
    """Tell this process's guard (started on first use) what to end should this process die."""
    global _guard
    with _lock:
        if _guard is None or _guard.owner != os.getpid():  # first call, or first in a forked child
            _guard = _Guard()
            atexit.register(_guard.exiting)
        _guard.tell(list(message))


# --- the guard's side ----------------------------------------------------------------------------------------

def _remove_containers(owner_pid: int, owner_start: str, sweep_s: float) -> None:
    sys.path.insert(0, str(_ROOT))
    import docker

    from sandboxes.owner import remove_owned_containers

    client = docker.from_env()
    stop = time.monotonic() + sweep_s
    while True:
        remove_owned_containers(client, owner_pid, owner_start)
        if time.monotonic() >= stop:
            return
        time.sleep(1.0)


def main(argv: list[str]) -> None:
    owner_pid, owner_start = int(argv[0]), argv[1] if len(argv) > 1 else ""
    docker_used, clean_exit = False, False
    sessions: set[int] = set()
    folders: set[str] = set()
    for line in sys.stdin.buffer:  # until EOF: the owner is gone
        try:
            kind, *args = json.loads(line)
        except ValueError:
            continue
        if kind == "docker":
            docker_used = True
        elif kind == "session":
            sessions.add(args[0])
        elif kind == "ended":
            sessions.discard(args[0])
        elif kind == "folder":
            folders.add(args[0])
        elif kind == "removed":
            folders.discard(args[0])
        elif kind == "exit":
            clean_exit = True
    for sid in sessions:
        end_session(sid)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    if docker_used:
        _remove_containers(owner_pid, owner_start, 0.0 if clean_exit else SWEEP_S)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # its work starts when the owner is gone, not before
    main(sys.argv[1:])
