"""Nothing leaks: whatever moment a sandbox's owner is SIGKILLed at, its containers, shells and folders go.

Invariants (issue 13): no container outlives its owner by more than 30 s, none outlives its `ttl`, with no
other sandbox started afterwards; a `--sandbox local` run's shell, command, watchdog and state folder go
with it. Owner processes below kill themselves at chosen moments of start-up by patching docker-py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import docker.errors
import pytest
from typer.testing import CliRunner

from sandboxes import DockerSandbox
from sandboxes.cli import sandbox_app
from sandboxes.container import _DEADLINE, OWNER_FIFO
from sandboxes.guard import session_members
from sandboxes.owner import OWNER_PID, list_sandboxes, owner_labels, owner_state

pytestmark = pytest.mark.docker
ROOT = Path(__file__).resolve().parents[2]
ORPHAN_LIMIT_S = 30  # the bound: how long a container may outlive its owner

# An owner process that prints the id of its container and dies (SIGKILL) at the moment named by argv[1]:
#   created  between the create and the start (a "Created" container: auto-remove never removes it)
#   started  right after the start, likely before the deadline process has opened the owner fifo
#   running  once its shell answered, with a command running (killed by the test)
#   pool     with a paused, ready pool member (killed by the test)
OWNER = """
import os, signal, sys, anyio, docker.api.client
from sandboxes import DockerSandbox
from sandboxes.pool import SandboxPool

moment, image = sys.argv[1:]
start = docker.api.client.APIClient.start

