"""`DockerSandbox`: a hardened container with a persistent shell, files moved over exec streams.

Hardened by default: no network, memory (no swap), CPU and pids limits, every capability dropped,
no-new-privileges, commands as uid 1000, an init process (docker-init) that reaps zombies, a read-only root
filesystem with tmpfs /tmp, and only the workspace mounted. The workspace is a tmpfs of size `disk` unless a
host folder is given. A host folder has no quota (Docker's `storage_opt` needs xfs project quotas, which
ordinary hosts lack), so `disk` is refused for one rather than promised.

Memory: tmpfs pages are charged to the container's memory cgroup, whoever wrote them, so the cgroup limit
is `memory` + `tmp_size` + the shell-state tmpfs (+ `disk` for a tmpfs workspace): filling the disk ends in
"No space left on device", not in the OOM killer taking the sandbox down. What bounds the processes is a
data ulimit of `memory` (RLIMIT_DATA: heap and private writable mappings) that the session shell sets on
itself and so on every command: an allocation beyond it fails (MemoryError, ENOMEM) rather than eating the
disk's share. (Not a container ulimit: runc's own start-up in the container needs ~100 MB of it.) Together,
processes can use the cgroup limit minus what the files use.

Leaks: the owner's guard process (guard.py) removes its containers as soon as the owner is gone, SIGKILL
included, in whatever state they are (created but never started, running, paused in a pool). Within the
container, PID 1's child is a deadline process (root without capabilities, so commands can neither signal
nor stop it). It ends the container - which is auto-removed - at the hard expiry (`ttl`) or when the owner
process is gone: the owner holds a fifo open for writing while it lives (owner.py), and the kernel closes
that end when the owner exits. Every container also carries owner labels that the reaper checks at the
next start and in `dsv4-agent sandbox gc`.

Every docker-py call blocks, so each runs in a worker thread; the event loop never waits on Docker.
"""
from __future__ import annotations

import os
import secrets
import select
import socket
import stat
import time
from pathlib import Path

import anyio
import anyio.to_thread
import docker
import docker.errors
import docker.types

from sandboxes.base import CommandResult
from sandboxes.driver import ShellDriver, shell_restarted
from sandboxes.guard import tell_guard
from sandboxes.image import DEFAULT_IMAGE, SANDBOX_UID, require_image
from sandboxes.output import DEFAULT_OUTPUT_CAP
from sandboxes.owner import owner_fifo, owner_labels, reap, remove_container
from sandboxes.paths import (MAX_READ_BYTES, WorkspaceEscapeError, container_path_in_workspace,
                             file_too_big)
from sandboxes.shell import SHELL_ARGV, ShellDied, ShellSession

