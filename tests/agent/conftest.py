"""Shared settings of the agent tests: the anyio backend, one thread for torch."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)  # the machine's 2 cores are shared by every engineer's tests


@pytest.fixture
def anyio_backend():
    return "asyncio"
