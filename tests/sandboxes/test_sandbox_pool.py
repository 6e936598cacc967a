"""SandboxPool: paused, ready sandboxes handed out unpaused, refilled in the background, removed at close."""
from __future__ import annotations

import anyio
import docker.errors
import pytest

from sandboxes.pool import SandboxPool

pytestmark = [pytest.mark.docker, pytest.mark.anyio]


def _state(client, container_id):
    return client.api.inspect_container(container_id)["State"]["Status"]


async def test_pool_hands_out_ready_sandboxes_and_refills(sandbox_image, docker_client):
    async with SandboxPool(size=1, image=sandbox_image, memory="256m") as pool:
        await pool.fill()
        [waiting] = pool._ready
        assert _state(docker_client, waiting.container_id) == "paused"
        async with pool.sandbox() as sb:
            assert sb is waiting and _state(docker_client, sb.container_id) == "running"
            r = await sb.run("cd /tmp && export X=1 && echo ready")
            assert (r.exit_code, r.stdout) == (0, "ready\n")
            with anyio.fail_after(30):
                while len(pool._ready) < 1:  # the background filler replaces the one taken
                    await anyio.sleep(0.1)
        assert pool._ready[0] is not sb
        second = await pool.acquire()
        try:
            r = await second.run('pwd; echo "[${X-}]"')
            assert r.stdout == "/workspace\n[]\n", "a pooled sandbox shares nothing with the previous one"
        finally:
            await second.close()
        leftover = [s.container_id for s in pool._ready]
    for container_id in leftover:
        with pytest.raises(docker.errors.NotFound):
            _state(docker_client, container_id)


async def test_empty_pool_starts_a_sandbox_cold(sandbox_image):
    pool = SandboxPool(size=1, image=sandbox_image)  # never entered: no background filling
    async with pool.sandbox() as sb:
        assert (await sb.run("echo cold")).stdout == "cold\n"


def test_pool_refuses_a_shared_host_workspace(tmp_path):
    with pytest.raises(ValueError, match="own tmpfs workspace"):
        SandboxPool(size=1, workspace=tmp_path)
    with pytest.raises(ValueError, match="at least 1"):
        SandboxPool(size=0)
