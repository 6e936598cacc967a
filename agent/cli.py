"""`dsv4-agent`: run, resume, replay and inspect agent runs; `mcp` serves them to MCP hosts (agent/mcp_server.py);
`sandbox` manages the Docker sandboxes.

Exit codes (also written to each trajectory's exit event): 0 completed, 1 error, 2 usage,
3 max_steps, 4 max_tokens, 5 timeout, 6 format_error, 7 stuck, 8 context_full, 130 interrupted.
A usage error is one line on stderr, found before any run folder is made or any model loads.
`serve` exits 2 on bad flags and 1 when it cannot listen on its address (a busy port) or load the model.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, List, Optional

import anyio
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

from agent import mcp_server
from agent.config import AgentConfig, describe_validation_error
from agent.display import Observer, RichDisplay, terminal_safe
from agent.spec import BackendSpec, RunSpec, SandboxSpec, build_agent, build_mcp_servers
from agent.status import ExitStatus, single_leaf
from agent.history import History
from agent.trajectory import (
    TRAJECTORY_FILE,
    RunStarted,
    TrajectoryError,
    new_run_id,
    read_events,
    resolve_run,
)
from sandboxes.cli import sandbox_app

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

app = typer.Typer(
    help="Run DeepSeek-V4 as a tool-using agent on its own embedded engine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

OUTPUT_DIR = typer.Option(Path("runs"), "--output-dir", "-o", help="where runs are written, one folder each")
JSON_EVENTS = typer.Option(False, "--json", help="print the trajectory events as JSON lines instead of the display")
# AgentConfig fields under the names of the flags that set them, for error messages
CONFIG_FLAGS = {
    "effort": "--effort", "max_steps": "--max-steps", "max_tokens": "--max-tokens", "max_wall_s": "--max-wall"
}
# the official checkpoint layout (dsv4's loader): a config and the weights, one file or an index of shards
CHECKPOINT_WEIGHTS = ("model.safetensors.index.json", "model.safetensors")


def _error(message: str, status: ExitStatus) -> typer.Exit:
    err.print(f"[red]error:[/] {escape(terminal_safe(message))}", soft_wrap=True)  # one line, however long
    return typer.Exit(status.exit_code)


def _usage_error(message: str) -> typer.Exit:
    return _error(message, ExitStatus.usage)


def _signal_words(signum: int) -> tuple[str, str]:
    """What the operator did, and how to do it again, for the interrupt message."""
    if signum == signal.SIGINT:
        return "Ctrl-C", "Ctrl-C again"
    return signal.Signals(signum).name, f"a second {signal.Signals(signum).name}"


async def _with_interrupts(agent: Any, body: Callable[[], Awaitable[Any]]) -> Any:
    """Run `body`; the first Ctrl-C (or SIGTERM) cancels the agent at once, a second one exits on the spot."""
    result = None
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                count = 0
                async for signum in signals:
                    count += 1
                    if count == 1:
                        what, again = _signal_words(signum)
                        err.print(
                            f"\n[yellow]{what}: interrupting, closing sandboxes and MCP servers ({again} exits now)[/]"
                        )
                        agent.cancel(what)
                    else:
                        os._exit(ExitStatus.interrupted.exit_code)

        group.start_soon(watch)
        result = await body()
        group.cancel_scope.cancel()
    return result


def _finish(result: Any) -> None:
    raise typer.Exit(result.exit_code)


@app.command()
def run(
    task: str = typer.Argument("", help="what the agent should do (empty with --demo)"),
    demo: bool = typer.Option(
        False, "--demo", help="the built-in end-to-end demo (tiny random DSV4 + forced tokens, or scripted)"
    ),
    model: Optional[Path] = typer.Option(
        None, "--model", "-m", help="DSV4 checkpoint directory for the embedded engine"
    ),
    scripted: Optional[Path] = typer.Option(
        None, "--scripted", help="JSON list of completion texts: a scripted backend instead of a model"
    ),
    device: Optional[str] = typer.Option(
        None, "--device", help="engine device: cpu, cuda, cuda:1 (default: cuda if present)"
    ),
    temperature: float = typer.Option(1.0, "--temperature", help="engine sampling temperature; 0 = greedy"),
    top_p: float = typer.Option(1.0, "--top-p", help="engine nucleus sampling mass"),
    no_constrain: bool = typer.Option(False, "--no-constrain", help="engine: decode tool calls without the DSML grammar"),
    seed: Optional[int] = typer.Option(None, "--seed", help="engine sampling seed (reproducible runs)"),
    kv_fp8: bool = typer.Option(False, "--kv-fp8", help="store the compressed KV in FP8 (584-byte entries)"),
    tp: int = typer.Option(1, "--tp", help="tensor-parallel ranks for --model: one process and GPU each"),
    remote: Optional[str] = typer.Option(
        None, "--remote", help="a `dsv4-agent serve` URL instead of a local model (key: $DSV4_AGENT_API_KEY)"
    ),
    sandbox: str = typer.Option("docker", "--sandbox", help="docker, local (no isolation) or none"),
    image: Optional[str] = typer.Option(None, "--image", help="docker image for the sandbox"),
    network: bool = typer.Option(False, "--network", help="give the docker sandbox network access"),
    workspace: Optional[Path] = typer.Option(
        None, "--workspace", help="host folder of the sandbox's workspace (default: <run>/workspace)"
    ),
    mcp: List[str] = typer.Option([], "--mcp", help="an MCP server, NAME=COMMAND ARGS or NAME=URL; repeatable"),
    mcp_config: Optional[Path] = typer.Option(None, "--mcp-config", help='JSON file {"mcpServers": {...}}'),
    effort: Optional[str] = typer.Option(
        None, "--effort", help="max (Think Max, the default), high (thinking), none (chat)"
    ),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="turn budget"),
    max_tokens: Optional[int] = typer.Option(
        None, "--max-tokens", help="budget of tokens computed (new prefill + decode)"
    ),
    max_wall: Optional[float] = typer.Option(None, "--max-wall", help="wall-clock budget in seconds"),
    approve: bool = typer.Option(False, "--approve", help="confirm each tool call before it runs"),
    yolo: bool = typer.Option(False, "--yolo", help="run tool calls without asking even outside a docker sandbox"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file of agent settings (AgentConfig)"),
    as_json: bool = JSON_EVENTS,
    output_dir: Path = OUTPUT_DIR,
) -> None:
    """Run one task to completion and exit with its status code."""
    run_id = new_run_id()
    demo_run = None
    if demo:
        from agent.demo import demo_spec

        if task or model or scripted:
            raise _usage_error("--demo runs its own task and backend; drop TASK, --model and --scripted")
        demo_run, task, notes = demo_spec(output_dir, run_id)
        # stdout carries only JSON lines with --json
        (err if as_json else console).print(
            Panel("\n".join(notes), title="dsv4-agent demo: what is real in this run", expand=False)
        )
    elif not task.strip():
        raise _usage_error("give a TASK (or --demo)")
    flags = locals()  # every parameter of this command, by name
    spec = run_spec(run_id, demo_run, **{name: flags[name] for name in SPEC_OPTIONS})
    if spec.config.approval == "confirm" and not os.isatty(0):
        raise _usage_error("tool calls need confirmation but stdin is not a terminal: use --sandbox docker or --yolo")
    _finish(_run_agent(spec, output_dir, lambda agent: agent.run(task, run_id=run_id), as_json))


def run_spec(
    run_id: str | None,
    demo_run: RunSpec | None = None,
    *,
    model: Path | None,
    scripted: Path | None,
    device: str | None,
    temperature: float,
    top_p: float,
    no_constrain: bool,
    seed: int | None,
    kv_fp8: bool,
    tp: int,
    remote: str | None,
    sandbox: str,
    image: str | None,
    network: bool,
    workspace: Path | None,
    mcp: list[str],
    mcp_config: Path | None,
    effort: str | None,
    max_steps: int | None,
    max_tokens: int | None,
    max_wall: float | None,
    approve: bool,
    yolo: bool,
    config: Path | None,
    output_dir: Path,
) -> RunSpec:
    """The RunSpec that `run`'s flags describe (`dsv4-agent mcp` takes the same flags). `demo_run` is the
    demo's spec (its backend wins over the backend flags). With `run_id` None and no --workspace, the
    sandbox's workspace is left for the caller to set per run."""
    if demo_run is not None:
        spec = demo_run
    else:
        backend = _backend_spec(model, scripted, device, tp, remote)
        if backend.kind in ("engine", "remote"):
            try:
                backend = BackendSpec.model_validate(
                    {**backend.model_dump(), "temperature": temperature, "top_p": top_p, "seed": seed, "kv_fp8": kv_fp8})
            except ValidationError as e:
                raise _usage_error(f"bad sampling options: {describe_validation_error(e)}") from None
        spec = RunSpec(backend=backend.model_copy(update={"constrain": not no_constrain}))
    if approve and yolo:
        raise _usage_error("--approve and --yolo contradict each other")
    if sandbox not in ("docker", "local", "none"):
        raise _usage_error(f"--sandbox must be docker, local or none, got {sandbox!r}")
    overrides: dict[str, Any] = {}
    for key, value in (
        ("effort", effort),
        ("max_steps", max_steps),
        ("max_tokens", max_tokens),
        ("max_wall_s", max_wall),
    ):
        if value is not None:
            overrides[key] = value
    # Tools run freely in a docker sandbox; on the host (a local sandbox, MCP servers without a sandbox)
    # each call is confirmed unless --yolo says otherwise.
    on_host = sandbox == "local" or (sandbox == "none" and bool(mcp or mcp_config or spec.mcp))
    overrides["approval"] = "confirm" if approve or (on_host and not yolo and demo_run is None) else "auto"
    try:
        agent_config = _with_flags(AgentConfig.from_yaml(config) if config else spec.config, overrides)
        spec = spec.model_copy(
            update={"mcp": spec.mcp + list(mcp), "mcp_config": str(mcp_config.absolute()) if mcp_config else None}
        )
        build_mcp_servers(spec)  # reject a bad flag or file now, with its message
    except ValueError as e:
        raise _usage_error(str(e)) from None
    if demo_run is None:
        # The run's files live with the run (bind-mounted into a docker sandbox), so `resume` finds them.
        folder = workspace or (output_dir / run_id / "workspace" if run_id else None)
        folder = str(folder.absolute()) if folder is not None and sandbox != "none" else None
        spec.sandbox = SandboxSpec(kind=sandbox, image=image, network=network, workspace=folder)
    return spec.model_copy(update={"config": agent_config})


