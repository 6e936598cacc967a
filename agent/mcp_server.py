"""`dsv4-agent mcp`: the runtime as an MCP server (stdio, or streamable HTTP with --port), so any MCP host
can drive the agent. (The agent's own MCP *client*, for the tools it calls, is tools/mcp/.)

Tools, with fixed names:
  run(task, effort?, max_steps?)  a new run to its end; the final answer as text, and as structured
                                  content {run_id, status, exit_code, final_answer, steps, trajectory_path}
  reply(run_id, message)          the message as a new user turn of that run, same result shape
  inspect(run_id)                 the per-step summary `dsv4-agent inspect` prints

Each run is an `Agent` with its own backend session, sandbox and MCP servers; several run at once. The
agent is resident: its backend session outlives the call, so a `reply` prefills only the message's
tokens. A run this process does not hold (an earlier server's, `dsv4-agent run`'s) comes back from the
KV session saved when its last call ended, or from its trajectory by one full prefill; a run whose last
call did not finish is resumed first (`Agent.reply`). An engine backend loads the checkpoint once, on
the first call, for every run, and the runs' decode steps batch on its scheduler; with --kv-budget,
the engine moves idle runs' sessions to host memory when the budget is full, and when it still refuses
a working run's prefill or decode, idle runs' sessions are spilled to their run folders (least recently
used first); either way they come back on their next reply. Progress notifications follow each run (step, tool being called, tokens so far);
cancelling a call stops its run as `interrupted` and closes its sandbox. Every failure (bad arguments,
an unknown run id, a run still working) is a tool error whose text says what went wrong.
"""

# No `from __future__ import annotations`: the SDK reads the tool functions' annotations as objects.
import inspect
import io
import itertools
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import anyio
import typer
from pydantic import BaseModel, ValidationError

from agent.display import Observer
from agent.loop import KV_SESSION_DIR, RunResult
from agent.spec import RunSpec, build_agent
from agent.status import ExitStatus
from agent.trajectory import TRAJECTORY_FILE, TrajectoryError, Usage, new_run_id, read_events

logger = logging.getLogger(__name__)

RUN_ID_PATTERN = r"^[0-9A-Za-z][0-9A-Za-z._-]*$"  # a folder name in the output dir, never a path
TOKENS_PER_PROGRESS = 128  # decoded tokens between two "decoding" progress notifications
FAILED_STATUSES = (ExitStatus.error, ExitStatus.usage)  # outcomes returned as tool errors (isError)


class CallFailed(Exception):
    """A call that cannot run (unknown run, run still working, bad input); the message is the tool error."""


class RunOutcome(BaseModel):
    """The structured result of `run` and `reply`."""

    run_id: str
    status: str
    exit_code: int
    final_answer: str | None
    steps: int
    trajectory_path: str


class Progress(Observer):
    """The loop's hooks as progress messages (step, the tool being called, tokens so far), queued for the
    call's progress notifications. `progress` counts the notifications, so it always increases."""

    def __init__(self, send: Any) -> None:
        self.send = send
        self.count = itertools.count(1)
        self.step = 0
        self.max_steps = 0
        self.decoded_since = 0

    def _emit(self, message: str) -> None:
        self.send.send_nowait((next(self.count), message))

    def turn_started(self, step: int, max_steps: int) -> None:
        self.step, self.max_steps, self.decoded_since = step, max_steps, 0
        self._emit(f"step {step}/{max_steps}")

    def prefilled(self, step: int, new: int, reused: int, seconds: float) -> None:
        self._emit(f"step {step}: prefilled {new:,} new tokens, {reused:,} reused from the KV cache")

    def token(self, usage: Usage) -> None:
        self.decoded_since += 1
        if self.decoded_since % TOKENS_PER_PROGRESS == 0:
            self._emit(f"step {self.step}: decoding, {usage.processed:,} tokens computed")

    def tool_call_started(self, name: str) -> None:
        self._emit(f"step {self.step}: calling {name}")

    def tool_result(self, outcome: Any) -> None:
        self._emit(f"step {self.step}: {outcome.name} {'failed' if outcome.is_error else 'returned'}")

    def turn_finished(self, step: int, turn: Usage, total: Usage, prefill_s: float, decode_s: float,
                      info: dict) -> None:
        self._emit(f"step {step} done: {total.processed:,} tokens computed in all")


@dataclass
class Conversation:
    """A run this server holds: its agent (and so its resident session) between calls."""

    run_id: str
    run_dir: Path
    agent: Any
    busy: bool = False
    last_used: int = 0  # a tick of `AgentRuns.clock`: which idle session to spill first


