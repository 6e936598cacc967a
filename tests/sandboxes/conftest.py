"""Shared fixtures of the sandbox tests: the anyio backend, the Docker engine, the image, the leak check."""
from __future__ import annotations

import os

import pytest

_LEAK_CHECKED_OWNERS: set[int] = {os.getpid()}  # owner pids whose containers must all be gone at the end


@pytest.fixture(scope="session")
def anyio_backend():
    return "asyncio"


def _engine():
    try:
        import docker

        client = docker.from_env()
        client.ping()
        return client
    except Exception:  # no engine, no socket, no permission: the docker tests skip
        return None


@pytest.fixture(scope="session")
def docker_client():
    client = _engine()
    if client is None:
        pytest.skip("no Docker engine reachable")
    return client


@pytest.fixture(scope="session")
def sandbox_image(docker_client):
    """The default image, built once (offline, a few minutes the first time; then cached)."""
    from sandboxes.image import DEFAULT_IMAGE, build_image

    build_image(DEFAULT_IMAGE, if_missing=True, log=lambda _: None)
    return DEFAULT_IMAGE


@pytest.fixture
def leak_checked_owners() -> set[int]:
    """Add the pid of every owner process a test spawns: its containers must be gone after the suite too."""
    return _LEAK_CHECKED_OWNERS


@pytest.fixture(scope="session", autouse=True)
def no_leaked_containers():
    """After the suite, no container made by this test process (or the owners it spawned) is left."""
    yield
    client = _engine()
    if client is None:
        return
    from sandboxes.owner import LABEL, OWNER_PID

    left = [c.name for c in client.containers.list(all=True, filters={"label": LABEL})
            if int(c.labels.get(OWNER_PID, -1)) in _LEAK_CHECKED_OWNERS]
    assert not left, f"sandbox containers leaked by the test suite: {left}"
