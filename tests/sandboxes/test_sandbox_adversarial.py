"""Hostile commands: each is contained, the sandbox (or the next one) keeps working, the host is untouched."""
from __future__ import annotations

import shutil
import time

import pytest

from sandboxes import DockerSandbox

pytestmark = [pytest.mark.docker, pytest.mark.anyio]


async def test_a_backgrounded_fork_bomb_ends_with_its_command_and_the_shell_survives(sandbox_image, docker_client):
    async with DockerSandbox(sandbox_image, pids=64) as sb:
        await sb.run("cd /tmp && export KEPT=yes")
        # The classic bomb backgrounds itself and returns at once. Before, it kept the pids limit full: the
        # next command printed "fork: retry" noise and the one after killed the session shell (state lost).
        for _ in range(3):
            await sb.run(":(){ :|:& };:", timeout=10)
            r = await sb.run('ps -e --no-headers | wc -l; echo "$KEPT $PWD"')
            assert (r.exit_code, r.stderr) == (0, ""), r.stderr[:300]
            count, kept = r.stdout.split("\n", 1)
            assert int(count) < 10 and kept == "yes /tmp\n", r.stdout
        pids = docker_client.api.stats(sb.container_id, stream=False)["pids_stats"]["current"]
        assert pids < 10 and sb.restarts == 0


async def test_foreground_fork_bomb_is_killed_at_its_timeout(sandbox_image):
    async with DockerSandbox(sandbox_image, pids=64) as sb:
        count = "ps -e --no-headers | wc -l"
        before = int((await sb.run(count)).stdout)
        r = await sb.run("bomb() { bomb | bomb; }; bomb", timeout=2)
        assert r.timed_out
        assert int((await sb.run(count)).stdout) <= before, "bomb processes survived the timeout"


async def test_processes_together_stop_at_the_container_limit_and_the_shell_survives(sandbox_image):
    # each stays under `memory` (its data ulimit); together they pass the cgroup limit: 128 + 32 + 16 + 64 MiB
    async with DockerSandbox(sandbox_image, memory="128m", disk="64m", tmp_size="32m") as sb:
        hog = "python3 -c \"import time; b = b'x' * (100 * 2**20); time.sleep(3)\"; echo exit=$?"
        r = await sb.run(f"for i in 1 2 3 4; do ({hog}) & done; wait", timeout=60)
        assert "exit=137" in r.stdout, r.stdout  # the OOM killer ended one
        assert (await sb.run("echo alive")).stdout == "alive\n"


async def test_disk_fill_stops_at_the_workspace_limit_and_the_host_is_untouched(sandbox_image, docker_client):
    free_before = shutil.disk_usage("/var/lib/docker" if shutil.os.path.isdir("/var/lib/docker") else "/").free
    # A workspace much larger than the process memory: tmpfs pages count as memory, yet the fill must end in
    # "No space left", not in the OOM killer taking the sandbox down.
    async with DockerSandbox(sandbox_image, disk="32m", tmp_size="16m", memory="8m") as sb:
        r = await sb.run("head -c 500M /dev/zero > /workspace/one-big-file", timeout=30)
        assert r.exit_code == 1 and "No space left" in r.stderr
        r = await sb.run("rm /workspace/one-big-file; "
                         "for i in $(seq 10); do head -c 8M /dev/zero > /workspace/f$i || break; done; "
                         "du -sm /workspace | cut -f1", timeout=30)
        assert "No space left" in r.stderr and int(r.stdout) <= 32  # the tmpfs quota
        r = await sb.run("head -c 100M /dev/zero > /tmp/fill; echo rc=$?; head -c 1M /dev/zero > /opt/x; echo rc=$?")
        assert r.stdout == "rc=1\nrc=1\n"
        assert "No space left" in r.stderr and "Read-only file system" in r.stderr
        await sb.run("rm -f /workspace/* /tmp/fill")
        await sb.write_file("after.txt", b"still works")
        assert await sb.read_file("after.txt") == b"still works"
        [listed] = docker_client.api.containers(all=True, size=True, filters={"id": sb.container_id})
        size_rw = listed.get("SizeRw", 0)
        assert size_rw < 2**20, f"the container wrote {size_rw} bytes to its layer on the host disk"
    free_after = shutil.disk_usage("/var/lib/docker" if shutil.os.path.isdir("/var/lib/docker") else "/").free
    assert free_before - free_after < 100 * 2**20


async def test_endless_output_is_capped_and_killed(sandbox_image):
    async with DockerSandbox(sandbox_image, output_cap=8192) as sb:
        started = time.monotonic()
        r = await sb.run("yes 'endless output'", timeout=1.5)
        assert r.timed_out and r.truncated and "bytes elided" in r.stdout and len(r.stdout) < 8192 + 300
        assert time.monotonic() - started < 6
        assert (await sb.run("echo next")).stdout == "next\n"


async def test_infinite_loop_is_killed_and_cpu_is_capped(sandbox_image):
    async with DockerSandbox(sandbox_image, cpus=0.5) as sb:
        r = await sb.run("while :; do :; done", timeout=1)
        assert r.timed_out and r.exit_code == -1
        quota = (await sb.run("cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null "
                              "|| cut -d' ' -f1 /sys/fs/cgroup/cpu.max")).stdout
        assert int(quota) == 50000  # half of the default 100 ms period
        assert (await sb.run("echo ok")).stdout == "ok\n"


async def test_no_network_without_opt_in(sandbox_image):
    async with DockerSandbox(sandbox_image) as sb:
        r = await sb.run(
            "python3 -c \"import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)\"; "
            "getent hosts deb.debian.org; echo dns=$?", timeout=20)
    assert "Network is unreachable" in r.stderr and "dns=2" in r.stdout


async def test_writes_outside_the_workspace_fail_and_the_host_is_untouched(sandbox_image, tmp_path):
    ws = tmp_path / "ws"
    async with DockerSandbox(sandbox_image, workspace=ws) as sb:
        r = await sb.run("{ for p in /etc/passwd /usr/bin/evil /root/x /evil ../escape.txt; do echo x > $p; done; }"
                         " 2>&1; ls / | grep -c evil")
        assert r.stdout.count("Read-only file system") + r.stdout.count("Permission denied") == 5
        assert r.stdout.rstrip().endswith("0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"], "something was written next to the workspace"
    assert list(ws.iterdir()) == []