@dataclass
class AgentRuns:
    """The runs of one server: built from one spec (the CLI flags), on one engine for an engine backend."""

    spec: RunSpec
    output_dir: Path
    kv_budget_bytes: int | None = None
    conversations: dict[str, Conversation] = field(default_factory=dict)
    clock: Any = field(default_factory=itertools.count)
    _engine: Any = None
    _engine_lock: Any = field(default_factory=anyio.Lock)

    # ---- the tools ------------------------------------------------------------------------------
    async def run(self, task: str, effort: str | None, max_steps: int | None,
                  report: Callable[[int, str], Awaitable[None]]) -> RunResult:
        if not task.strip():
            raise CallFailed("the task is empty")
        overrides = {k: v for k, v in (("effort", effort), ("max_steps", max_steps)) if v is not None}
        run_id = new_run_id()
        try:
            config = self.spec.config.model_validate({**self.spec.config.model_dump(), **overrides})
        except ValidationError as e:
            raise CallFailed(f"bad arguments: {e}") from None
        spec = self.spec.model_copy(update={"config": config, "sandbox": self._sandbox_for(run_id, None)})
        conversation = await self._open(run_id, spec)
        return await self._call(conversation, lambda agent: agent.run(task, run_id=run_id), report)

    async def reply(self, run_id: str, message: str, report: Callable[[int, str], Awaitable[None]]) -> RunResult:
        if not message.strip():
            raise CallFailed("the message is empty")
        run_dir = self.run_dir(run_id)
        conversation = self.conversations.get(run_id)
        if conversation is None:
            conversation = await self._open(run_id, self._spec_of(run_id, run_dir))
        return await self._call(conversation, lambda agent: agent.reply(run_dir, message), report)

    def inspect(self, run_id: str) -> Any:
        from agent.summary import summarise

        summary = summarise(self._events(self.run_dir(run_id)))
        conversation = self.conversations.get(run_id)
        if conversation is not None and conversation.busy:
            summary = summary.model_copy(update={"status": "running", "exit_code": None, "message": "",
                                                 "final_answer": None})
        return summary

    # ---- runs and their agents ------------------------------------------------------------------
    def run_dir(self, run_id: str) -> Path:
        run_dir = self.output_dir / run_id
        if not re.match(RUN_ID_PATTERN, run_id) or not (run_dir / TRAJECTORY_FILE).is_file():
            raise CallFailed(f"unknown run id {run_id!r}: no run of that id in {self.output_dir}")
        return run_dir

    def _events(self, run_dir: Path) -> list[Any]:
        try:
            return read_events(run_dir / TRAJECTORY_FILE)
        except TrajectoryError as e:
            raise CallFailed(str(e)) from None

    def _spec_of(self, run_id: str, run_dir: Path) -> RunSpec:
        """This server's spec for a run it did not start: the run's own settings (effort, budgets, system
        prompt: the history must render as it was) and workspace, this server's backend, tools and approval."""
        recorded = self._events(run_dir)[0].spec
        config, workspace = self.spec.config, None
        if recorded:
            try:
                earlier = RunSpec.model_validate(recorded)
            except ValidationError as e:
                raise CallFailed(f"run {run_id} records a spec this version cannot read: {e}") from None
            config = earlier.config.model_copy(update={"approval": self.spec.config.approval})
            workspace = earlier.sandbox.workspace
        return self.spec.model_copy(update={"config": config, "sandbox": self._sandbox_for(run_id, workspace)})

    def _sandbox_for(self, run_id: str, workspace: str | None) -> Any:
        sandbox = self.spec.sandbox
        if sandbox.kind == "none" or sandbox.workspace is not None:
            return sandbox
        folder = workspace or str((self.output_dir / run_id / "workspace").absolute())
        return sandbox.model_copy(update={"workspace": folder})

    async def _open(self, run_id: str, spec: RunSpec) -> Conversation:
        engine = await self._shared_engine()
        if run_id in self.conversations:  # another call opened it while the engine loaded
            return self.conversations[run_id]
        try:
            agent = build_agent(spec, output_dir=self.output_dir, engine=engine, make_room=self.make_room,
                                resident=True)
        except (ValueError, ImportError) as e:
            raise CallFailed(str(e)) from None
        conversation = Conversation(run_id, self.output_dir / run_id, agent)
        self.conversations[run_id] = conversation
        return conversation

    async def _shared_engine(self) -> Any:
        """The engine every run's backend shares (engine backend), loaded once, on the first call."""
        backend = self.spec.backend
        if backend.kind != "engine":
            return None
        async with self._engine_lock:
            if self._engine is None:
                from agent.backends.engine import load_engine

                def load() -> Any:
                    return load_engine(backend.model, device=backend.device, kv_fp8=backend.kv_fp8, tp=backend.tp,
                                       kv_budget_bytes=self.kv_budget_bytes)

                try:
                    self._engine = await anyio.to_thread.run_sync(load)
                except Exception as e:  # noqa: BLE001 - a checkpoint that cannot load fails this call, not the server
                    raise CallFailed(f"cannot load the model {backend.model}: {type(e).__name__}: {e}") from None
        return self._engine

    async def _call(self, conversation: Conversation, start: Callable[[Any], Awaitable[RunResult]],
                    report: Callable[[int, str], Awaitable[None]]) -> RunResult:
        """Run one call of a conversation with its progress forwarded; refused while another call works on it."""
        if conversation.busy:
            raise CallFailed(f"run {conversation.run_id} is still working: wait for its result (or cancel that "
                             "call) before replying")
        conversation.busy = True
        agent = conversation.agent
        send, receive = anyio.create_memory_object_stream[tuple[int, str]](math.inf)
        result: RunResult | None = None
        refused = ""
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(_forward, receive, report)
                agent.observer = Progress(send)
                with send:  # closing it ends _forward once the queue is sent
                    try:
                        result = await start(agent)
                    except ValueError as e:  # a run that cannot be continued (TrajectoryError), an empty text
                        refused = str(e)
        finally:
            agent.observer = Observer()
            conversation.busy = False
            conversation.last_used = next(self.clock)
        if result is None:
            raise CallFailed(refused)
        return result

    def make_room(self) -> bool:
        """Spill the least recently used idle session on the device to its run folder (on disk); False
        when there is none. Called by a working run's backend when the KV budget refuses it."""
        idle = sorted((c for c in self.conversations.values() if not c.busy), key=lambda c: c.last_used)
        for conversation in idle:
            session = getattr(conversation.agent.backend, "session", None)
            if session is not None and session.location == "device" and session.kv_bytes() > 0:
                session.spill(conversation.run_dir / KV_SESSION_DIR)
                logger.info("spilled the idle session of run %s to disk", conversation.run_id)
                return True
        return False

    async def aclose(self) -> None:
        for conversation in self.conversations.values():
            await conversation.agent.close()
        self.conversations.clear()


