"""Nothing leaks: a SIGKILLed owner's sandbox ends itself, its paused pool is reaped at the next start or by gc."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import docker.errors
import pytest
from typer.testing import CliRunner

from sandboxes import DockerSandbox
from sandboxes.cli import sandbox_app
from sandboxes.owner import list_sandboxes, owner_labels, owner_state

pytestmark = pytest.mark.docker
ROOT = Path(__file__).resolve().parents[2]

# An owner process: starts a sandbox (or a warm pool of one), prints the container id, then waits to be killed.
OWNER = """
import sys, anyio
from sandboxes import DockerSandbox
from sandboxes.pool import SandboxPool

async def main(mode, image):
    if mode == "pool":
        pool = SandboxPool(size=1, image=image)
        await pool.fill()
        print(pool._ready[0][1].container_id, flush=True)
    else:
        sandbox = DockerSandbox(image)
        await sandbox.start()
        await sandbox.run("sleep 1000 &")
        print(sandbox.container_id, flush=True)
    await anyio.sleep(1000)

anyio.run(main, *sys.argv[1:])
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


def _sigkilled_owner(owners: set[int], mode: str, image: str) -> str:
    owner = _spawn(owners, OWNER, mode, image)
    container_id = owner.stdout.readline().strip()
    assert container_id, "the owner process did not start its sandbox"
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    owner.stdout.close()
    return container_id


def _status(client, container_id: str) -> str | None:
    try:
        return client.api.inspect_container(container_id)["State"]["Status"]
    except docker.errors.NotFound:
        return None


def _wait_gone(client, container_id: str, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if _status(client, container_id) is None:
            return True
        time.sleep(0.25)
    return False


def test_a_sigkilled_owners_sandbox_ends_itself(sandbox_image, docker_client, leak_checked_owners):
    container_id = _sigkilled_owner(leak_checked_owners, "sandbox", sandbox_image)
    # The daemon closes the shell's stdin; the deadline process sees no live shell for 3 s and exits.
    assert _wait_gone(docker_client, container_id, within_s=15), "the orphaned sandbox is still there"


def test_a_sigkilled_owners_paused_pool_is_reaped_by_gc(sandbox_image, docker_client, leak_checked_owners):
    container_id = _sigkilled_owner(leak_checked_owners, "pool", sandbox_image)
    time.sleep(2.5)  # longer than the dead-man switch needs: a paused container cannot act on its own
    status = _status(docker_client, container_id)
    # None: a process sharing this engine started a sandbox meanwhile, and its start-up reaper removed it.
    assert status in ("paused", None)
    if status is None:
        return
    [info] = [i for i in list_sandboxes(docker_client) if container_id.startswith(i.id)]
    assert info.owner_state == "dead" and info.pooled and info.reap_reason() == "owner process is gone"
    result = CliRunner().invoke(sandbox_app, ["gc"])
    assert result.exit_code == 0 and f"removed {container_id[:12]}" in result.output
    assert _status(docker_client, container_id) is None


def test_the_next_start_reaps_a_dead_owners_containers(sandbox_image, docker_client, leak_checked_owners):
    container_id = _sigkilled_owner(leak_checked_owners, "pool", sandbox_image)
    starter = _spawn(leak_checked_owners, STARTER, sandbox_image)
    assert starter.wait(timeout=60) == 0
    starter.stdout.close()
    assert _status(docker_client, container_id) is None


@pytest.mark.anyio
async def test_the_hard_ttl_ends_a_live_sandbox(sandbox_image, docker_client):
    sandbox = DockerSandbox(sandbox_image, ttl=2)
    await sandbox.start()
    try:
        assert (await sandbox.run("echo up")).stdout == "up\n"
        assert _wait_gone(docker_client, sandbox.container_id, within_s=10)
        result = await sandbox.run("echo after")
        assert result.exit_code == -1 and "sandbox error" in result.stderr
    finally:
        await sandbox.close()


def test_owner_state_tells_live_dead_and_foreign_owners():
    mine = owner_labels("x", 60)
    assert owner_state(mine) == "alive"
    assert owner_state({**mine, "dsv4.owner.start": "1"}) == "dead"  # same pid, other process (pid reuse)
    assert owner_state({**mine, "dsv4.owner.pid": "999999999"}) == "dead"
    assert owner_state({**mine, "dsv4.owner.host": "elsewhere"}) == "unknown"


def test_cli_ls_lists_a_live_sandbox(sandbox_image, docker_client):
    import anyio

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
