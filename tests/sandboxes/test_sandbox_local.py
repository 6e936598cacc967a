"""LocalSandbox: the persistent-shell protocol on the host (no Docker needed)."""
from __future__ import annotations

import os
import time

import anyio
import pytest

from sandboxes import CommandResult, LocalSandbox, Sandbox, WorkspaceEscapeError
from sandboxes.local import PipeTransport

pytestmark = pytest.mark.anyio


@pytest.fixture
async def sandbox(tmp_path):
    async with LocalSandbox(workspace=tmp_path / "ws", timeout=10) as sb:
        yield sb


async def test_satisfies_the_protocol(sandbox):
    assert isinstance(sandbox, Sandbox)


async def test_exit_code_and_streams_are_separate(sandbox):
    r = await sandbox.run("echo out; echo err >&2; exit 7")
    assert (r.exit_code, r.stdout, r.stderr, r.timed_out, r.truncated) == (7, "out\n", "err\n", False, False)


async def test_cwd_env_functions_persist_between_commands(sandbox):
    await sandbox.run("mkdir -p a/b && cd a/b && export GREETING=hello && shout() { echo \"$1!\"; }")
    r = await sandbox.run('pwd; echo "$GREETING"; shout hey')
    assert r.stdout.splitlines() == [str(sandbox.workspace / "a" / "b"), "hello", "hey!"]
    await sandbox.run("unset GREETING; cd ..")
    r = await sandbox.run('pwd; echo "[${GREETING-unset}]"')
    assert r.stdout.splitlines() == [str(sandbox.workspace / "a"), "[unset]"]


async def test_exit_in_a_command_keeps_the_shell_and_its_state(sandbox):
    r = await sandbox.run("cd /; exit 3")
    assert r.exit_code == 3
    r = await sandbox.run("pwd")
    assert (r.exit_code, r.stdout) == (0, "/\n")


async def test_stdin_is_empty_so_interactive_programs_end(sandbox):
    r = await sandbox.run("cat; read line; echo read=$?")
    assert r.stdout == "read=1\n"


async def test_timeout_kills_the_whole_process_group_and_the_shell_survives(sandbox, tmp_path):
    marker = tmp_path / "survivor"
    started = time.monotonic()
    r = await sandbox.run(f"(sleep 3; touch {marker}) & while :; do :; done", timeout=0.5)
    assert r.timed_out and r.exit_code == -1 and "timeout" in r.stderr
    assert time.monotonic() - started < 3
    assert (await sandbox.run("echo alive")).stdout == "alive\n"
    await anyio.sleep(3.2)
    assert not marker.exists(), "a child of the timed-out command survived the kill"


async def test_state_of_a_timed_out_command_is_dropped(sandbox):
    await sandbox.run("export KEEP=1")
    r = await sandbox.run("export KEEP=2; cd /; sleep 5", timeout=0.3)
    assert r.timed_out
    assert (await sandbox.run("echo $KEEP; pwd")).stdout == f"1\n{sandbox.workspace}\n"


async def test_output_is_capped_head_and_tail_with_the_elision_stated(tmp_path):
    async with LocalSandbox(workspace=tmp_path, output_cap=1000) as sb:
        r = await sb.run("echo FIRST; seq 1 100000; echo LAST")
    assert r.truncated and r.exit_code == 0
    assert r.stdout.startswith("FIRST\n1\n") and r.stdout.endswith("100000\nLAST\n")
    assert "bytes elided" in r.stdout and len(r.stdout) < 1300


async def test_endless_output_is_capped_and_killed(tmp_path):
    async with LocalSandbox(workspace=tmp_path, output_cap=4096) as sb:
        r = await sb.run("yes", timeout=1)
        assert r.timed_out and r.truncated and len(r.stdout) < 4096 + 300
        assert (await sb.run("echo ok")).stdout == "ok\n"