async def _forward(receive: Any, report: Callable[[int, str], Awaitable[None]]) -> None:
    """Send queued progress messages; a client that cannot take them does not stop the run."""
    with receive:
        async for progress, message in receive:
            try:
                await report(progress, message)
            except Exception as e:  # noqa: BLE001 - progress is best effort
                logger.warning("progress notification not sent: %s", e)


def outcome(result: RunResult) -> Any:
    """A run's result as a tool result: the final answer (or why there is none), then the run id."""
    from mcp_types import CallToolResult, TextContent

    data = RunOutcome(run_id=result.run_id, status=result.status.value, exit_code=result.exit_code,
                      final_answer=result.final_answer, steps=result.steps,
                      trajectory_path=str(result.trajectory_path))
    if result.final_answer is not None:
        answer = result.final_answer
    else:
        answer = f"the run stopped with status {result.status.value} (exit code {result.exit_code})" + (
            f": {result.message}" if result.message else "")
    note = f"run_id: {result.run_id} · {result.status.value} · {result.steps} steps (continue it with `reply`)"
    return CallToolResult(content=[TextContent(type="text", text=answer), TextContent(type="text", text=note)],
                          structured_content=data.model_dump(mode="json"),
                          is_error=result.status in FAILED_STATUSES)


def create_server(runs: AgentRuns) -> Any:
    """The MCP server (mcp SDK `MCPServer`) with the three tools over `runs`."""
    # The SDK is imported here, not at module level: every `dsv4-agent` command imports this module.
    from typing import Annotated, Literal

    from mcp.server.mcpserver import Context, MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp_types import CallToolResult, TextContent, ToolAnnotations
    from pydantic import Field

    from agent.summary import RunSummary, render

    server = MCPServer(
        "dsv4-agent",
        instructions="DeepSeek-V4 as a tool-using agent. `run` starts a task and returns its run_id with the "
        "answer; `reply` continues that run's conversation (its KV cache stays resident, so a reply costs only "
        "its new tokens); `inspect` summarises a run step by step.",
        log_level="WARNING",
    )
    RunId = Annotated[str, Field(description="a run id from `run` (or `dsv4-agent run`)", pattern=RUN_ID_PATTERN,
                                 max_length=128)]

    def reporter(ctx: Context) -> Callable[[int, str], Awaitable[None]]:
        async def report(progress: int, message: str) -> None:
            await ctx.report_progress(progress, None, message)

        return report

    async def checked(call: Awaitable[RunResult]) -> CallToolResult:
        try:
            return outcome(await call)
        except CallFailed as e:
            raise ToolError(str(e)) from None

    @server.tool(name="run", description="Run the agent on a task until it answers it or a budget stops it.")
    async def run_tool(
        task: Annotated[str, Field(description="what the agent should do", min_length=1)],
        ctx: Context,
        effort: Annotated[Optional[Literal["none", "high", "max"]],
                          Field(description="max: Think Max (default), high: thinking, none: chat")] = None,
        max_steps: Annotated[Optional[int], Field(description="turn budget of this run", ge=1)] = None,
    ) -> Annotated[CallToolResult, RunOutcome]:
        return await checked(runs.run(task, effort, max_steps, reporter(ctx)))

    @server.tool(name="reply", description="Continue a run's conversation with a new user message.")
    async def reply_tool(
        run_id: RunId,
        message: Annotated[str, Field(description="the user's next message", min_length=1)],
        ctx: Context,
    ) -> Annotated[CallToolResult, RunOutcome]:
        return await checked(runs.reply(run_id, message, reporter(ctx)))

    @server.tool(name="inspect", description="A run's summary: status, per-step tokens (new vs reused), tool calls.",
                 annotations=ToolAnnotations(read_only_hint=True))
    def inspect_tool(run_id: RunId) -> Annotated[CallToolResult, RunSummary]:
        try:
            summary = runs.inspect(run_id)
        except CallFailed as e:
            raise ToolError(str(e)) from None
        text = io.StringIO()
        from rich.console import Console

        render(summary, Console(file=text, width=110, color_system=None, highlight=False))
        return CallToolResult(content=[TextContent(type="text", text=text.getvalue())],
                              structured_content=summary.model_dump(mode="json"))

    return server


