"""The loop with the hardened DockerSandbox: files written, run and read in a container, timeouts, cleanup."""

from __future__ import annotations

import docker
import pytest

from agent import Agent, ExitStatus, ScriptedBackend, completion
from agent.trajectory import SandboxEvent, ToolResultEvent, read_events
from sandboxes import DockerSandbox
from tools import builtin_tools


def docker_available() -> bool:
    try:
        docker.from_env(timeout=5).ping()
        return True
    except Exception:  # noqa: BLE001 - no socket, no daemon, no permission
        return False


pytestmark = [
    pytest.mark.docker,
    pytest.mark.anyio,
    pytest.mark.skipif(not docker_available(), reason="no Docker engine"),
]


def image_present() -> bool:
    from sandboxes.container import DEFAULT_IMAGE

    try:
        docker.from_env().images.get(DEFAULT_IMAGE)
        return True
    except docker.errors.ImageNotFound:
        return False


async def test_a_task_in_the_docker_sandbox(tmp_path):
    if not image_present():
        pytest.skip("the sandbox image is not built (dsv4-agent sandbox build)")
    sandbox = DockerSandbox(workspace=tmp_path / "ws")
    turns = [
        completion(
            "Write.",
            calls=[("write_file", {"path": "hello.py", "content": "import sys\nprint('hi from', sys.platform)\n"})],
        ),
        completion(
            "Run, and try the network.",
            calls=[
                ("bash", {"command": "python3 hello.py | tee out.txt"}),
                (
                    "bash",
                    {"command": "python3 -c 'import socket; socket.create_connection((\"1.1.1.1\", 53), timeout=2)'"},
                ),
            ],
        ),
        completion("A command that hangs.", calls=[("bash", {"command": "sleep 30", "timeout": 1})]),
        completion("Read back.", calls=[("read_file", {"path": "out.txt"})]),
        completion("Done.", content="hi from linux"),
    ]
    agent = Agent(backend=ScriptedBackend(turns), tools=builtin_tools(), sandbox=sandbox, output_dir=tmp_path / "runs")
    result = await agent.run("write hello.py, run it, read the output")
    assert result.status is ExitStatus.completed
    events = read_events(result.trajectory_path)
    results = [e for e in events if isinstance(e, ToolResultEvent)]
    assert [(r.name, r.error_kind) for r in results] == [
        ("write_file", None),
        ("bash", None),
        ("bash", "command_failed"),  # no network in the sandbox
        ("bash", "timeout"),
        ("read_file", None),
    ]
    assert "hi from linux" in results[1].content and "hi from linux" in results[4].content
    assert (tmp_path / "ws" / "out.txt").read_text().strip() == "hi from linux"  # the workspace is bind-mounted
    assert [e.kind for e in events if isinstance(e, SandboxEvent)] == ["started", "stopped"]
    leftover = docker.from_env().containers.list(all=True, filters={"name": sandbox.name})
    assert leftover == []


async def test_a_container_that_dies_mid_run_does_not_end_the_session(tmp_path):
    if not image_present():
        pytest.skip("the sandbox image is not built (dsv4-agent sandbox build)")
    sandbox = DockerSandbox(workspace=tmp_path / "ws")
    turns = [
        completion("Write.", calls=[("write_file", {"path": "a.txt", "content": "kept"})]),
        completion("Check.", calls=[("bash", {"command": "echo first"})]),
        completion("After the crash.", calls=[("bash", {"command": "echo second"})]),
        completion("Again.", calls=[("bash", {"command": "cat a.txt"})]),
        completion("Done.", content="kept"),
    ]

    def kill_after_first_command(line: str) -> None:  # the container dies between two turns
        if '"tool_result"' in line and "first" in line:
            docker.from_env().api.kill(sandbox.container_id)

    agent = Agent(backend=ScriptedBackend(turns), sandbox=sandbox, output_dir=tmp_path / "runs",
                  on_event=kill_after_first_command)
    result = await agent.run("survive a dead container")
    assert result.status is ExitStatus.completed, result.message
    results = [e for e in read_events(result.trajectory_path) if isinstance(e, ToolResultEvent)]
    assert results[2].is_error and "new container was started" in results[2].content
    assert not results[3].is_error and "kept" in results[3].content   # the host workspace survived
    assert sandbox.restarts == 1