def _gone(pid: int) -> bool:
    """The process ended (a zombie counts: this host's init may never reap it)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def _wait_gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        await anyio.sleep(0.05)
    return True


async def test_output_of_an_escaped_process_does_not_leak_into_the_next_command(sandbox):
    await sandbox.run("setsid sh -c 'sleep 0.2; echo late' &")  # its own session: out of the command's reach
    await anyio.sleep(0.5)
    assert (await sandbox.run("echo now")).stdout == "now\n"


async def test_processes_a_command_leaves_behind_end_when_it_returns(sandbox):
    r = await sandbox.run("sleep 300 & echo $!; (sleep 300 & echo $!)")  # a job, and an orphan
    for pid in r.stdout.split():
        assert await _wait_gone(int(pid)), f"{pid} outlived its command"


async def test_a_background_command_runs_on_in_the_session_state_without_changing_it(sandbox):
    await sandbox.run("cd / && export MODE=served")
    r = await sandbox.run('cd /tmp; echo "$MODE from $PWD"; export MODE=changed; exec sleep 300', background=True)
    assert r.exit_code == 0 and r.background_pid and r.log_path and r.stdout == ""
    deadline = time.monotonic() + 10
    while (log := (await sandbox.run(f"cat {r.log_path}")).stdout) == "":
        assert time.monotonic() < deadline
        await anyio.sleep(0.05)
    assert log == "served from /tmp\n"
    assert not _gone(r.background_pid)
    assert (await sandbox.run('echo "$MODE from $PWD"')).stdout == "served from /\n"


async def test_background_jobs_end_with_the_sandbox(tmp_path):
    async with LocalSandbox(workspace=tmp_path) as sb:
        r = await sb.run("sleep 300", background=True)
    assert await _wait_gone(r.background_pid), f"background job {r.background_pid} outlived its sandbox"


async def test_cancelling_run_kills_the_command(sandbox):
    started = time.monotonic()
    with anyio.move_on_after(0.3):
        await sandbox.run("sleep 20", timeout=30)
    assert time.monotonic() - started < 5
    assert (await sandbox.run("echo next")).stdout == "next\n"


async def test_cancelling_run_before_the_command_started_still_kills_it(sandbox, monkeypatch):
    # On a loaded machine the worker thread can still be sending the command when the cancel comes, so
    # the first kill finds nothing to kill; the command must not then run on to its end.
    send = PipeTransport.send

    def late_send(self, data: bytes) -> None:
        if b"sleep 20" in data:
            time.sleep(0.5)
        send(self, data)

    monkeypatch.setattr(PipeTransport, "send", late_send)
    started = time.monotonic()
    with anyio.move_on_after(0.1):
        await sandbox.run("sleep 20", timeout=30)
    assert time.monotonic() - started < 5
    assert (await sandbox.run("echo next")).stdout == "next\n"


async def test_file_round_trip_text_and_binary(sandbox):
    await sandbox.write_file("dir/note.txt", "héllo\n")
    blob = os.urandom(100_000)
    await sandbox.write_file("blob.bin", blob)
    assert await sandbox.read_file("dir/note.txt") == "héllo\n".encode()
    assert await sandbox.read_file(str(sandbox.workspace / "blob.bin")) == blob
    assert (await sandbox.run("wc -c < blob.bin")).stdout.strip() == "100000"


@pytest.mark.parametrize("path", ["../outside.txt", "/etc/passwd", "a/../../x"])
async def test_file_io_outside_the_workspace_is_refused(sandbox, path):
    with pytest.raises(WorkspaceEscapeError, match="outside the workspace"):
        await sandbox.write_file(path, b"x")
    with pytest.raises(WorkspaceEscapeError):
        await sandbox.read_file(path)


async def test_symlink_out_of_the_workspace_is_refused(sandbox, tmp_path):
    await sandbox.run(f"ln -s {tmp_path} link")
    with pytest.raises(WorkspaceEscapeError):
        await sandbox.write_file("link/evil.txt", b"x")
    assert not (tmp_path / "evil.txt").exists()


async def test_missing_file_error_names_it(sandbox):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        await sandbox.read_file("nope.txt")


async def test_starts_on_first_use_without_a_context_manager(tmp_path):
    sb = LocalSandbox(workspace=tmp_path)
    try:
        r = await sb.run("echo lazy")
        assert isinstance(r, CommandResult) and r.stdout == "lazy\n"
    finally:
        await sb.close()


async def test_bad_timeout_is_a_clear_error(sandbox):
    with pytest.raises(ValueError, match="timeout"):
        await sandbox.run("true", timeout=-1)


async def test_a_killed_session_shell_is_replaced_and_keeps_the_saved_state(sandbox):
    await sandbox.run("cd / && export KEPT=yes")
    r = await sandbox.run("kill -KILL $PPID; sleep 5")  # the session shell itself dies
    assert r.exit_code == -1 and "sandbox error" in r.stderr
    r = await sandbox.run('pwd; echo "$KEPT"')
    assert (r.exit_code, r.stdout) == (0, "/\nyes\n")


async def test_a_deleted_state_folder_heals_and_timeouts_stay_timeouts(sandbox):
    await sandbox.run(f"rm -rf {sandbox._state_dir}; cd /")
    r = await sandbox.run("sleep 5", timeout=0.3)
    assert (r.exit_code, r.timed_out) == (-1, True)
    assert (await sandbox.run("cd / && export AGAIN=1")).exit_code == 0
    assert (await sandbox.run('pwd; echo "$AGAIN"')).stdout == "/\n1\n"
    with anyio.move_on_after(0.5):  # cancelling still finds the running command
        await sandbox.run("sleep 60", timeout=100)
    assert (await sandbox.run("echo next")).stdout == "next\n"


async def test_nul_in_a_command_is_a_clear_error(sandbox):
    with pytest.raises(ValueError, match="NUL"):
        await sandbox.run("echo a\x00b")


async def test_reset_ends_background_jobs_and_forgets_state(sandbox):
    await sandbox.run("cd /; export GONE=1")
    pid = (await sandbox.run("sleep 300", background=True)).background_pid
    assert (await sandbox.run('pwd; echo "[${GONE-}]"')).stdout == "/\n[1]\n"
    await sandbox.reset()
    r = await sandbox.run('pwd; echo "[${GONE-}]"')
    assert r.stdout == f"{sandbox.workspace}\n[]\n"
    assert await _wait_gone(pid)