def serve(spec: RunSpec, *, output_dir: Path, port: int | None = None, host: str = "127.0.0.1",
          kv_budget_bytes: int | None = None) -> None:
    """Serve until the client closes stdin (stdio) or the process is stopped (HTTP); resident sessions are
    closed on the way out."""

    async def main() -> None:
        runs = AgentRuns(spec, output_dir.absolute(), kv_budget_bytes)
        server = create_server(runs)
        try:
            if port is None:
                await server.run_stdio_async()
            else:
                await server.run_streamable_http_async(host=host, port=port)
        finally:
            with anyio.CancelScope(shield=True):
                await runs.aclose()

    anyio.run(main)


# ---- the CLI command ---------------------------------------------------------------------------
NOT_SHARED = ("task", "demo", "approve", "as_json")  # `run`'s flags that mean nothing for a server


def command(run: Callable[..., Any], run_spec: Callable[..., RunSpec]) -> Callable[..., None]:
    """The `dsv4-agent mcp` command. Its flags are `run`'s own typer options (so both stay the same),
    less NOT_SHARED, plus --port, --host and --kv-budget; `run_spec` turns them into the spec."""

    def mcp(*, port: Optional[int], host: str, kv_budget: Optional[float], **flags: Any) -> None:
        spec = run_spec(None, None, approve=False, **flags)
        if spec.config.approval == "confirm":
            raise typer.BadParameter("tools would run on the host, and an MCP server cannot ask before each "
                                     "call: use --sandbox docker, or --yolo", param_hint="--sandbox")
        if kv_budget is not None and (kv_budget <= 0 or spec.backend.kind != "engine"):
            raise typer.BadParameter("must be > 0 GiB, with --model", param_hint="--kv-budget")
        serve(spec, output_dir=flags["output_dir"], port=port, host=host,
              kv_budget_bytes=None if kv_budget is None else int(kv_budget * 2**30))

    own = [
        inspect.Parameter("port", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[int], default=typer.Option(
            None, "--port", help="serve streamable HTTP on this port (at /mcp) instead of stdio")),
        inspect.Parameter("host", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=typer.Option(
            "127.0.0.1", "--host", help="address to listen on with --port")),
        inspect.Parameter("kv_budget", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[float],
                          default=typer.Option(None, "--kv-budget", help="GiB of KV cache on the device for all runs "
                                               "(--model); idle runs' sessions spill to disk past it")),
    ]
    shared = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
              for name, p in inspect.signature(run, eval_str=True).parameters.items() if name not in NOT_SHARED]
    mcp.__signature__ = inspect.Signature(own + shared)  # what typer reads the options from
    mcp.__annotations__ = {p.name: p.annotation for p in own + shared}
    mcp.__doc__ = ("Serve the agent to MCP hosts: tools run, reply and inspect, over stdio (or streamable HTTP "
                   "with --port); takes `run`'s backend, sandbox, MCP and budget flags.")
    return mcp
