"""DockerSandbox: the shell protocol in a hardened container, files over exec streams, the hardening itself."""
from __future__ import annotations

import os
import time

import anyio
import pytest

from sandboxes import DockerSandbox, ImageError, Sandbox, SandboxError, WorkspaceEscapeError

pytestmark = [pytest.mark.docker, pytest.mark.anyio]


@pytest.fixture
async def sandbox(sandbox_image):
    async with DockerSandbox(sandbox_image, timeout=20, memory="256m", pids=128) as sb:
        yield sb


async def test_satisfies_the_protocol(sandbox):
    assert isinstance(sandbox, Sandbox)


async def test_exit_code_streams_and_state_persist(sandbox):
    r = await sandbox.run("echo out; echo err >&2; exit 4")
    assert (r.exit_code, r.stdout, r.stderr) == (4, "out\n", "err\n")
    await sandbox.run("mkdir -p src && cd src && export MODE=test && alias ll='ls -l'")
    r = await sandbox.run('pwd; echo "$MODE"')
    assert r.stdout == "/workspace/src\ntest\n"


async def test_timeout_kills_in_the_container_and_the_shell_survives(sandbox):
    started = time.monotonic()
    r = await sandbox.run("sleep 100 & sleep 100; echo never", timeout=0.5)
    assert r.timed_out and r.exit_code == -1 and "never" not in r.stdout
    assert time.monotonic() - started < 5
    r = await sandbox.run("ps -eo comm | grep -c '^sleep$'")
    assert r.stdout.strip() == "0", "the command's processes outlived its timeout"
    assert (await sandbox.run("echo alive")).stdout == "alive\n"


async def test_cancelling_run_kills_the_command_in_the_container(sandbox):
    with anyio.move_on_after(0.5):
        await sandbox.run("sleep 60", timeout=100)
    r = await sandbox.run("ps -eo comm | grep -c '^sleep$'")
    assert r.stdout.strip() == "0"


async def test_output_cap_states_the_elision(sandbox_image):
    async with DockerSandbox(sandbox_image, output_cap=2000) as sb:
        r = await sb.run("seq 1 200000")
    assert r.truncated and r.stdout.startswith("1\n2\n") and r.stdout.endswith("199999\n200000\n")
    assert "bytes elided" in r.stdout


async def test_file_round_trips_text_binary_and_large(sandbox):
    blob = os.urandom(3 * 2**20) + bytes(range(256))
    await sandbox.write_file("data/blob.bin", blob)
    await sandbox.write_file("/workspace/notes.md", "# ünïcode\n")
    assert await sandbox.read_file("data/blob.bin") == blob
    assert await sandbox.read_file("notes.md") == "# ünïcode\n".encode()
    r = await sandbox.run("sha256sum data/blob.bin | cut -c1-64")
    import hashlib

    assert r.stdout.strip() == hashlib.sha256(blob).hexdigest()
    await sandbox.write_file("empty", b"")
    assert await sandbox.read_file("empty") == b""


async def test_file_errors_are_clear(sandbox):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        await sandbox.read_file("missing.txt")
    await sandbox.run("mkdir d")
    with pytest.raises(IsADirectoryError):
        await sandbox.read_file("d")


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "a/../../tmp/x"])
async def test_file_io_outside_the_workspace_is_refused(sandbox, path):
    with pytest.raises(WorkspaceEscapeError, match="outside the workspace"):
        await sandbox.write_file(path, b"x")
    with pytest.raises(WorkspaceEscapeError):
        await sandbox.read_file(path)


async def test_symlink_escape_is_refused_in_the_container(sandbox):
    await sandbox.run("ln -s /tmp escape")
    with pytest.raises(WorkspaceEscapeError, match="/tmp/x"):
        await sandbox.write_file("escape/x", b"x")
    assert (await sandbox.run("test -e /tmp/x; echo $?")).stdout == "1\n"


async def test_hardening_is_in_place(sandbox, docker_client):
    r = await sandbox.run("id -u; grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; ls /sys/class/net")
    lines = r.stdout.split()
    assert lines[0] == "1000"
    assert r.stdout.count("0000000000000000") == 2 and "NoNewPrivs:\t1" in r.stdout
    assert lines[-1] == "lo", "only the loopback interface without network"
    host_config = docker_client.api.inspect_container(sandbox.container_id)["HostConfig"]
    assert host_config["ReadonlyRootfs"] and host_config["Init"] and host_config["CapDrop"] == ["ALL"]
    # memory for processes + the /tmp, shell-state and workspace tmpfs (tmpfs pages count as container memory);
    # each process's own bound is its data ulimit
    assert host_config["Memory"] == host_config["MemorySwap"] == (256 + 256 + 16 + 1024) * 2**20
    assert (await sandbox.run("ulimit -d; ulimit -H -d")).stdout == f"{256 * 1024}\n" * 2
    assert host_config["PidsLimit"] == 128
    assert host_config["NanoCpus"] == 10**9 and host_config["NetworkMode"] == "none"
    mounts = docker_client.api.inspect_container(sandbox.container_id)["Mounts"]
    # Workspace and /tmp are tmpfs; of the host only the owner fifo is mounted, read-only, not writable to commands.
    assert [(m["Destination"], m["RW"]) for m in mounts] == [("/run/dsv4-owner", False)]
    r = await sandbox.run("echo keep-alive > /run/dsv4-owner")
    assert r.exit_code != 0 and "Permission denied" in r.stderr