def start_then_die(self, container, *args, **kwargs):
    if moment == "started":
        start(self, container, *args, **kwargs)
    print(container, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

docker.api.client.APIClient.start = start_then_die

async def main():
    if moment == "pool":
        pool = SandboxPool(size=1, image=image)
        await pool.fill()
        print(pool._ready[0].container_id, flush=True)
    else:
        sandbox = DockerSandbox(image)
        await sandbox.start()
        print(sandbox.container_id, flush=True)
        await sandbox.run("sleep 1000")

if moment in ("running", "pool"):
    docker.api.client.APIClient.start = start
anyio.run(main)
"""

# A later process that only starts (and closes) a sandbox: its start-up reaps what dead owners left.
STARTER = """
import sys, anyio
from sandboxes import DockerSandbox

async def main(image):
    async with DockerSandbox(image) as sandbox:
        await sandbox.run("true")

anyio.run(main, sys.argv[1])
"""


def _spawn(owners: set[int], code: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    owners.add(proc.pid)
    return proc


def _status(client, container_id: str) -> str | None:
    try:
        return client.api.inspect_container(container_id)["State"]["Status"]
    except docker.errors.NotFound:
        return None


def _wait(condition, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _wait_gone(client, container_id: str, within_s: float) -> bool:
    return _wait(lambda: _status(client, container_id) is None, within_s)


@pytest.mark.parametrize("moment", ["created", "started", "running", "pool"])
def test_no_container_outlives_an_owner_sigkilled_at_any_moment(moment, sandbox_image, docker_client,
                                                                leak_checked_owners):
    owner = _spawn(leak_checked_owners, OWNER, moment, sandbox_image)
    container_id = owner.stdout.readline().strip()
    assert container_id, f"the owner died before it reached the moment {moment!r}"
    if moment in ("running", "pool"):
        owner.send_signal(signal.SIGKILL)
    assert owner.wait(timeout=60) == -signal.SIGKILL
    owner.stdout.close()
    died = time.monotonic()
    if moment == "created":
        assert _status(docker_client, container_id) in ("created", None)
    assert _wait_gone(docker_client, container_id, ORPHAN_LIMIT_S), (
        f"a {_status(docker_client, container_id)} container outlived its owner by {ORPHAN_LIMIT_S}s")
    left = docker_client.api.containers(all=True, filters={"label": f"{OWNER_PID}={owner.pid}"})
    assert not left and time.monotonic() - died <= ORPHAN_LIMIT_S


def test_a_sigkilled_local_run_takes_its_shell_command_watchdog_and_folder_along(tmp_path, leak_checked_owners):
    from agent import completion

    script = tmp_path / "turns.json"
    script.write_text(json.dumps([
        completion("A server.", calls=[("bash", {"command": "sleep 1000", "background": True})]),
        completion("A long command.", calls=[("bash", {"timeout": 900, "command": (
            'echo "$PPID ${__dsv4_state%/*}" > info.part && mv info.part info; sleep 1000')})]),
        completion("Done.", content="never reached"),
    ]))
    workspace = tmp_path / "ws"
    run = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "wait", "--scripted", str(script), "--sandbox", "local",
         "--yolo", "--workspace", str(workspace), "-o", str(tmp_path / "runs")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert _wait((workspace / "info").exists, 120), "the run never reached its long command"
        sid, state_dir = (workspace / "info").read_text().split()
        members = session_members(int(sid))
        assert len(members) >= 5, members  # the shell, the server, the command in its runner, its watchdog
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    assert _wait(lambda: not session_members(int(sid)), ORPHAN_LIMIT_S), \
        f"processes of the killed run's shell still run: {session_members(int(sid))}"
    assert _wait(lambda: not Path(state_dir).exists(), ORPHAN_LIMIT_S), f"{state_dir} outlived its run"


# --- the deadline process in the container, on its own ---------------------------------------------------


def _deadline_container(client, image: str, fifo: Path, ttl_s: float, owner_wait_s: int) -> str:
    """A container running only the deadline process, with `fifo` as its owner fifo; owned by this test."""
    container = client.containers.run(
        image, command=["bash", "--noprofile", "--norc", "-c", _DEADLINE, "dsv4-deadline",
                        f"{time.time() + ttl_s:.0f}", str(owner_wait_s)],
        detach=True, auto_remove=True, user="0:0", init=True, network_mode="none", cap_drop=["ALL"],
        read_only=True, tmpfs={"/tmp": "rw,size=1m"}, volumes={str(fifo): {"bind": OWNER_FIFO, "mode": "ro"}},
        labels=owner_labels("deadline-test", ttl_s))
    return container.id


@pytest.fixture
def fifo():
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "owner.fifo"
        os.mkfifo(path, 0o644)
        yield path


def _alive_for(client, container_id: str, within_s: float) -> float:
    started = time.monotonic()
    try:
        assert _wait_gone(client, container_id, within_s), f"the container outlived {within_s}s"
    finally:
        if _status(client, container_id) is not None:
            client.api.remove_container(container_id, force=True)
    return time.monotonic() - started


def test_a_container_whose_owner_died_before_it_started_ends_itself(sandbox_image, docker_client, fifo):
    # No writer ever opens the fifo: before, the deadline process blocked in the open forever, ttl or not.
    container_id = _deadline_container(docker_client, sandbox_image, fifo, ttl_s=3600, owner_wait_s=2)
    assert _alive_for(docker_client, container_id, ORPHAN_LIMIT_S) >= 1


def test_the_ttl_holds_while_the_owner_fifo_cannot_be_opened(sandbox_image, docker_client, fifo):
    container_id = _deadline_container(docker_client, sandbox_image, fifo, ttl_s=3, owner_wait_s=3600)
    assert _alive_for(docker_client, container_id, ORPHAN_LIMIT_S) >= 1


def test_a_container_ends_itself_when_its_owner_closes_the_fifo(sandbox_image, docker_client, fifo):
    writer = os.open(fifo, os.O_RDWR)  # the owner, alive
    try:
        container_id = _deadline_container(docker_client, sandbox_image, fifo, ttl_s=3600, owner_wait_s=2)
        time.sleep(0.1)
        assert _wait(lambda: _status(docker_client, container_id) == "running", 30)
        # still up well past owner_wait_s: the owner held the fifo, so it was opened
        assert not _wait(lambda: _status(docker_client, container_id) is None, 5)
    finally:
        os.close(writer)  # the owner dies
    assert _alive_for(docker_client, container_id, ORPHAN_LIMIT_S) < ORPHAN_LIMIT_S


@pytest.mark.anyio
async def test_the_hard_ttl_ends_a_live_sandbox(sandbox_image, docker_client):
    sandbox = DockerSandbox(sandbox_image, ttl=2)
    await sandbox.start()
    try:
        assert (await sandbox.run("echo up")).stdout == "up\n"
        assert _wait_gone(docker_client, sandbox.container_id, within_s=10)
        result = await sandbox.run("echo after")
        assert result.exit_code == -1 and "sandbox error" in result.stderr and "ttl" in result.stderr
    finally:
        await sandbox.close()


@pytest.mark.anyio
async def test_a_pool_never_keeps_a_member_past_its_ttl(sandbox_image, docker_client):
    from sandboxes.pool import SandboxPool

    async with SandboxPool(size=1, image=sandbox_image, ttl=10) as pool:
        await pool.fill()
        [first] = pool._ready
        first_id = first.container_id
        # paused, it cannot end itself at its ttl: the pool replaces it once half its life is gone
        with anyio.fail_after(30):
            while _status(docker_client, first_id) is not None or not pool._ready:
                await anyio.sleep(0.1)
        assert pool._ready[0] is not first


# --- the reaper (the next start, `sandbox gc`) for owners whose guard could not act -----------------------


def _dead_owners_container(client, image: str, owners: set[int]) -> str:
    labels = {**owner_labels("dead-owner", 3600), OWNER_PID: "999999999"}  # above any pid_max: never alive
    owners.add(999999999)
    return client.containers.run(image, ["sleep", "600"], detach=True, network_mode="none", labels=labels).id


def test_gc_removes_a_dead_owners_container(sandbox_image, docker_client, leak_checked_owners):
    container_id = _dead_owners_container(docker_client, sandbox_image, leak_checked_owners)
    [info] = [i for i in list_sandboxes(docker_client) if container_id.startswith(i.id)]
    assert info.owner_state == "dead" and info.reap_reason() == "owner process is gone"
    result = CliRunner().invoke(sandbox_app, ["gc"])
    assert result.exit_code == 0 and f"removed {container_id[:12]}" in result.output
    assert _status(docker_client, container_id) is None


def test_the_next_start_reaps_a_dead_owners_containers(sandbox_image, docker_client, leak_checked_owners):
    container_id = _dead_owners_container(docker_client, sandbox_image, leak_checked_owners)
    starter = _spawn(leak_checked_owners, STARTER, sandbox_image)
    assert starter.wait(timeout=60) == 0
    starter.stdout.close()
    assert _status(docker_client, container_id) is None


def test_owner_state_tells_live_dead_and_foreign_owners():
    mine = owner_labels("x", 60)
    assert owner_state(mine) == "alive"
    assert owner_state({**mine, "dsv4.owner.start": "1"}) == "dead"  # same pid, other process (pid reuse)
    assert owner_state({**mine, "dsv4.owner.pid": "999999999"}) == "dead"
    assert owner_state({**mine, "dsv4.owner.host": "elsewhere"}) == "unknown"


def test_cli_ls_lists_a_live_sandbox(sandbox_image, docker_client):
    async def scenario():
        async with DockerSandbox(sandbox_image) as sb:
            result = CliRunner().invoke(sandbox_app, ["ls", "--json"])
            assert result.exit_code == 0
            assert sb.name in result.output and '"owner_state": "alive"' in result.output
            gc = CliRunner().invoke(sandbox_app, ["gc"])
            assert gc.exit_code == 0 and sb.name not in gc.output  # a live owner's sandbox is kept
            assert (await sb.run("echo kept")).stdout == "kept\n"

    anyio.run(scenario)


def test_the_owner_fifo_is_opened_once_per_process():
    from sandboxes.owner import owner_fifo

    first = owner_fifo()
    fds_before = len(os.listdir("/proc/self/fd"))
    assert owner_fifo() == first and Path(first).is_fifo()
    assert len(os.listdir("/proc/self/fd")) == fds_before