# The flags `run_spec` reads: `run` hands them on, and `dsv4-agent mcp` shares their definitions.
SPEC_OPTIONS = frozenset(
    name for name, p in inspect.signature(run_spec).parameters.items() if p.kind is p.KEYWORD_ONLY
)


def _backend_spec(
    model: Path | None, scripted: Path | None, device: str | None, tp: int = 1, remote: str | None = None
) -> BackendSpec:
    if remote:
        if model or scripted:
            raise _usage_error("--remote, --model and --scripted are different backends; pick one")
        if not remote.startswith(("http://", "https://")):
            raise _usage_error(f"--remote must be an http(s) URL, got {remote!r}")
        return BackendSpec(kind="remote", url=remote)
    if tp < 1 or (tp > 1 and not model):
        raise _usage_error(f"--tp must be >= 1 and needs --model, got --tp {tp}")
    if model and scripted:
        raise _usage_error("--model and --scripted are two different backends; pick one")
    if scripted:
        try:
            completions = json.loads(scripted.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise _usage_error(f"cannot read --scripted {scripted}: {e}") from None
        if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
            raise _usage_error(f"--scripted {scripted} must hold a JSON list of completion strings")
        return BackendSpec(kind="scripted", completions=completions)
    if model:
        _check_checkpoint(model)
        import torch

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        _check_device(device, tp)
        return BackendSpec(kind="engine", model=str(model.absolute()), device=device, tp=tp)
    raise _usage_error("no model: pass --model PATH (a DSV4 checkpoint), --scripted FILE, or --demo")


def _check_checkpoint(model: Path) -> None:
    if not model.is_dir():
        raise _usage_error(f"--model {model} is not a checkpoint directory")
    if not (model / "config.json").is_file():
        raise _usage_error(f"--model {model} is not a DSV4 checkpoint: it has no config.json")
    if not any((model / name).is_file() for name in CHECKPOINT_WEIGHTS):
        raise _usage_error(
            f"--model {model} is not a DSV4 checkpoint: it has neither {' nor '.join(CHECKPOINT_WEIGHTS)}"
        )


def _check_device(device: str, tp: int) -> None:
    """A device this machine has, with a GPU a rank under --tp on CUDA."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise _usage_error(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return
    if parsed.type != "cuda":
        raise _usage_error(f"--device {device!r}: the engine runs on cpu or cuda")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        raise _usage_error(f"--device {device}: this machine has no CUDA GPU (use --device cpu)")
    if parsed.index is not None and parsed.index >= gpus:
        raise _usage_error(f"--device {device}: this machine has {gpus} CUDA GPU(s), cuda:0 to cuda:{gpus - 1}")
    if tp > gpus:
        raise _usage_error(f"--tp {tp} on CUDA needs {tp} GPUs (one a rank); this machine has {gpus}")


def _with_flags(config: AgentConfig, flags: dict[str, Any]) -> AgentConfig:
    """`config` with the values of command-line flags on top, checked; a bad value is a usage error naming its flag."""
    try:
        return AgentConfig.model_validate({**config.model_dump(), **flags})
    except ValidationError as e:
        names = {field: flag for field, flag in CONFIG_FLAGS.items() if field in flags}
        raise _usage_error(describe_validation_error(e, names)) from None


def _run_agent(spec: RunSpec, output_dir: Path, start: Callable[[Any], Awaitable[Any]], as_json: bool = False) -> Any:
    """Build the agent and run it under Ctrl-C handling; `as_json` prints trajectory lines, not the display."""

    def emit(lines: str) -> None:
        sys.stdout.write(lines)
        sys.stdout.flush()

    try:
        agent = build_agent(
            spec,
            output_dir=output_dir,
            observer=Observer() if as_json else RichDisplay(console),
            on_event=emit if as_json else None,
        )
    except (ValueError, ImportError) as e:
        raise _usage_error(str(e)) from None
    try:
        return anyio.run(_with_interrupts, agent, lambda: start(agent))
    except BaseExceptionGroup as group:  # an error of `start` arrives wrapped by the interrupt watcher's task group
        leaf = single_leaf(group)
        if leaf is group:
            raise
        raise leaf from None


def _load(run_arg: str, output_dir: Path) -> tuple[Path, list[Any]]:
    try:
        run_dir = resolve_run(run_arg, output_dir)
        return run_dir, read_events(run_dir / TRAJECTORY_FILE)
    except TrajectoryError as e:
        raise _usage_error(str(e)) from None


def _spec_of(started: RunStarted) -> RunSpec:
    if not started.spec:
        raise _usage_error(f"run {started.run_id} was started from Python; continue it with Agent.resume()")
    return RunSpec.model_validate(started.spec)


@app.command()
def resume(
    run_arg: str = typer.Argument("last", metavar="RUN", help="run id, run folder, or `last`"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="a new turn budget (counting all steps)"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="a new token budget (counting all tokens)"),
    max_wall: Optional[float] = typer.Option(None, "--max-wall", help="wall-clock seconds for this session"),
    as_json: bool = JSON_EVENTS,
    output_dir: Path = OUTPUT_DIR,
) -> None:
    """Continue an interrupted run (Ctrl-C, a crash, SIGKILL, a spent budget) in place."""
    run_dir, events = _load(run_arg, output_dir)
    try:  # checked again, under the run's lock, by Agent.resume: here so that nothing starts for nothing
        History.from_events(events).check_resumable()
    except TrajectoryError as e:
        raise _usage_error(str(e)) from None
    spec = _spec_of(events[0])
    updates = {
        k: v
        for k, v in (("max_steps", max_steps), ("max_tokens", max_tokens), ("max_wall_s", max_wall))
        if v is not None
    }
    spec = spec.model_copy(update={"config": _with_flags(spec.config, updates)})
    try:
        _finish(_run_agent(spec, run_dir.parent, lambda agent: agent.resume(run_dir), as_json))
    except TrajectoryError as e:
        raise _usage_error(str(e)) from None


@app.command()
def replay(
    run_arg: str = typer.Argument("last", metavar="RUN", help="run id, run folder, or `last`"),
    output_dir: Path = OUTPUT_DIR,
) -> None:
    """Re-run a recorded run with its exact decoded tokens (scripted backend) and compare what happened."""
    from agent.replay import compare

    _, events = _load(run_arg, output_dir)
    spec = _spec_of(events[0])
    recorded = sorted((e for e in events if e.event == "engine_call"), key=lambda e: e.step)
    run_id = new_run_id()
    sandbox = spec.sandbox
    if sandbox.kind != "none":  # a fresh workspace: the replay must not see the original run's files
        sandbox = sandbox.model_copy(update={"workspace": str((output_dir / run_id / "workspace").absolute())})
    backend = BackendSpec(kind="scripted", completions=[e.token_ids for e in recorded])
    spec = spec.model_copy(update={"backend": backend, "sandbox": sandbox})
    result = _run_agent(spec, output_dir, lambda agent: agent.run(events[0].task, run_id=run_id))
    report = compare(events, read_events(result.trajectory_path))
    report.render(console)
    raise typer.Exit(0 if report.same else 1)


@app.command()
def inspect(
    run_arg: str = typer.Argument("last", metavar="RUN", help="run id, run folder, or `last`"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    output_dir: Path = OUTPUT_DIR,
) -> None:
    """Summarise a run: status, per-step tokens (prefill new vs reused), tool calls and results."""
    from agent.summary import render, summarise

    _, events = _load(run_arg, output_dir)
    summary = summarise(events)
    if as_json:
        console.print_json(summary.model_dump_json())
    else:
        render(summary, console)


@app.command()
def serve(
    model: Path = typer.Option(..., "--model", "-m", help="DSV4 checkpoint directory"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
    port: int = typer.Option(8000, "--port", help="port to listen on"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if present)"),
    tp: int = typer.Option(1, "--tp", help="tensor-parallel ranks: one process and GPU each"),
    kv_fp8: bool = typer.Option(False, "--kv-fp8", help="store the compressed KV in FP8 (584-byte entries)"),
    max_sessions: int = typer.Option(8, "--max-sessions", help="resident sessions kept for prefix reuse (LRU)"),
    name: Optional[str] = typer.Option(None, "--served-model-name", help="model id in the API (default: folder name)"),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="DSV4_AGENT_API_KEY", show_envvar=True,
        help="require 'Authorization: Bearer KEY' on every request (401 otherwise)"),
    kv_budget: Optional[float] = typer.Option(
        None, "--kv-budget", help="GiB of KV cache on the device (default: the GPU's free memory once the weights "
        "are loaded, less max(2 GiB, 10 %); on CPU half the available host memory)"),
    request_timeout: float = typer.Option(600.0, "--request-timeout", help="seconds a request may run (504 after)"),
    default_max_tokens: int = typer.Option(
        8192, "--default-max-tokens", help="tokens a chat request naming no max_tokens decodes at most"),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API; requests run together on the engine's scheduler
    and reuse resident sessions by token prefix.

    Exits 2 on bad flags and 1 when the address cannot be listened on (a busy port) or the model fails to load.
    """
    from agent.server import listen
    from agent.server import serve as run_server

    spec = _backend_spec(model, None, device, tp)
    if max_sessions < 1 or default_max_tokens < 1:
        raise _usage_error(f"--max-sessions and --default-max-tokens must be >= 1, got {max_sessions} and "
                           f"{default_max_tokens}")
    if not request_timeout > 0 or (kv_budget is not None and not kv_budget > 0):
        raise _usage_error(f"--request-timeout and --kv-budget must be > 0, got {request_timeout} and {kv_budget}")
    if not 1 <= port <= 65535:
        raise _usage_error(f"--port must be a TCP port, 1 to 65535, got {port}")
    try:  # before the model loads: a busy port fails at once, and the port stays ours while it loads
        sock = listen(host, port)
    except OSError as e:
        why = "the address is already in use: another server runs there, pick another --port" if (
            e.errno == errno.EADDRINUSE) else (e.strerror or str(e))
        raise _error(f"cannot listen on {host}:{port}: {why}", ExitStatus.error) from None
    import torch

    from dsv4 import Engine
    from encoding import Tokenizer

    dtype = torch.float32 if spec.device == "cpu" else torch.bfloat16  # as EngineBackend
    try:
        engine = Engine(spec.model, device=spec.device, dtype=dtype, kv_fp8=kv_fp8, tp=tp,
                        kv_budget_bytes="auto" if kv_budget is None else int(kv_budget * 2**30))
    except (OSError, ValueError) as e:  # a missing or inconsistent checkpoint file (dsv4.CheckpointError)
        sock.close()
        raise _error(f"cannot load --model {model}: {e}", ExitStatus.error) from None
    tokenizer = engine.tokenizer if isinstance(engine.tokenizer, Tokenizer) else Tokenizer.default()
    bound_host, bound_port = sock.getsockname()[:2]
    err.print(f"serving {escape(name or model.name)} on http://{bound_host}:{bound_port} (Ctrl-C stops it)")
    try:
        run_server(engine, tokenizer, model_name=name or model.name, max_sessions=max_sessions, sock=sock,
                   api_key=api_key or None, request_timeout_s=request_timeout, default_max_tokens=default_max_tokens)
    except ValueError as e:
        raise _usage_error(str(e)) from None


@app.command()
def version() -> None:
    """Print the installed version."""
    from importlib.metadata import version as _v

    typer.echo(_v("dsv4-agent"))


app.command("mcp")(mcp_server.command(run, run_spec))
app.add_typer(sandbox_app, name="sandbox")