async def test_the_deadline_process_cannot_be_signalled_by_commands(sandbox):
    r = await sandbox.run("kill -STOP $(pgrep -f dsv4-deadline | head -1)")
    assert r.exit_code != 0 and "not permitted" in r.stderr


async def test_network_is_an_explicit_opt_in(sandbox_image):
    async with DockerSandbox(sandbox_image, network=True) as sb:
        r = await sb.run("ls /sys/class/net")
    assert "eth0" in r.stdout.split()


async def test_host_folder_workspace_is_shared_with_the_host(sandbox_image, tmp_path):
    ws = tmp_path / "ws"
    async with DockerSandbox(sandbox_image, workspace=ws) as sb:
        await sb.run("echo from-container > made.txt")
        (ws / "from-host.txt").write_text("host\n")
        assert (await sb.run("cat from-host.txt")).stdout == "host\n"
        await sb.write_file("sub/w.bin", b"\x00\x01")
    assert (ws / "made.txt").read_text() == "from-container\n"
    assert (ws / "sub" / "w.bin").read_bytes() == b"\x00\x01"
    if os.geteuid() == 0:  # we made the folder: it belongs to the sandbox user, who wrote into it
        assert ws.stat().st_uid == 1000


async def test_root_owned_workspace_gets_a_clear_error(sandbox_image, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs a root-owned folder")
    with pytest.raises(SandboxError, match="chown"):
        async with DockerSandbox(sandbox_image, workspace=tmp_path):
            pass


async def test_absent_image_says_how_to_build_the_default(docker_client):
    with pytest.raises(ImageError, match="dsv4-agent sandbox build"):
        async with DockerSandbox("dsv4-agent/no-such-image:0"):
            pass


async def test_commands_never_block_the_event_loop(sandbox_image):
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await anyio.sleep(0.01)
            ticks += 1

    async with DockerSandbox(sandbox_image) as a, DockerSandbox(sandbox_image) as b:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            started = time.monotonic()
            async with anyio.create_task_group() as both:
                both.start_soon(a.run, "sleep 1")
                both.start_soon(b.run, "sleep 1")
            elapsed = time.monotonic() - started
            tg.cancel_scope.cancel()
    assert elapsed < 1.8, "two sandboxes should run their commands concurrently"
    assert ticks > 40, f"the event loop stalled while commands ran ({ticks} ticks in {elapsed:.2f}s)"


def test_bad_options_are_refused_before_anything_starts():
    with pytest.raises(ValueError, match="never run as root"):
        DockerSandbox(user="0:0")
    with pytest.raises(ValueError, match="numeric"):
        DockerSandbox(user="sandbox")
    with pytest.raises(ValueError, match="pids >= 16"):
        DockerSandbox(pids=2)
    with pytest.raises(ValueError, match="bad size"):
        DockerSandbox(memory="lots")


async def test_a_killed_session_shell_is_replaced_and_keeps_the_saved_state(sandbox):
    await sandbox.run("cd /tmp && export KEPT=yes")
    r = await sandbox.run("kill -KILL $PPID; sleep 8")
    assert r.exit_code == -1 and "sandbox error" in r.stderr and r.duration_s < 5
    r = await sandbox.run('pwd; echo "$KEPT"')
    assert (r.exit_code, r.stdout) == (0, "/tmp\nyes\n")


async def test_a_dead_container_is_replaced_and_the_host_workspace_kept(sandbox_image, docker_client, tmp_path):
    ws = tmp_path / "ws"
    async with DockerSandbox(sandbox_image, workspace=ws, timeout=20) as sb:
        await sb.run("echo kept > f.txt && echo lost > /tmp/t")
        first = sb.container_id
        docker_client.api.kill(first)                     # the container dies under the session
        r = await sb.run("echo never")
        assert sb.restarts == 1 and sb.container_id != first
        assert r.exit_code == -1 and "never" not in r.stdout
        assert "new container was started" in r.stderr and "workspace folder was kept" in r.stderr
        r = await sb.run("cat f.txt; cat /tmp/t")
        assert r.stdout == "kept\n" and r.exit_code == 1 and "No such file" in r.stderr
        labels = docker_client.api.inspect_container(sb.container_id)["Config"]["Labels"]
        assert labels["dsv4.owner.pid"] == str(os.getpid())


async def test_reset_kills_background_jobs_and_forgets_state_but_keeps_files(sandbox):
    await sandbox.run("mkdir keep; cd keep; echo data > f; export GONE=1")
    await sandbox.run("sleep 300", background=True)
    await sandbox.run("(sleep 300 &); sleep 300", background=True)
    with anyio.fail_after(30):  # the background commands start on their own time
        while (r := await sandbox.run("ps -e --no-headers -o comm | grep -c '^sleep$'")).stdout != "3\n":
            await anyio.sleep(0.05)
    r = await sandbox.run('pwd; echo "[$GONE]"')
    assert r.stdout == "/workspace/keep\n[1]\n"
    await sandbox.reset()
    r = await sandbox.run('ps -e --no-headers -o comm | grep -c "^sleep$"; pwd; echo "[${GONE-}]"; cat keep/f')
    assert r.stdout == "0\n/workspace\n[]\ndata\n"
