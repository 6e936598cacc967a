"""Shared fixtures of the sandbox tests: the anyio backend and, for docker tests, the engine and the image."""
from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend():
    return "asyncio"
