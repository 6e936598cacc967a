"""Faults injected from outside a running sandbox (issue 13): each test asserts the invariant that must hold
afterwards, not merely the absence of a crash. Waits poll with deadlines: generous, bounded, never a fixed
sleep that assumes a fast machine."""
from __future__ import annotations

import time
from pathlib import Path

import anyio
import docker.errors
import pytest

from sandboxes import DockerSandbox, SandboxError

pytestmark = [pytest.mark.docker, pytest.mark.anyio]


async def _until(check, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"{what} within {within_s:g}s"
        await anyio.sleep(0.05)


def _exists(client, container_id: str) -> bool:
    try:
        client.api.inspect_container(container_id)
        return True
    except docker.errors.NotFound:
        return False


# --- 1. the container is killed, removed, stopped or paused under the session ------------------------------

FAULTS = {
    "kill": lambda client, cid: client.api.kill(cid),
    "rm -f": lambda client, cid: client.api.remove_container(cid, force=True),
    "stop": lambda client, cid: client.api.stop(cid, timeout=2),
}


@pytest.mark.parametrize("fault", FAULTS)
async def test_a_container_lost_during_a_command_is_replaced_and_the_model_told(
        fault, sandbox_image, docker_client, tmp_path):
    ws = tmp_path / "ws"
    async with DockerSandbox(sandbox_image, workspace=ws, timeout=60) as sb:
        await sb.run("echo saved > kept.txt; cd /tmp && export LOST=yes")
        first = sb.container_id

        async def inject() -> None:
            await _until((ws / "running").exists, 30, "the command started")
            await anyio.to_thread.run_sync(FAULTS[fault], docker_client, first)

        async with anyio.create_task_group() as tg:
            tg.start_soon(inject)
            r = await sb.run("touch /workspace/running; sleep 50; echo never")
        assert r.exit_code == -1 and "never" not in r.stdout
        assert "new container was started" in r.stderr and "shell state (cwd, environment) were lost" in r.stderr
        assert sb.restarts == 1 and sb.container_id != first
        for _ in range(3):  # the replacement answers, again and again
            r = await sb.run('cat kept.txt; pwd; echo "[${LOST-}]"')
            assert (r.exit_code, r.stdout) == (0, "saved\n/workspace\n[]\n")
        assert sb.restarts == 1
        await _until(lambda: not _exists(docker_client, first), 30, "the lost container was removed")


async def test_an_engine_that_still_calls_a_killed_container_running_does_not_fool_the_revival(sandbox_image):
    # Docker reports "running" for a moment after the exec connection drops; here that moment lasts 3 s.
    client = docker.from_env()
    inspect, lag_until = client.api.inspect_container, [0.0]

    def lagging_inspect(container_id):
        if time.monotonic() < lag_until[0]:
            return {"State": {"Status": "running", "Running": True, "Paused": False}}
        return inspect(container_id)

    client.api.inspect_container = lagging_inspect
    async with DockerSandbox(sandbox_image, timeout=60, client=client) as sb:
        await sb.run("export LOST=yes")
        lag_until[0] = time.monotonic() + 3
        client.api.kill(sb.container_id)
        r = await sb.run("echo never")
        assert r.exit_code == -1 and "new container was started" in r.stderr and sb.restarts == 1
        r = await sb.run('echo "[${LOST-}]"')
        assert (r.exit_code, r.stdout) == (0, "[]\n")


async def test_a_container_lost_between_commands_is_replaced_for_commands_and_file_io(sandbox_image, docker_client):
    async with DockerSandbox(sandbox_image, timeout=60) as sb:
        await sb.write_file("a.txt", "before")
        docker_client.api.kill(sb.container_id)
        with pytest.raises(SandboxError, match="new container was started.*in-memory workspace was lost"):
            await sb.read_file("a.txt")  # the model hears of the loss before it goes on
        assert sb.restarts == 1
        await sb.write_file("b.txt", "after")
        assert await sb.read_file("b.txt") == b"after"
        docker_client.api.remove_container(sb.container_id, force=True)
        r = await sb.run("echo never")
        assert r.exit_code == -1 and "new container was started" in r.stderr and sb.restarts == 2
        assert (await sb.run("echo works")).stdout == "works\n"


async def test_a_paused_container_is_a_clear_error_at_once(sandbox_image, docker_client):
    async with DockerSandbox(sandbox_image, timeout=60) as sb:
        await sb.run("export KEPT=yes")
        docker_client.api.pause(sb.container_id)
        try:
            started = time.monotonic()
            r = await sb.run("echo hi")  # before: no answer until timeout + 10 s (70 s here)
            assert r.exit_code == -1 and "is paused" in r.stderr and "docker unpause" in r.stderr
            assert time.monotonic() - started < 15
            started = time.monotonic()
            with pytest.raises(SandboxError, match="is paused"):
                await sb.run("echo hi")
            assert time.monotonic() - started < 5
        finally:
            docker_client.api.unpause(sb.container_id)
        r = await sb.run('echo "$KEPT"')
        assert (r.exit_code, r.stdout, sb.restarts) == (0, "yes\n", 0)


# --- 4. memory bounds the processes; disk bounds the workspace, or is refused ------------------------------


async def test_memory_bounds_what_a_process_can_allocate(sandbox_image):
    # the cgroup holds memory + /tmp + the workspace (1.5 GiB here): before, a process could take all of it
    async with DockerSandbox(sandbox_image, memory="256m", timeout=60) as sb:
        r = await sb.run("python3 -c \"b = b'x' * (700 * 2**20); print(len(b))\"")
        assert r.exit_code != 0 and "MemoryError" in r.stderr and r.stdout == ""
        r = await sb.run("python3 -c \"b = b'x' * (150 * 2**20); print(len(b))\"")
        assert (r.exit_code, r.stdout) == (0, f"{150 * 2**20}\n")


def test_disk_is_refused_for_a_host_folder_it_cannot_bound(tmp_path):
    # before, disk="1g" with a host folder accepted 2.1 GB
    with pytest.raises(ValueError, match="host-folder workspace has no quota"):
        DockerSandbox(workspace=tmp_path, disk="1g")
    assert DockerSandbox(workspace=tmp_path).host_workspace == tmp_path


# --- 5. a full /tmp, deleted shell state: the sandbox heals; a timeout is always reported as one -----------


async def test_a_full_tmp_and_deleted_shell_state_heal(sandbox_image):
    async with DockerSandbox(sandbox_image, tmp_size="16m", timeout=30) as sb:
        r = await sb.run("head -c 64M /dev/zero > /tmp/fill; mkdir -p /workspace/d && cd /workspace/d && export A=1")
        assert "No space left" in r.stderr
        assert (await sb.run('pwd; echo "$A"')).stdout == "/workspace/d\n1\n"
        r = await sb.run("sleep 30", timeout=0.5)
        assert r.timed_out and r.exit_code == -1
        # the shell's own files go, from the side (as a background job would do it)
        await sb.run("rm -rf /run/dsv4-shell/* /run/dsv4-shell/.[!.]*", background=True)
        await sb.run("true")
        r = await sb.run("sleep 30", timeout=0.5)
        assert r.timed_out and r.exit_code == -1
        await sb.run("cd /tmp && export B=2")
        assert (await sb.run('pwd; echo "$B"')).stdout == "/tmp\n2\n"
        with anyio.move_on_after(0.5):  # cancelling still finds the running command
            await sb.run("sleep 60", timeout=100)
        assert (await sb.run("ps -eo comm | grep -c '^sleep$'")).stdout == "0\n"
        assert sb.restarts == 0


async def test_a_shell_state_that_cannot_be_saved_whole_is_dropped_with_a_note(sandbox_image):
    async with DockerSandbox(sandbox_image, timeout=30) as sb:
        await sb.run("cd /tmp && export KEPT=1")
        r = await sb.run("head -c 32M /dev/zero > /run/dsv4-shell/fill; cd /; "
                         "export BIG=$(head -c 100000 /dev/zero | tr '\\0' x)")
        assert "shell state (cwd, environment) could not be saved" in r.stderr
        # not restored in half (the cd without BIG): the next command starts afresh, as it was told
        assert (await sb.run('pwd; echo "[${KEPT-}${BIG-}]"')).stdout == "/workspace\n[]\n"
        await sb.run("rm /run/dsv4-shell/fill; cd /tmp")
        assert (await sb.run("pwd")).stdout == "/tmp\n"


async def test_only_a_timeout_is_reported_as_a_timeout(sandbox_image):
    async with DockerSandbox(sandbox_image, timeout=30) as sb:
        r = await sb.run("kill -KILL $$")  # 137 of its own doing
        assert (r.exit_code, r.timed_out) == (137, False)
        r = await sb.run("trap '' TERM; sleep 30", timeout=0.5)
        assert (r.exit_code, r.timed_out) == (-1, True)