WORKSPACE = "/workspace"
SHELL_STATE = "/run/dsv4-shell"  # its own small tmpfs: a full /tmp cannot stop the shell from saving its state
SHELL_STATE_SIZE = "16m"
DEFAULT_DISK = "1g"
OWNER_FIFO = "/run/dsv4-owner"  # the owner process's fifo, read by the deadline process
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_TTL_S = 4 * 3600.0
# After a shell died in a container Docker still calls running (it does so for a moment after a kill), how
# long to keep trying a new shell there before the container counts as dead and is replaced.
REVIVE_S = 20.0
OWNER_WAIT_S = 20  # a container whose owner fifo has no writer this long after it started ends itself
_EXEC_ENV = {"HOME": "/tmp", "LANG": "C.UTF-8", "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}

# PID 1's child, as root without capabilities; only bash builtins in the loop, so a fork bomb cannot stall it.
# Ends the container (then auto-removed) at the hard expiry ($1), or when its owner is gone: the owner holds
# the owner fifo open for writing while it lives, so opening it to read returns at once, and reading it
# returns EOF once the kernel closed the owner's end, however the owner died. Opening a fifo that has no
# writer blocks, so a child opens it and reports on a private fifo (which, read with a timeout, is also the
# loop's sleep): an owner that died before the open is noticed when no report came within $2 seconds.
_DEADLINE = r"""
end=$1 wait_owner=0
mkdir -m 700 /tmp/.dsv4-pid1 && mkfifo /tmp/.dsv4-pid1/events && exec 3<>/tmp/.dsv4-pid1/events || exit 1
if [ -p /run/dsv4-owner ]; then  # absent on a remote engine: there only the expiry and the reaper end it
    ( exec 4< /run/dsv4-owner && echo open >&3 && read -u 4; echo gone >&3 ) &
    printf -v wait_owner '%(%s)T' -1
    wait_owner=$((wait_owner + $2))
fi
while :; do
    printf -v now '%(%s)T' -1
    (( now >= end )) && exit 0
    (( wait_owner && now >= wait_owner )) && exit 0
    if read -t 1 -u 3 event; then
        [ "$event" = gone ] && exit 0
        wait_owner=0
    fi
done
"""

# File IO over an exec. Output may only start after our go-line arrives: the HTTP upgrade of the exec
# socket could otherwise swallow the first bytes. Exit 92: the real path (symlinks followed) leaves the workspace.
_CONFINE = f"""
IFS= read -r _ || exit 90
p=$(realpath -m -- "$1") || exit 91
case $p in {WORKSPACE}|{WORKSPACE}/*) ;; *) echo "$p" >&2; exit 92;; esac
"""
_WRITE = _CONFINE + 'mkdir -p -- "$(dirname -- "$p")" && exec cat > "$p"'
_READ = _CONFINE + (f'[ -d "$p" ] && {{ echo "is a directory" >&2; exit 93; }}; '
                    f'exec head -c {MAX_READ_BYTES + 1} -- "$p"')


class SandboxError(RuntimeError):
    """The container could not be started or reached; the message says why."""


class ExecTransport:
    """A Docker exec's stdin/stdout/stderr over its hijacked socket (8-byte frame headers, tty off)."""

    def __init__(self, api: docker.APIClient, container_id: str, argv: list[str], user: str, env: dict[str, str]):
        self.api = api
        self.container_id = container_id
        self.exec_id = api.exec_create(container_id, argv, stdin=True, stdout=True, stderr=True, tty=False,
                                       user=user, workdir=WORKSPACE, environment=env)["Id"]
        self._raw = api.exec_start(self.exec_id, socket=True)  # keeps the HTTP response alive
        self.sock: socket.socket = getattr(self._raw, "_sock", self._raw)
        self._buffer = bytearray()
        self._eof = False

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise EOFError("the exec socket is closed") from exc

    def recv(self, timeout: float | None) -> tuple[int, bytes] | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            frame = self._pop_frame()
            if frame is not None:
                return frame
            if self._eof:
                raise EOFError("the exec ended")
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.sock], [], [], wait)
            if not ready:
                return None
            data = self.sock.recv(262144)
            if not data:
                self._eof = True
            self._buffer += data

    def _pop_frame(self) -> tuple[int, bytes] | None:
        if len(self._buffer) < 8:
            return None
        size = int.from_bytes(self._buffer[4:8], "big")
        if len(self._buffer) < 8 + size:
            return None
        stream, payload = self._buffer[0], bytes(self._buffer[8:8 + size])
        del self._buffer[:8 + size]
        return stream, payload

    def alive(self) -> bool:
        try:
            if not self.api.exec_inspect(self.exec_id)["Running"]:
                return False
            paused = self.api.inspect_container(self.container_id)["State"]["Paused"]
        except docker.errors.NotFound:  # the container was removed
            return False
        if paused:  # a paused shell never answers: say so now rather than at the timeout
            raise ShellDied("the command got no answer")
        return True

    def finish_input(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)  # stdin EOF for the exec'd process

    def exit_code(self) -> int:
        for _ in range(100):  # the daemon records the code a moment after the stream ends
            code = self.api.exec_inspect(self.exec_id)["ExitCode"]
            if code is not None:
                return code
            time.sleep(0.01)
        raise SandboxError(f"exec {self.exec_id[:12]} never reported its exit code")

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            self._raw.close()


