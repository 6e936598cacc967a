"""`dsv4-agent sandbox build|ls|gc` through typer's runner on `sandbox_app` (agent/cli.py mounts it)."""
from __future__ import annotations

import time

import anyio
import pytest
from typer.testing import CliRunner

from sandboxes import DockerSandbox
from sandboxes.cli import SANDBOX_ERROR, sandbox_app
from sandboxes.image import IMAGE_REPOSITORY, cache_dir

runner = CliRunner()


@pytest.mark.docker
def test_build_if_missing_is_idempotent_and_fast(sandbox_image):
    started = time.monotonic()
    result = runner.invoke(sandbox_app, ["build", "--if-missing"])
    assert result.exit_code == 0, result.output
    assert "is present" in result.output and time.monotonic() - started < 5


@pytest.mark.docker
def test_build_under_another_tag_reimports_the_cached_rootfs(sandbox_image, docker_client):
    tag = f"{IMAGE_REPOSITORY}:test-{time.time_ns()}"
    assert any(cache_dir().glob("rootfs-*.tar")), "the default image build caches its root filesystem"
    try:
        result = runner.invoke(sandbox_app, ["build", "--tag", tag])
        assert result.exit_code == 0, result.output
        assert "cached root filesystem" in result.output

        async def use_it():
            async with DockerSandbox(tag) as sb:
                return await sb.run("python3 -c 'print(6 * 7)'; id -un; bash --version | head -1")

        r = anyio.run(use_it)
        assert r.stdout.splitlines()[:2] == ["42", "sandbox"] and "GNU bash" in r.stdout
    finally:
        docker_client.images.remove(tag, force=True)


@pytest.mark.docker
def test_ls_and_gc_run(docker_client):
    assert runner.invoke(sandbox_app, ["ls"]).exit_code == 0
    result = runner.invoke(sandbox_app, ["gc"])
    assert result.exit_code == 0 and "sandbox(es) removed" in result.output


def test_no_engine_is_a_clear_error_with_the_sandbox_exit_code(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    result = runner.invoke(sandbox_app, ["ls"])
    assert result.exit_code == SANDBOX_ERROR and "no Docker engine reachable" in result.output


def test_help_lists_the_commands():
    result = runner.invoke(sandbox_app, ["--help"])
    assert result.exit_code == 0 and all(c in result.output for c in ("build", "ls", "gc"))
