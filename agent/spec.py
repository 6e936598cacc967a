"""What the CLI needs to rebuild an agent: saved in `run_started`, so `resume` and `replay` need only the run.

spec = RunSpec(backend=BackendSpec(kind="engine", model="/ckpt"), sandbox=SandboxSpec(kind="docker"))
agent = build_agent(spec, output_dir=Path("runs"))   # the same agent, in this process or a later one
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.config import AgentConfig


class BackendSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["engine", "scripted", "demo", "remote"] = Field(
        description="engine: a checkpoint; scripted: pre-written turns; demo: see agent.demo; remote: a server"
    )
    model: str | None = Field(None, description="checkpoint directory (engine)")
    device: str = Field("cpu", description="engine device")
    completions: list[str | list[int]] = Field(
        default_factory=list, description="scripted turns: texts or exact token ids"
    )
    token_delay_s: float = Field(0.0, description="scripted pacing, for demos")
    seed: int | None = Field(None, description="sampling seed (engine)")
    temperature: float = Field(1.0, ge=0.0, description="sampling temperature (engine); 0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (engine)")
    kv_fp8: bool = Field(False, description="store the compressed KV in the 584-byte FP8 layout (engine)")
    constrain: bool = Field(True, description="DSML-constrained decoding of tool calls (engine; see encoding.constrain)")
    tp: int = Field(1, ge=1, description="tensor-parallel ranks, one GPU each (engine; dsv4/runtime/spmd.py)")
    url: str | None = Field(None, description="server base URL (remote; `dsv4-agent serve`); the API key, if any, "
                            "comes from $DSV4_AGENT_API_KEY, never from the spec")


class SandboxSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["docker", "local", "none"] = "docker"
    image: str | None = Field(None, description="docker image; the sandboxes default when None")
    workspace: str | None = Field(None, description="the host folder of the workspace (docker bind-mounts it)")
    network: bool = Field(False, description="docker: allow network access")


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: BackendSpec
    sandbox: SandboxSpec = Field(default_factory=SandboxSpec)
    mcp: list[str] = Field(default_factory=list, description="--mcp flags, NAME=COMMAND ARGS or NAME=URL")
    mcp_config: str | None = Field(None, description="an mcpServers JSON/YAML file; read again on resume")
    config: AgentConfig = Field(default_factory=AgentConfig)


def build_backend(spec: BackendSpec, *, engine: Any = None, make_room: Any = None) -> Any:
    """The backend a spec describes. An engine spec runs on `engine` when given (a loaded `dsv4.Engine`
    shared by several agents, which then ignore `model`, `kv_fp8` and `tp`), with `make_room` (see
    EngineBackend); otherwise the backend loads the checkpoint itself."""
    if spec.kind == "scripted":
        from agent.backends.scripted import ScriptedBackend

        return ScriptedBackend(spec.completions, token_delay_s=spec.token_delay_s)
    if spec.kind == "demo":
        from agent.demo import demo_backend

        return demo_backend(spec)
    if spec.kind == "remote":
        import os

        from agent.backends.remote import RemoteBackend

        if spec.url is None:
            raise ValueError("a remote backend needs a server: pass --remote URL")
        return RemoteBackend(spec.url, api_key=os.environ.get("DSV4_AGENT_API_KEY"), seed=spec.seed,
                             temperature=spec.temperature, top_p=spec.top_p)
    from agent.backends.engine import EngineBackend

    if spec.model is None:
        raise ValueError("an engine backend needs a checkpoint: pass --model PATH")
    return EngineBackend(engine if engine is not None else spec.model, device=spec.device, seed=spec.seed,
                         temperature=spec.temperature, top_p=spec.top_p, kv_fp8=spec.kv_fp8,
                         constrain=spec.constrain, tp=spec.tp, make_room=make_room)


def build_sandbox(spec: SandboxSpec) -> Any:
    if spec.kind == "none":
        return None
    if spec.kind == "local":
        from sandboxes import LocalSandbox

        if spec.workspace is None:
            raise ValueError("a local sandbox needs a workspace folder")
        return LocalSandbox(spec.workspace)
    from sandboxes import DockerSandbox

    kwargs: dict[str, Any] = {"network": spec.network, "workspace": spec.workspace}
    if spec.image is not None:
        kwargs["image"] = spec.image
    return DockerSandbox(**kwargs)


def build_mcp_servers(spec: RunSpec) -> list[Any]:
    """The spec's MCP servers, not connected. Flags and files are parsed again each time, so secrets
    written as ${VAR} come from the environment and never reach the trajectory."""
    from tools.mcp import load_mcp_config, parse_mcp_flag

    servers = [parse_mcp_flag(flag) for flag in spec.mcp]
    if spec.mcp_config is not None:
        servers += load_mcp_config(spec.mcp_config)
    return servers


def build_agent(
    spec: RunSpec,
    *,
    output_dir: Path,
    observer: Any = None,
    on_event: Any = None,
    engine: Any = None,
    make_room: Any = None,
    resident: bool = False,
) -> Any:
    """The agent a spec describes, ready for `run`, `resume` or `reply` (`engine`, `make_room`: see
    `build_backend`; `resident`: see `Agent`)."""
    from agent.loop import Agent

    return Agent(
        build_backend(spec.backend, engine=engine, make_room=make_room),
        sandbox=build_sandbox(spec.sandbox),
        mcp_servers=build_mcp_servers(spec),
        config=spec.config,
        output_dir=output_dir,
        observer=observer,
        spec=spec.model_dump(mode="json"),
        on_event=on_event,
        resident=resident,
    )