class DockerSandbox:
    """A hardened container with a persistent shell. Use as `async with DockerSandbox(...) as sb:`."""

    def __init__(
        self,
        image: str = DEFAULT_IMAGE,
        *,
        network: bool = False,
        memory: str = "1g",
        cpus: float = 1.0,
        pids: int = 256,
        workspace: str | os.PathLike | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        disk: str | None = None,
        tmp_size: str = "256m",
        ttl: float = DEFAULT_TTL_S,
        output_cap: int = DEFAULT_OUTPUT_CAP,
        read_only: bool = True,
        user: str | None = None,
        env: dict[str, str] | None = None,
        client: docker.DockerClient | None = None,
        _pooled: bool = False,
    ):
        if cpus <= 0 or pids < 16 or ttl <= 0:
            raise ValueError(f"need cpus > 0, pids >= 16 and ttl > 0; got cpus={cpus}, pids={pids}, ttl={ttl}")
        if workspace is not None and disk is not None:
            raise ValueError(
                f"disk={disk!r} sizes the in-memory workspace; a host-folder workspace has no quota here (Docker "
                "needs xfs project quotas for one): leave `disk` unset, or use no host folder")
        for size in (memory, tmp_size, disk):
            if size is not None:
                _bytes(size)  # a bad size fails here, before anything starts
        self.image = image
        self.network = network
        self.memory = memory
        self.cpus = cpus
        self.pids = pids
        self.host_workspace = Path(workspace).absolute() if workspace is not None else None
        self.timeout = timeout  # default per-command timeout in seconds; None = no limit
        self.disk = disk or DEFAULT_DISK  # the tmpfs workspace's size (a host folder has none)
        self.tmp_size = tmp_size
        self.ttl = ttl  # hard lifetime of the container
        self.output_cap = output_cap
        self.read_only = read_only  # False only for images that must write outside /tmp and /workspace
        self.uid, self.gid = _parse_user(user) if user else self._default_owner()
        self.user = f"{self.uid}:{self.gid}"
        self.env = {**_EXEC_ENV, **(env or {})}
        self.name = f"dsv4-sbx-{secrets.token_hex(4)}"
        self._client = client
        self._pooled = _pooled
        self.container_id: str | None = None
        self.restarts = 0  # containers started to replace one that died during the session
        self._expires_at: float | None = None  # set by the first container; a replacement never extends it
        self._driver = ShellDriver(self._open_session, self._interrupt, self._revive)

    # --- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> DockerSandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def start(self) -> None:
        """Create and start the container and its shell (reaping orphans of dead owners first)."""
        if self.container_id is None:
            try:
                await anyio.to_thread.run_sync(self._create_container)
                await self._driver.start()
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self.close()
                raise

    @property
    def expires_at(self) -> float | None:
        """When (`time.time()`) the hard expiry ends the container, a replacement too; None before the start."""
        return self._expires_at

    @property
    def workspace(self) -> str:
        """The workspace as commands inside the container see it (search tools start there, not in
        whatever folder an earlier `cd` left the shell in)."""
        return WORKSPACE

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            try:
                self._client = docker.from_env()
                self._client.ping()
            except docker.errors.DockerException as exc:
                raise SandboxError(f"no Docker engine reachable ({exc}); start dockerd or set DOCKER_HOST") from exc
        return self._client

    def _create_container(self) -> None:
        _reap_once(self.client)
        require_image(self.client, self.image)
        owned = f"uid={self.uid},gid={self.gid}"
        tmpfs = {"/tmp": f"rw,nosuid,nodev,size={self.tmp_size},mode=1777",
                 SHELL_STATE: f"rw,nosuid,nodev,noexec,size={SHELL_STATE_SIZE},{owned},mode=0700"}
        volumes = {}
        if self.host_workspace is None:
            tmpfs[WORKSPACE] = f"rw,nosuid,nodev,size={self.disk},{owned},mode=0755"
        else:
            self._check_host_workspace()
            volumes[str(self.host_workspace)] = {"bind": WORKSPACE, "mode": "rw"}
        tell_guard("docker")  # before the create: the owner may die between create and start
        if self.client.api.base_url.startswith("http+docker://localhost"):  # the engine shares our filesystem
            volumes[owner_fifo()] = {"bind": OWNER_FIFO, "mode": "ro"}
        if self._expires_at is None:
            self._expires_at = time.time() + self.ttl
        lifetime = self._expires_at - time.time()
        memory_limit = (_bytes(self.memory) + _bytes(self.tmp_size) + _bytes(SHELL_STATE_SIZE)
                        + (_bytes(self.disk) if self.host_workspace is None else 0))
        try:
            container = self.client.containers.run(
                self.image,
                command=["bash", "--noprofile", "--norc", "-c", _DEADLINE, "dsv4-deadline",
                         f"{self._expires_at:.0f}", str(OWNER_WAIT_S)],
                name=self.name, hostname="sandbox", detach=True, auto_remove=True,
                user="0:0", init=True, working_dir=WORKSPACE,
                network_mode="bridge" if self.network else "none",
                mem_limit=memory_limit, memswap_limit=memory_limit, pids_limit=self.pids,
                nano_cpus=int(self.cpus * 1e9),
                cap_drop=["ALL"], security_opt=["no-new-privileges"],
                read_only=self.read_only, tmpfs=tmpfs, volumes=volumes,
                ulimits=[docker.types.Ulimit(name="nofile", soft=4096, hard=4096)],
                labels=owner_labels(self.name, lifetime, pooled=self._pooled),
            )
        except docker.errors.APIError as exc:
            raise SandboxError(f"could not start a sandbox from {self.image!r}: {exc.explanation or exc}") from exc
        self.container_id = container.id

    def _default_owner(self) -> tuple[int, int]:
        """Commands run as uid 1000, or as the owner of a host workspace when that is not root."""
        if self.host_workspace is not None and self.host_workspace.exists():
            info = self.host_workspace.stat()
            if info.st_uid != 0:
                return info.st_uid, info.st_gid
        return SANDBOX_UID, SANDBOX_UID

    def _check_host_workspace(self) -> None:
        ws = self.host_workspace
        if not ws.exists():
            ws.mkdir(parents=True)
            if os.geteuid() == 0:
                os.chown(ws, self.uid, self.gid)
            return
        if not ws.is_dir():
            raise SandboxError(f"workspace {ws} is not a folder")
        info = ws.stat()
        if info.st_uid != self.uid and not info.st_mode & stat.S_IWOTH:
            raise SandboxError(
                f"workspace {ws} is owned by uid {info.st_uid}, but sandbox commands run as uid {self.uid} "
                f"(never as root): `chown -R {self.uid}:{self.gid} {ws}`, or pass user='<uid>:<gid>' of its owner"
            )

    async def close(self) -> None:
        """Remove the container and everything in it (a tmpfs workspace too; a host folder stays)."""
        with anyio.CancelScope(shield=True):
            await self._driver.close()
            if self.container_id is not None:
                container_id = self.container_id
                await anyio.to_thread.run_sync(lambda: remove_container(self.client, container_id))
                self.container_id = None

    async def pause(self) -> None:
        container_id = self._require_started()
        await anyio.to_thread.run_sync(lambda: self.client.api.pause(container_id))

    async def unpause(self) -> None:
        container_id = self._require_started()
        await anyio.to_thread.run_sync(lambda: self.client.api.unpause(container_id))

    def _require_started(self) -> str:
        if self.container_id is None:
            raise SandboxError("the sandbox is not started: use `async with DockerSandbox(...)` or `await start()`")
        return self.container_id

    # --- commands ----------------------------------------------------------------------------------

    def _open_session(self) -> ShellSession:
        try:
            transport = ExecTransport(self.client.api, self._require_started(), SHELL_ARGV, self.user, self.env)
        except docker.errors.APIError as exc:
            state = self._container_state()
            if state is not None and state["Paused"]:
                raise self._paused_error() from exc
            raise SandboxError(
                f"sandbox {self.name} cannot run commands ({exc.explanation or exc}); it may have passed its "
                f"ttl of {self.ttl:.0f}s or been removed (`dsv4-agent sandbox gc`): start a new one") from exc
        return ShellSession(transport, SHELL_STATE, log_dir="/tmp", output_cap=self.output_cap,
                            data_limit=_bytes(self.memory))

    def _container_state(self) -> dict | None:
        """Docker's `State` of the container (Running, Paused, Status, ...); None once it is gone."""
        try:
            return self.client.api.inspect_container(self._require_started())["State"]
        except docker.errors.NotFound:
            return None

    def _settled_state(self, within_s: float = 5.0) -> dict | None:
        """`_container_state` after an exec failed: Docker may call a killed container running for a moment."""
        give_up = time.monotonic() + within_s
        while (state := self._container_state()) is not None and state["Running"] and not state["Paused"]:
            if time.monotonic() >= give_up:
                break
            time.sleep(0.1)
        return state

    def _paused_error(self) -> SandboxError:
        short = self.container_id[:12]
        return SandboxError(f"the container {short} is paused (`docker pause`); commands run again once it is "
                            f"unpaused (`docker unpause {short}`)")

    def _revive(self, died: ShellDied) -> tuple[ShellSession, str]:
        """After the shell died: a new shell in the same container while that runs, else a new container with
        the same limits and host workspace, so the session outlives it. Returns it and what the model is told."""
        give_up = time.monotonic() + REVIVE_S
        while (state := self._container_state()) is not None and state["Running"]:
            if state["Paused"]:
                raise self._paused_error()
            try:
                return self._open_session(), shell_restarted(died)
            except (SandboxError, ShellDied, EOFError, OSError):
                if time.monotonic() >= give_up:
                    break  # running, but no shell will start in it: replace it
                time.sleep(0.2)  # dying, though Docker still calls it running
        dead = self.container_id
        remove_container(self.client, dead)
        if time.time() >= self._expires_at:
            raise SandboxError(f"the container passed its ttl of {self.ttl:.0f}s; start a new sandbox")
        self.restarts += 1
        self.name = f"{self.name.split('.')[0]}.{self.restarts}"  # the dead one may still hold its name
        self._create_container()
        kept = "the workspace folder was kept" if self.host_workspace else "the in-memory workspace was lost"
        return self._open_session(), (
            f"[sandbox error: the container {dead[:12]} stopped (killed, stopped or removed from outside), so "
            f"what was running did not complete. A new container was started: processes, /tmp and the shell "
            f"state (cwd, environment) were lost; {kept}.]")

    def _interrupt(self) -> None:
        if self.container_id is None:
            return
        try:
            self.client.api.exec_start(self.client.api.exec_create(
                self.container_id, ["bash", "-c", f'read -r g < {SHELL_STATE}/current; kill -KILL -- -"$g"'],
                user=self.user))
        except docker.errors.APIError:
            pass  # container gone or out of pids: the driver replaces the shell if it does not come back

    async def run(self, command: str, timeout: float | None = None, *, background: bool = False) -> CommandResult:
        """Run `command` in the persistent shell; `timeout` defaults to the sandbox's `timeout`. With
        `background`, start it and return at once; its output goes to `log_path` under /tmp.
        A command that finds the container dead fails with a note, and a replacement is started."""
        self._require_started()
        return await self._driver.run(command, self.timeout if timeout is None else timeout, background)

    async def reset(self) -> None:
        """Kill every process of the sandbox user (background jobs, a fork bomb) and forget the shell state;
        the next command starts a fresh shell. Files stay."""
        self._require_started()
        await self._driver.reset(self._kill_everything)

    def _kill_everything(self) -> None:
        argv = ["bash", "-c", f"rm -f {SHELL_STATE}/state; kill -KILL -1"]  # -1: all we may signal but ourselves
        for attempt in range(20):  # under a pids-limit siege the exec itself may fail to fork; retry
            try:
                self.client.api.exec_start(self.client.api.exec_create(self.container_id, argv, user=self.user))
                return
            except docker.errors.APIError as exc:
                failure = exc
                time.sleep(0.05 * (attempt + 1))
        raise SandboxError(f"could not reset the sandbox ({failure}); close it and start a new one")

    # --- files -------------------------------------------------------------------------------------

    async def write_file(self, path: str, data: bytes | str) -> None:
        target = container_path_in_workspace(WORKSPACE, path)
        payload = data.encode() if isinstance(data, str) else bytes(data)
        code, _, err = await self._file_io(_WRITE, target, payload, "written")
        self._raise_file_error(path, code, err, "write")

    async def read_file(self, path: str) -> bytes:
        target = container_path_in_workspace(WORKSPACE, path)
        code, out, err = await self._file_io(_READ, target, b"", "read")
        self._raise_file_error(path, code, err, "read")
        if len(out) > MAX_READ_BYTES:
            raise file_too_big(path)
        return out

    async def _file_io(self, script: str, target: str, stdin: bytes, done: str) -> tuple[int, bytes, str]:
        """`_file_exec` in a worker thread. A container found dead is replaced as a command would replace it,
        and the error says what was lost: the model must hear of it before it goes on."""
        container_id = self._require_started()
        try:
            return await anyio.to_thread.run_sync(self._file_exec, script, target, stdin)
        except (docker.errors.APIError, EOFError, OSError) as exc:
            state = await anyio.to_thread.run_sync(self._settled_state)
            if state is not None and state["Paused"]:
                raise self._paused_error() from exc
            if state is not None and state["Running"]:
                raise SandboxError(f"the sandbox could not move the file ({exc}); try again") from exc
            note = await self._driver.recover(ShellDied("the container stopped"),
                                              still_broken=lambda: self.container_id == container_id)
            if note is None:  # a command running alongside found it dead too, replaced it and said so
                note = "[sandbox error: the container stopped and was replaced meanwhile.]"
            raise SandboxError(f"{note} The file was not {done}: try again.") from exc

    def _file_exec(self, script: str, target: str, stdin: bytes) -> tuple[int, bytes, str]:
        transport = ExecTransport(self.client.api, self._require_started(), ["bash", "-c", script, "file", target],
                                  self.user, self.env)
        try:
            transport.send(b"go\n" + stdin)
            transport.finish_input()
            out, err = bytearray(), bytearray()
            while True:
                try:
                    frame = transport.recv(None)
                except EOFError:
                    break
                if frame is not None:
                    (out if frame[0] == 1 else err).extend(frame[1])
            return transport.exit_code(), bytes(out), err.decode("utf-8", errors="replace").strip()
        finally:
            transport.close()

    def _raise_file_error(self, path: str, code: int, err: str, verb: str) -> None:
        if code == 0:
            return
        if code == 92:
            raise WorkspaceEscapeError(
                f"path {path!r} resolves to {err} (symlinks followed), outside the workspace {WORKSPACE}: "
                "sandbox file IO only reaches the workspace")
        if code == 93:
            raise IsADirectoryError(f"{path!r} is a directory in the sandbox workspace")
        if "No such file" in err:
            raise FileNotFoundError(f"no file {path!r} in the sandbox workspace ({err})")
        if "Permission denied" in err:
            raise PermissionError(f"cannot {verb} {path!r} in the sandbox: {err}")
        raise OSError(f"could not {verb} {path!r} in the sandbox (exit {code}): {err}")


_reaped_in_this_process = False


def _reap_once(client: docker.DockerClient) -> None:
    """The start-up reconciliation: the first sandbox of a process removes what dead owners left behind."""
    global _reaped_in_this_process
    if not _reaped_in_this_process:
        reap(client)
        _reaped_in_this_process = True


def _parse_user(user: str) -> tuple[int, int]:
    """'1000' or '1000:1000' -> (uid, gid); root is refused: commands never run as root."""
    uid_text, _, gid_text = user.partition(":")
    try:
        uid, gid = int(uid_text), int(gid_text or uid_text)
    except ValueError:
        raise ValueError(f"user must be numeric 'uid' or 'uid:gid', got {user!r}") from None
    if uid == 0:
        raise ValueError("sandbox commands never run as root (uid 0): pass a non-root user='uid:gid'")
    return uid, gid


def _bytes(size: str) -> int:
    """Docker-style sizes ('512m', '1g', '100k', '4096') in bytes."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    text = size.strip().lower().rstrip("b")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise ValueError(f"bad size {size!r}: use bytes or a number with k, m, g or t (e.g. '512m')") from None
