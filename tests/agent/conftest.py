"""Shared settings of the agent tests: the anyio backend, one thread for torch."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)  # the machine's 2 cores are shared by every engineer's tests


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def live_server():
    """`live_server(app) -> base URL`: the ASGI app under uvicorn in a thread on a free port, stopped
    when the test module ends."""
    import socket
    import threading
    import time

    import uvicorn

    running = []

    def serve(app) -> str:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        live = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=live.run, daemon=True)
        thread.start()
        running.append((live, thread))
        deadline = time.monotonic() + 20
        while not live.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{port}"

    yield serve
    for live, thread in running:
        live.should_exit = True
        thread.join(10)
