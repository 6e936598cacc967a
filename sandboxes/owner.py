"""Who owns a sandbox container, and the reaper that removes the ones nobody owns any more.

Every container carries labels naming its owner process (host, boot id, pid, start time, so a recycled
pid is never mistaken for the owner) and its expiry. `atexit` and `__del__` cannot end them: they never run
after SIGKILL. Three things do, each enough on its own in the common case:
- the owner's guard process (guard.py) removes them as soon as the owner is gone, whatever state they are in;
- a running container notices its owner's death by itself, through the owner fifo (see `owner_fifo`), and
  ends itself at its expiry;
- `reap` removes containers whose owner on this host is gone, whose expiry passed, or that stopped; it runs
  before the first sandbox of a process starts and from `dsv4-agent sandbox gc`.
"""
from __future__ import annotations

import atexit
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

LABEL = "dsv4.sandbox"  # value: the sandbox name; every container we make has it
OWNER_HOST = "dsv4.owner.host"
OWNER_BOOT = "dsv4.owner.boot"
OWNER_PID = "dsv4.owner.pid"
OWNER_START = "dsv4.owner.start"
CREATED_AT = "dsv4.created_at"
EXPIRES_AT = "dsv4.expires_at"
POOLED = "dsv4.pooled"  # "1" on warm-pool containers


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str:
    """The start time of `pid` in clock ticks since boot ("" where /proc is absent or the pid is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of stat; the command name may hold spaces or ")"


def owner_labels(name: str, ttl_s: float, pooled: bool = False) -> dict[str, str]:
    now = time.time()
    labels = {
        LABEL: name,
        OWNER_HOST: socket.gethostname(),
        OWNER_BOOT: _boot_id(),
        OWNER_PID: str(os.getpid()),
        OWNER_START: process_start(os.getpid()),
        CREATED_AT: f"{now:.0f}",
        EXPIRES_AT: f"{now + ttl_s:.0f}",
    }
    if pooled:
        labels[POOLED] = "1"
    return labels


def owner_state(labels: dict[str, str]) -> str:
    """'alive', 'dead', or 'unknown' (another host: only its expiry can end it here)."""
    if labels.get(OWNER_HOST) != socket.gethostname():
        return "unknown"
    if labels.get(OWNER_BOOT) != _boot_id():
        return "dead"  # this host rebooted since: the owner went with the old boot
    try:
        pid = int(labels.get(OWNER_PID, ""))
    except ValueError:
        return "dead"
    started = process_start(pid)
    if not started:  # the pid is gone (or no /proc: then only "does it exist" can be asked)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "dead"
        except PermissionError:
            pass
        return "dead" if labels.get(OWNER_START) else "alive"
    return "alive" if started == labels.get(OWNER_START) else "dead"  # else: a recycled pid


_held_fifo: tuple[str, int] | None = None  # (path, fd) of this process's owner fifo


def owner_fifo() -> str:
    """A fifo this process holds open for writing until it exits; containers mount it read-only and read it.

    Nothing is ever written: a reader blocks until the last writer - this process - is gone, SIGKILL included,
    and then reads EOF. Mode 0644: a sandbox may open it to read (harmless) but never to write (to keep it open).
    """
    global _held_fifo
    path = _fifo_path(os.getpid(), process_start(os.getpid()))
    if _held_fifo is None or _held_fifo[0] != str(path):  # first call, or first in a forked child
        path.parent.mkdir(mode=0o755, exist_ok=True)
        if not path.exists():
            os.mkfifo(path, 0o644)
        _held_fifo = (str(path), os.open(path, os.O_RDWR | os.O_CLOEXEC))  # RDWR: opening never blocks
        atexit.register(_unlink_quietly, path)  # after SIGKILL the reaper removes it instead
    return _held_fifo[0]


def _unlink_quietly(path: Path) -> None:
    path.unlink(missing_ok=True)


def _fifo_path(pid: int, start: str) -> Path:
    return Path(tempfile.gettempdir()) / "dsv4-owners" / f"{pid}-{start or 0}.fifo"


def _remove_dead_owner_fifos() -> None:
    folder = Path(tempfile.gettempdir()) / "dsv4-owners"
    for fifo in folder.glob("*.fifo") if folder.is_dir() else []:
        pid, _, start = fifo.stem.partition("-")
        if process_start(int(pid)) != start and not (start == "0" and Path(f"/proc/{pid}").exists()):
            fifo.unlink(missing_ok=True)


@dataclass
class SandboxInfo:
    id: str
    name: str
    status: str  # docker's: running, paused, exited, ...
    owner: str  # "pid@host"
    owner_state: str
    age_s: float
    expires_in_s: float
    pooled: bool
    image: str

    @classmethod
    def of(cls, container) -> SandboxInfo:
        labels = container.labels
        now = time.time()
        return cls(
            id=container.short_id, name=labels.get(LABEL, ""), status=container.status,
            owner=f"{labels.get(OWNER_PID, '?')}@{labels.get(OWNER_HOST, '?')}", owner_state=owner_state(labels),
            age_s=now - float(labels.get(CREATED_AT, now)), expires_in_s=float(labels.get(EXPIRES_AT, now)) - now,
            pooled=labels.get(POOLED) == "1",
            image=(container.image.tags or [container.image.short_id])[0] if container.image else "?",
        )

    def reap_reason(self) -> str | None:
        if self.owner_state == "dead":
            return "owner process is gone"
        if self.expires_in_s <= 0:
            return "expired"
        if self.status in ("exited", "dead"):
            return "stopped"
        return None


def list_sandboxes(client: docker.DockerClient) -> list[SandboxInfo]:
    infos = []
    for container in client.containers.list(all=True, filters={"label": LABEL}):
        try:
            infos.append(SandboxInfo.of(container))
        except docker.errors.NotFound:  # removed while we looked (auto-remove, another reaper)
            continue
    return infos


def reap(client: docker.DockerClient, everything: bool = False) -> list[tuple[SandboxInfo, str]]:
    """Remove orphaned, expired and stopped sandboxes (all of ours with `everything`); returns (info, reason)."""
    _remove_dead_owner_fifos()
    reaped = []
    for info in list_sandboxes(client):
        reason = "removed on request" if everything else info.reap_reason()
        if reason is None:
            continue
        remove_container(client, info.id)
        reaped.append((info, reason))
    return reaped


def remove_owned_containers(client: docker.DockerClient, pid: int, start: str) -> None:
    """Remove every sandbox container of the owner process (`pid`, `start`) of this host and boot."""
    labels = [f"{OWNER_PID}={pid}", f"{OWNER_HOST}={socket.gethostname()}", f"{OWNER_BOOT}={_boot_id()}"]
    for container in client.api.containers(all=True, filters={"label": labels}):
        if container["Labels"].get(OWNER_START, "") == start:
            remove_container(client, container["Id"])


def remove_container(client: docker.DockerClient, container_id: str) -> None:
    """Force-remove; a container already gone (auto-remove, another reaper) is fine."""
    try:
        client.api.remove_container(container_id, force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        if exc.status_code != 409:  # 409: removal already in progress
            raise
