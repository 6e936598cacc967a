"""`dsv4-agent run --demo`: the closest real end-to-end run without trained weights.

What is real: a DSV4 checkpoint in the official layout (random weights, tiny dims, the full DSV4
vocabulary), loaded by the embedded engine; one resident KV session that prefills the Think Max prompt
once and then only each turn's new tokens; every decode step a real forward; the DSV4 encoding and the
streaming DSML parser; the tools running in the hardened Docker sandbox; a third-party MCP server
(`mcp-server-time`) over stdio; the trajectory.

What is not: the choice of tokens. A random model cannot write a tool call, so a logits processor
forces each turn's tokens to a pre-written completion (`DEMO_COMPLETIONS`); the trajectory keeps the
model's own log-probability of every forced token to show the engine computed them.

Without torch and the engine, or when asked (`DSV4_DEMO_BACKEND=scripted`), the same task runs on the
scripted backend, and the output says so.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from agent.backends.scripted import completion
from agent.spec import BackendSpec, RunSpec, SandboxSpec

DEMO_TASK = (
    "Write a Python script primes.py that prints the primes below 50, run it in the sandbox saving its "
    "output to primes.txt, read primes.txt back, and ask the time server for the current time in UTC."
)

PRIMES_PY = """def primes(limit):
    found = []
    for n in range(2, limit):
        if all(n % p for p in found if p * p <= n):
            found.append(n)
    return found


print(*primes(50))
"""

DEMO_COMPLETIONS = [
    completion(
        "Two independent things first: write primes.py, and ask the time server for the UTC time.",
        calls=[
            ("write_file", {"path": "primes.py", "content": PRIMES_PY}),
            ("time__get_current_time", {"timezone": "UTC"}),
        ],
    ),
    completion(
        "The script is written. Run it and keep its output.",
        calls=[("bash", {"command": "python3 primes.py > primes.txt && wc -w primes.txt"})],
    ),
    completion(
        "Read the file back and list the workspace; both are read-only.",
        calls=[("read_file", {"path": "primes.txt"}), ("list_dir", {})],
    ),
    completion(
        "primes.txt holds the 15 primes below 50; the time came from the MCP server.",
        content="primes.py printed the 15 primes below 50 (2 3 5 7 11 13 17 19 23 29 31 37 41 43 47) into primes.txt; "
        "the current UTC time is in the time server's answer above.",
    ),
]

DEMO_MODEL_DIR = "demo-model"


def engine_available() -> bool:
    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("dsv4.runtime.engine") is not None


def docker_sandbox_ready() -> str | None:
    """None when a Docker engine and the sandbox image are here; otherwise why not."""
    try:
        import docker

        from sandboxes.container import DEFAULT_IMAGE

        client = docker.from_env(timeout=5)
        client.ping()
    except Exception:  # noqa: BLE001 - no engine, no socket, no permission: all mean "not here"
        return "no Docker engine here"
    try:
        client.images.get(DEFAULT_IMAGE)
    except docker.errors.ImageNotFound:
        return f"the sandbox image {DEFAULT_IMAGE} is not built (dsv4-agent sandbox build)"
    return None


def demo_spec(output_dir: Path, run_id: str) -> tuple[RunSpec, str, list[str]]:
    """The demo's spec and task, and lines saying what this run is made of (printed before it starts)."""
    notes = []
    use_engine = engine_available() and os.environ.get("DSV4_DEMO_BACKEND", "engine") != "scripted"
    if use_engine:
        model = write_demo_model(output_dir / DEMO_MODEL_DIR)
        backend = BackendSpec(kind="demo", model=str(model), completions=DEMO_COMPLETIONS)
        notes.append(
            f"model: a random-weight DSV4 checkpoint in the official layout ({model}), run by the embedded engine"
        )
        notes.append(
            "tokens: FORCED to pre-written completions by a logits processor (a random model cannot write tool calls);"
        )
        notes.append(
            "        prefill, decode steps and the resident KV cache are real; the counts below are measured by the session"
        )
    else:
        backend = BackendSpec(kind="scripted", completions=DEMO_COMPLETIONS, token_delay_s=0.005)
        notes.append("model: NONE, the scripted backend replays pre-written completions (no torch / engine here)")
    workspace = str((output_dir / run_id / "workspace").absolute())
    missing = docker_sandbox_ready()
    if missing is None:
        sandbox = SandboxSpec(kind="docker", workspace=workspace)
        notes.append("sandbox: hardened Docker container (no network, capped memory/cpus/pids), workspace bind-mounted")
    else:
        sandbox = SandboxSpec(kind="local", workspace=workspace)
        notes.append(f"sandbox: NOT Docker ({missing}): commands run on the host in a local workspace folder")
    mcp = [f"time={sys.executable} -m mcp_server_time --local-timezone UTC"]
    notes.append("MCP: mcp-server-time (third-party) over stdio")
    return RunSpec(backend=backend, sandbox=sandbox, mcp=mcp), DEMO_TASK, notes


def write_demo_model(path: Path) -> Path:
    """A tiny random checkpoint with DSV4's full vocabulary (so it reads real chat tokens); reused if present."""
    from dsv4 import ModelConfig
    from dsv4.loading.testing import write_random_checkpoint
    from encoding import Tokenizer

    if (path / "config.json").is_file() and (path / "model.safetensors.index.json").is_file():
        return path.absolute()
    cfg = ModelConfig.tiny().model_copy(update={"vocab_size": Tokenizer.default().vocab_size})
    return Path(write_random_checkpoint(path, cfg, seed=0)).absolute()


def demo_backend(spec: BackendSpec) -> Any:
    """The engine on the demo checkpoint with its tokens forced (see the module docstring)."""
    from agent.backends.engine import EngineBackend

    label = (
        f"embedded dsv4 engine on {spec.model} (RANDOM weights); each turn's tokens FORCED to a scripted "
        "completion by a logits processor; prefill, decode and the KV cache are real"
    )
    return EngineBackend(spec.model, device=spec.device, seed=0, forced=spec.completions, label=label)
