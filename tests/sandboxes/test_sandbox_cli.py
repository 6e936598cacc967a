"""`dsv4-agent sandbox build|ls|gc` through typer's runner on `sandbox_app` (agent/cli.py mounts it)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import docker.errors
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


# A stand-in for debootstrap (no mirror here): a tiny root filesystem, slowly, and a line per run in $RUNS.
FAKE_DEBOOTSTRAP = """#!/bin/sh
for arg; do target=$prev; prev=$arg; done
echo run >> "$RUNS"
mkdir -p "$target/etc" "$target/usr/share/doc/x"
echo "root:x:0:0:root:/root:/bin/sh" > "$target/etc/passwd"
: > "$target/etc/group"; : > "$target/etc/shadow"
sleep 1
"""


@pytest.mark.docker
@pytest.mark.skipif(os.geteuid() != 0, reason="the build gives /workspace to uid 1000: root only")
def test_two_builds_at_once_take_turns_on_one_cache(tmp_path, docker_client):
    # Two scripts/setup.sh at once crashed on the same temporary rootfs file of the build.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "debootstrap").write_text(FAKE_DEBOOTSTRAP)
    (bin_dir / "debootstrap").chmod(0o755)
    runs = tmp_path / "runs"
    tag = f"{IMAGE_REPOSITORY}:test-race-{time.time_ns()}"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RUNS": str(runs),
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    builds = [subprocess.Popen([sys.executable, "-m", "sandboxes.cli", "build", "--if-missing", "--tag", tag],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    try:
        outputs = [build.communicate(timeout=120)[0] for build in builds]
        assert [build.returncode for build in builds] == [0, 0], outputs
        assert runs.read_text() == "run\n", "the second build should have waited and used the first's rootfs"
        assert any("is present" in output or "waiting" in output for output in outputs), outputs
        cached = list((tmp_path / "cache" / "dsv4-agent" / "sandbox").iterdir())
        assert sorted(p.name for p in cached if p.name != "debs") == ["build.lock", "rootfs-bookworm-1.tar"]
        assert docker_client.images.get(tag).attrs["Config"]["WorkingDir"] == "/workspace"
    finally:
        for build in builds:
            build.kill()
        try:
            docker_client.images.remove(tag)
        except docker.errors.ImageNotFound:
            pass
