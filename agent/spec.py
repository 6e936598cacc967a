"""What the CLI needs to rebuild an agent: saved in `run_started`, so `resume` and `replay` need only the run.

    spec = RunSpec(backend=BackendSpec(kind="engine", model="/ckpt"), sandbox=SandboxSpec(kind="docker"))
    agent = build_agent(spec, output_dir)      # the same agent, in this process or a later one
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.config import AgentConfig


class BackendSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["engine", "scripted", "demo"] = Field(description="engine: a checkpoint; scripted: pre-written turns; demo: see agent.demo")
    model: str | None = Field(None, description="checkpoint directory (engine)")
    device: str = Field("cpu", description="engine device")
    completions: list[str | list[int]] = Field(default_factory=list, description="scripted turns: texts or exact token ids")
    token_delay_s: float = Field(0.0, description="scripted pacing, for demos")
    seed: int | None = Field(None, description="sampling seed (engine)")


class SandboxSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["docker", "local", "none"] = "docker"
    image: str | None = Field(None, description="docker image; the sandboxes default when None")
    workspace: str | None = Field(None, description="local: the host folder commands run in")
    network: bool = Field(False, description="docker: allow network access")


class MCPSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    url: str | None = None


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: BackendSpec
    sandbox: SandboxSpec = Field(default_factory=SandboxSpec)
    mcp: list[MCPSpec] = Field(default_factory=list)
    config: AgentConfig = Field(default_factory=AgentConfig)


def parse_mcp_option(value: str) -> MCPSpec:
    """`name=command args...` (stdio) or `name=http(s)://...` (streamable HTTP)."""
    name, sep, target = value.partition("=")
    if not sep or not name.strip() or not target.strip():
        raise ValueError(f"--mcp wants NAME=COMMAND or NAME=URL, got {value!r}")
    if target.startswith(("http://", "https://")):
        return MCPSpec(name=name.strip(), url=target.strip())
    command, *args = shlex.split(target)
    return MCPSpec(name=name.strip(), command=command, args=args)


def load_mcp_config(path: Path) -> list[MCPSpec]:
    """A Claude-Desktop style file: `{"mcpServers": {"name": {"command", "args", "env"} | {"url"}}}`."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read MCP config {path}: {e}") from e
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise ValueError(f"MCP config {path} must hold an object under \"mcpServers\"")
    specs = []
    for name, entry in servers.items():
        try:
            spec = MCPSpec(name=name, **entry)
        except (TypeError, ValidationError) as e:
            raise ValueError(f"MCP config {path}: server {name!r}: {e}") from e
        if (spec.command is None) == (spec.url is None):
            raise ValueError(f"MCP config {path}: server {name!r} needs exactly one of \"command\" or \"url\"")
        specs.append(spec)
    return specs


def build_backend(spec: BackendSpec) -> Any:
    if spec.kind == "scripted":
        from agent.backends.scripted import ScriptedBackend

        return ScriptedBackend(spec.completions, token_delay_s=spec.token_delay_s)
    if spec.kind == "demo":
        from agent.demo import demo_backend

        return demo_backend(spec)
    from agent.backends.engine import EngineBackend

    if spec.model is None:
        raise ValueError("an engine backend needs a checkpoint: pass --model PATH")
    return EngineBackend.from_checkpoint(spec.model, device=spec.device, seed=spec.seed)


def build_sandbox(spec: SandboxSpec) -> Any:
    if spec.kind == "none":
        return None
    if spec.kind == "local":
        from sandboxes import LocalSandbox

        if spec.workspace is None:
            raise ValueError("a local sandbox needs a workspace folder")
        return LocalSandbox(spec.workspace)
    from sandboxes import DockerSandbox

    kwargs: dict[str, Any] = {"network": spec.network}
    if spec.image is not None:
        kwargs["image"] = spec.image
    return DockerSandbox(**kwargs)


def build_mcp_servers(specs: list[MCPSpec]) -> list[Any]:
    from tools.mcp import MCPServer

    servers = []
    for spec in specs:
        if spec.url is not None:
            servers.append(MCPServer.http(spec.url, name=spec.name))
        else:
            servers.append(MCPServer.stdio(spec.command, args=spec.args, env=spec.env or None, name=spec.name))
    return servers


def build_agent(spec: RunSpec, *, output_dir: Path, observer: Any = None) -> Any:
    """The agent a spec describes, ready for `run` or `resume`."""
    from agent.loop import Agent

    return Agent(
        build_backend(spec.backend),
        sandbox=build_sandbox(spec.sandbox),
        mcp_servers=build_mcp_servers(spec.mcp),
        config=spec.config,
        output_dir=output_dir,
        observer=observer,
        spec=spec.model_dump(mode="json"),
    )
