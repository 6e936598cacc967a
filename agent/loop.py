"""The agent loop: one resident token session, append-only turns, every event on disk as it happens.

    agent = Agent(backend=ScriptedBackend([...]), tools=builtin_tools(), sandbox=LocalSandbox(dir))
    result = await agent.run("write hello.py and run it")   # RunResult(status, final_answer, trajectory_path)

A run, step by step:
  1. render system prompt + tool schemas (sorted by name, rendered once) + task; prefill them;
  2. decode in Think Max; the stream parser hands out tool calls as they close (parallel-safe ones start);
  3. run the remaining calls; every failure becomes a tool result;
  4. encode only the new messages (tool results, notices) with `AppendOnlyEncoder.append`, prefill just
     those ids into the same session, and go to 2 — until the model answers without a call or a stop
     rule fires (budgets, format errors, stuck, Ctrl-C).

`reply(run, message)` continues a run's conversation: the message is appended as a user turn after
the last step and steps 2-4 run again. With `resident=True` the backend's session outlives each call,
so a reply prefills only the message's ids; otherwise (a new process) the session comes back from a
KV session saved at the end of the run, or from the trajectory by one full prefill.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import anyio

from agent.backends.base import Backend, ContextFull
from agent.config import AgentConfig
from agent.display import Observer
from agent.guards import Budget, FormatErrors, StuckDetector
from agent.history import History, StepRecord, prompt_messages, result_event, turn_notices
from agent.status import ExitStatus, RunStopped, single_leaf
from agent.stream import DecodedTurn, decode_turn
from agent.tooling import ToolOutcome, ToolRunner, TurnCalls
from agent.trajectory import (
    TRAJECTORY_FILE,
    EngineCall,
    ExitEvent,
    Notice,
    ParsedCall,
    RunResumed,
    RunStarted,
    SandboxEvent,
    ToolCall,
    TrajectoryWriter,
    Usage,
    UserMessage,
    new_run_id,
    read_events,
    resolve_run,
    run_lock,
)

CLEANUP_TIMEOUT_S = 30.0  # sandboxes and MCP servers get this long to close, even after Ctrl-C
KV_SESSION_DIR = "kv_session"  # in a run's folder: its KV session, saved when a call ends (engine backend)
RERUN_NOTE = (
    "[Note: this call was already running when the run was interrupted, and its result was lost. It was "
    "started again from the beginning on resume, so what the first attempt did (files written, commands run, "
    "processes started) may have happened twice.]"
)


@dataclass
class RunResult:
    status: ExitStatus
    final_answer: str | None
    trajectory_path: Path
    run_id: str
    steps: int
    usage: Usage
    wall_s: float
    message: str = ""

    @property
    def exit_code(self) -> int:
        return self.status.exit_code


class Agent:
    """A DSV4 agent: a backend (token session), tools, an optional sandbox and MCP servers.

    The agent enters the sandbox and the MCP servers itself (they must not be open already) and
    always closes them, on success, error, budget stop and Ctrl-C alike. The backend is closed at
    the end of each call too, unless `resident`: then its session stays for the next `reply` and
    `close()` releases it.
    """

    def __init__(
        self,
        backend: Backend,
        tools: Sequence[Any] | None = None,
        sandbox: Any | None = None,
        mcp_servers: Sequence[Any] = (),
        effort: str | None = None,
        max_steps: int | None = None,
        *,
        config: AgentConfig | None = None,
        output_dir: str | Path = "runs",
        observer: Observer | None = None,
        tokenizer: Any | None = None,
        spec: dict[str, Any] | None = None,
        on_event: Callable[[str], None] | None = None,
        resident: bool = False,
    ) -> None:
        overrides = {k: v for k, v in {"effort": effort, "max_steps": max_steps}.items() if v is not None}
        self.config = (config or AgentConfig()).model_copy(update=overrides)
        AgentConfig.model_validate(self.config.model_dump())  # reject a bad effort or step count here, not mid-run
        self.backend = backend
        self.sandbox = sandbox
        self.mcp_servers = list(mcp_servers)
        self.tools = list(tools) if tools is not None else None
        self.output_dir = Path(output_dir)
        self.observer = observer or Observer()
        self.spec = spec or {}
        self.on_event = on_event  # gets each trajectory line (JSON + newline) as it is written
        self._tokenizer = tokenizer
        self.resident = resident
        self._backend_open = False
        self._scope: anyio.CancelScope | None = None
        self._cancelled = False
        self._cancel_reason = ""

    # --- public entry points ---------------------------------------------------------------------------
    async def run(self, task: str, *, run_id: str | None = None) -> RunResult:
        """Run `task` to an exit status; the trajectory goes to `<output_dir>/<run_id>/trajectory.jsonl`."""
        if not task.strip():
            raise ValueError("the task is empty")
        run_id = run_id or new_run_id()
        run_dir = self.output_dir / run_id
        with run_lock(run_dir):
            return await self._execute(run_dir, run_id, task, history=None)

    async def resume(self, run: str | Path) -> RunResult:
        """Continue an interrupted run (Ctrl-C, SIGKILL, a spent budget) from its trajectory, in place.

        Raises `TrajectoryError` when the run cannot be resumed: it completed, it ended before its
        first prompt, its log is unreadable, or another process holds it (`RunBusy`).
        """
        run_dir = resolve_run(str(run), self.output_dir)
        with run_lock(run_dir):
            return await self._resume_held(run_dir)

    async def _resume_held(self, run_dir: Path) -> RunResult:
        """`resume` of a run whose lock this agent holds; read under it, so what is read is what is continued."""
        history = History.from_events(read_events(run_dir / TRAJECTORY_FILE))
        history.check_resumable()
        return await self._execute(run_dir, history.started.run_id, history.started.task, history=history)

    async def reply(self, run: str | Path, message: str) -> RunResult:
        """Continue a run's conversation: `message` becomes a user turn after its last step, then the
        loop runs until the model answers it or a stop rule fires (budgets count this call only).
        A run whose last call did not finish (interrupted, killed) is resumed to its end first."""
        if not message.strip():
            raise ValueError("the message is empty")
        run_dir = resolve_run(str(run), self.output_dir)
        with run_lock(run_dir):  # one lock over the resume and the reply: no other process slips in between
            history = History.from_events(read_events(run_dir / TRAJECTORY_FILE))
            history.check_replyable()
            if history.unfinished():
                resumed = await self._resume_held(run_dir)
                if resumed.status is ExitStatus.interrupted:
                    return resumed
                history = History.from_events(read_events(run_dir / TRAJECTORY_FILE))
            return await self._execute(run_dir, history.started.run_id, history.started.task, history=history,
                                       message=message)

    async def close(self) -> None:
        """Release a resident backend (its session); safe to call twice."""
        if self._backend_open:
            self._backend_open = False
            await _shielded(self.backend.close)

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop the current run at once (decoding included); resources are still closed. Status: interrupted,
        with `reason` (the CLI says Ctrl-C or SIGTERM) in the exit message."""
        self._cancelled = True
        self._cancel_reason = reason
        if self._scope is not None:
            self._scope.cancel()

    @contextmanager
    def _interruptible(self) -> Iterator[None]:
        """A phase `cancel()` stops at once; the run then ends as interrupted once resources are closed."""
        if self._cancelled:
            raise RunStopped(ExitStatus.interrupted, "interrupted")
        try:
            with anyio.CancelScope() as self._scope:
                yield
        finally:
            self._scope = None
        if self._cancelled:
            raise RunStopped(ExitStatus.interrupted, "interrupted")

    # --- one run ---------------------------------------------------------------------------------------
    async def _execute(
        self, run_dir: Path, run_id: str, task: str, history: History | None, message: str | None = None
    ) -> RunResult:
        from encoding import AppendOnlyEncoder

        writer = TrajectoryWriter(run_dir / TRAJECTORY_FILE, tee=self.on_event)
        started = time.monotonic()
        self._cancelled = False
        state = _State(usage=history.usage() if history else Usage(), run_started_written=history is not None)
        status, reason = ExitStatus.error, ""
        if message is None:  # a run or a resume: the budgets count the whole run
            budget = Budget(self.config, started)
        else:  # a reply: they count this call
            budget = Budget(self.config, started, steps_before=len(history.steps), tokens_before=state.usage.processed)
        try:
            # `opening` lets cancel() end the start of an MCP server that never answers: an entered server
            # holds its task group open, so only a scope around the whole stack can cancel its start.
            with anyio.CancelScope() as opening:
                async with AsyncExitStack() as resources:  # closed outside every cancel scope below
                    tokenizer = self._tokenizer_or_default()
                    thinking = self.config.effort != "none"
                    encoder = AppendOnlyEncoder(
                        tokenizer,
                        thinking_mode="thinking" if thinking else "chat",
                        reasoning_effort="max" if self.config.effort == "max" else None,
                    )
                    resumed_from = len(history.steps) + 1 if history else None
                    self.observer.run_started(run_id, self.backend.label, task, resumed_from)
                    if not self._backend_open:
                        self.observer.starting("starting the backend")
                        with self._interruptible():
                            await self.backend.start(tokenizer)  # may load weights: Ctrl-C stops it
                        self._backend_open = True
                    tools = await self._open(resources, writer, opening)
                    self.observer.tools_ready(list(tools))
                    runner = self._runner(tools, run_id)
                    with self._interruptible(), anyio.CancelScope(deadline=budget.deadline or float("inf")) as wall:
                        state.pending = await self._begin(
                            writer, run_dir, run_id, task, encoder, runner, tools, history, state, message
                        )
                        if state.pending is not None:
                            state.final_answer = await self._steps(
                                writer, tokenizer, encoder, runner, budget, thinking, state
                            )
                        status = ExitStatus.completed
                    if wall.cancelled_caught and not self._cancelled:
                        status, reason = ExitStatus.timeout, f"wall-clock budget spent ({self.config.max_wall_s:g} s)"
        except Exception as e:  # noqa: BLE001 - recorded in the trajectory and returned as status error
            leaf = single_leaf(e)  # a stop raised inside a turn's task group arrives wrapped in a group
            if isinstance(leaf, RunStopped):
                status, reason = leaf.status, leaf.message
            elif isinstance(leaf, ContextFull):
                status, reason = ExitStatus.context_full, str(leaf)
            else:
                status, reason = ExitStatus.error, f"{type(leaf).__name__}: {leaf}"
        except BaseException:  # KeyboardInterrupt, or the caller cancelled us: record it, then let it go on
            self._finish(writer, state, run_id, task, ExitStatus.interrupted, "interrupted from outside", started)
            if not self.resident:
                await self.close()
            raise
        if self._cancelled:
            then = "continue with `dsv4-agent resume`" if state.run_started_written else "nothing ran yet"
            status, reason = ExitStatus.interrupted, f"interrupted ({self._cancel_reason}); {then}"
        saved = await self._save_session(run_dir) if status is not ExitStatus.interrupted else None
        if not self.resident:
            await self.close()
        return self._finish(writer, state, run_id, task, status, reason, started, saved)

    async def _save_session(self, run_dir: Path) -> str | None:
        """Save the backend's KV session into the run's folder when it can (`save_session`: the engine
        backend) and the session is at most `session_save_max_bytes`; return the folder, or None."""
        save = getattr(self.backend, "save_session", None)
        limit = self.config.session_save_max_bytes
        if save is None or not self._backend_open or limit == 0:
            return None
        folder = run_dir / KV_SESSION_DIR
        with anyio.CancelScope(shield=True):
            return str(folder) if await save(folder, limit) else None

    def _run_started(self, run_id: str, task: str, schemas: list | None = None, system: str = "",
                     prompt_tokens: int = 0) -> RunStarted:
        return RunStarted(run_id=run_id, task=task, spec=self.spec, backend=self.backend.label,
                          tools=schemas or [], system_prompt=system, prompt_tokens=prompt_tokens)

    def _finish(
        self, writer, state, run_id, task, status: ExitStatus, message: str, started: float, saved: str | None = None
    ) -> RunResult:
        if not state.run_started_written:  # failed before the prompt: keep "the log starts with run_started"
            writer.write(self._run_started(run_id, task))
        wall_s = time.monotonic() - started
        writer.write(
            ExitEvent(
                status=status.value,
                exit_code=status.exit_code,
                message=message,
                final_answer=state.final_answer,
                steps=state.steps_done,
                usage=state.usage,
                wall_s=wall_s,
                kv_session=saved,
            )
        )
        writer.close()
        result = RunResult(
            status, state.final_answer, writer.path, run_id, state.steps_done, state.usage, wall_s, message
        )
        self.observer.run_finished(result)
        return result

    async def _open(
        self, resources: AsyncExitStack, writer: TrajectoryWriter, opening: anyio.CancelScope
    ) -> dict[str, Any]:
        """Start the sandbox and the MCP servers (closed by `resources`); return the tools by name.

        cancel() during an MCP server's start cancels `opening` (see `_execute`); the sandbox's start
        is left to finish, so that it never leaves a half-made container behind."""
        if self.sandbox is not None:
            where = _describe_sandbox(self.sandbox)
            self.observer.starting(f"starting the sandbox ({type(self.sandbox).__name__})")

            def closed() -> None:
                writer.write(SandboxEvent(kind="stopped", detail=where))

            await _enter(resources, self.sandbox, shield=True, after_close=closed)
            writer.write(SandboxEvent(kind="started", detail=where))
            self.observer.sandbox("started", where)
        tools = list(self.tools) if self.tools is not None else _default_tools(self.sandbox)
        for server in self.mcp_servers:
            # Connects and lists the tools once. Not shielded on exit: its owner task must leave its
            # own task group in order, and it kills the server's process group itself.
            self.observer.starting(f"starting MCP server {server.name!r} ({server.start_timeout_s:g} s to answer)")
            if self._cancelled:
                raise RunStopped(ExitStatus.interrupted, "interrupted")
            self._scope = opening
            try:
                await _enter(resources, server, shield=False)
            finally:
                self._scope = None
            tools.extend(server.as_tools())
        table: dict[str, Any] = {}
        for tool in tools:
            if tool.name in table:
                raise RunStopped(ExitStatus.usage, f"two tools are named {tool.name!r}; tool names must be unique")
            table[tool.name] = tool
        return dict(sorted(table.items()))  # deterministic order: the prompt prefix never depends on discovery order

    def _tokenizer_or_default(self):
        from encoding import Tokenizer

        if self._tokenizer is None:
            self._tokenizer = Tokenizer.default()
        return self._tokenizer

    def _runner(self, tools: dict[str, Any], run_id: str) -> ToolRunner:
        from tools import ToolContext

        approver = self.observer.confirm if self.config.approval == "confirm" else None
        return ToolRunner(
            tools,
            lambda call: ToolContext(sandbox=self.sandbox, run_id=run_id, step=call.step, call_id=call.call_id),
            default_timeout_s=self.config.tool_timeout_s,
            approver=approver,
            max_parallel=self.config.max_parallel_tools,
        )

    async def _begin(
        self, writer, run_dir, run_id, task, encoder, runner, tools, history, state, message
    ) -> list[int] | None:
        """Render the prompt (fresh run) or rebuild the session from the trajectory (resume, reply);
        return the ids to prefill."""
        schemas = [tool.openai_schema() for tool in tools.values()]
        if history is None:
            system = self.config.system_prompt
            ids = encoder.prompt(prompt_messages(system, schemas, task))
            writer.write(self._run_started(run_id, task, schemas, system, len(ids)))
            state.run_started_written = True
            state.step = 1
            return ids
        return await self._rebuild(writer, run_dir, encoder, runner, schemas, history, state, message)

    async def _rebuild(self, writer, run_dir, encoder, runner, schemas, history, state, message) -> list[int] | None:
        """Replay the recorded turns through the encoder, bring the backend's session to them, finish the
        interrupted step, and append `message` (a reply) after it.

        Returns the ids to prefill next, or None when the last recorded turn already answered the task
        (and there is no message to answer).
        """
        records = history.steps
        state.step = len(records) + 1
        state.steps_done = len(records)
        session = history.replay_into(encoder)  # every id the session held after the last recorded turn
        if not records:
            await self.backend.restore([], turns_done=0)
            writer.write(RunResumed(from_step=1, reprefill_tokens=0))
            return session  # the prompt: nothing was decoded yet
        last = records[-1]
        if message is None and last.final_answer is not None and not history.user_messages(last.step):
            state.final_answer = last.final_answer
            return None
        if list(self.backend.tokens) != session:  # a resident session that holds exactly these ids is kept
            computed = await self.backend.restore(session, len(records), saved=run_dir / KV_SESSION_DIR)
            state.usage.prefill_new += computed
            writer.write(RunResumed(from_step=state.step, reprefill_tokens=computed))
        for call in last.call.calls:  # the process died while these ran: run the ones without a result
            if call.call_id not in last.results:
                outcome = await runner.run(call)
                if call.call_id in history.started_calls:  # it had begun: the model must know it ran twice
                    outcome.content = f"{RERUN_NOTE}\n{outcome.content}"
                self._record_outcome(writer, last.step, outcome)
                last.results[call.call_id] = result_event(last.step, outcome)
        notices = history.extra_notices(last.step)
        if [s["function"] for s in schemas] != [s["function"] for s in history.started.tools]:
            text = _tools_changed_text(history.started.tools, schemas)
            writer.write(Notice(step=last.step, kind="tools_changed", text=text))
            self.observer.notice("tools_changed", text)
            notices.append(text)
        messages = history.user_messages(last.step)
        if message is not None:
            writer.write(UserMessage(step=last.step, text=message))
            messages.append(message)
        return last.followup_ids(encoder, notices + messages)

    async def _steps(self, writer, tokenizer, encoder, runner, budget, thinking, state) -> str:
        """Steps 2-4 of the module docstring, until the model answers or a stop rule fires."""
        from encoding import StreamParser

        format_errors = FormatErrors(self.config.max_format_errors)
        stuck = StuckDetector(self.config.stuck_repeats)
        while True:
            budget.before_step(state.step, state.usage)
            self.observer.turn_started(state.step, self.config.max_steps)
            t0 = time.monotonic()
            computed, reused = await self.backend.prefill(state.pending)
            prefill_s = time.monotonic() - t0
            state.usage.prefill_new += computed
            state.usage.prefill_reused += reused
            self.observer.prefilled(state.step, computed, reused, prefill_s)
            budget.check_tokens(state.usage)
            cap = budget.decode_cap(state.usage)
            step = state.step
            parser = StreamParser("thinking" if thinking else "chat", strict=False, tool_names=sorted(runner.tools))
            async with anyio.create_task_group() as group:
                calls = TurnCalls(
                    runner,
                    group,
                    on_start=lambda call: self._record_call(writer, step, runner, call),
                    on_done=lambda outcome: self._record_outcome(writer, step, outcome),
                    overlap=self.config.approval == "auto",
                )
                turn = await decode_turn(
                    self.backend, tokenizer, parser, step=step, max_tokens=cap, thinking=thinking,
                    observer=self.observer, running_total=state.usage, on_call=calls.submit,
                )  # fmt: skip
                state.usage.engine_calls += 1
                turn.usage.prefill_new, turn.usage.prefill_reused = computed, reused
                turn.backend_info = self.backend.turn_info()
                call_event = _engine_call_event(step, turn, prefill_s)
                writer.write(call_event)
                self.observer.turn_finished(step, turn.usage, state.usage, prefill_s, turn.decode_s, turn.backend_info)
                state.steps_done = step
                if turn.stop_reason == "max_tokens" and cap < self.config.max_turn_tokens:
                    group.cancel_scope.cancel()
                    budget.check_tokens(state.usage)
                    raise RunStopped(
                        ExitStatus.max_tokens, f"token budget spent ({state.usage.processed} tokens computed)"
                    )
                outcomes = await calls.finish()
            record = StepRecord.live(call_event, outcomes)
            record.record_into(encoder)
            if not turn.calls and turn.stop_reason == "eos" and turn.content.strip():
                return turn.content.strip()
            notices = turn_notices(record.call)
            for kind, text in notices:
                writer.write(Notice(step=step, kind=kind, text=text))
                self.observer.notice(kind, text)
            format_errors.record(bool(notices) or any(c.error for c in turn.calls))
            if turn.calls:
                stuck.record(turn.calls)
            state.pending = record.followup_ids(encoder, [])
            state.step += 1

    def _record_call(self, writer: TrajectoryWriter, step: int, runner: ToolRunner, call: ParsedCall) -> None:
        if call.error is None:
            writer.write(
                ToolCall(
                    step=step,
                    call_id=call.call_id,
                    name=call.name,
                    arguments=call.arguments or {},
                    parallel_safe=runner.parallel_safe(call),
                )
            )

    def _record_outcome(self, writer: TrajectoryWriter, step: int, outcome: ToolOutcome) -> None:
        writer.write(result_event(step, outcome))
        self.observer.tool_result(outcome)


@dataclass
class _State:
    usage: Usage
    step: int = 1  # the step about to run
    steps_done: int = 0
    pending: list[int] | None = None  # ids to prefill before the next decode
    final_answer: str | None = None
    run_started_written: bool = False


def _engine_call_event(step: int, turn: DecodedTurn, prefill_s: float) -> EngineCall:
    return EngineCall(
        step=step,
        usage=turn.usage,
        stop_reason=turn.stop_reason,
        prefill_s=prefill_s,
        decode_s=turn.decode_s,
        text=turn.text,
        token_ids=turn.ids,
        calls=turn.calls,
        reasoning=turn.reasoning,
        content=turn.content,
        incomplete_call=turn.incomplete_call,
        parse_warnings=turn.parse_warnings,
        backend_info=turn.backend_info,
    )


def _tools_changed_text(before: list[dict], after: list[dict]) -> str:
    old = {s["function"]["name"]: s for s in before}
    new = {s["function"]["name"]: s for s in after}
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(n for n in set(old) & set(new) if old[n] != new[n])
    lines = ["The tool list changed since the system prompt was written."]
    if removed:
        lines.append(f"Removed (calls will fail): {', '.join(removed)}.")
    for name in added + changed:
        lines.append(f"{'Added' if name in added else 'Changed'}: {new[name]['function']}")
    return "\n".join(lines)


def _describe_sandbox(sandbox: Any) -> str:
    """One line naming the sandbox for the trajectory: its kind, and its container or folder."""
    parts = [type(sandbox).__name__]
    for attribute in ("name", "image", "workspace", "host_workspace"):  # DockerSandbox, LocalSandbox
        value = getattr(sandbox, attribute, None)
        if value:
            parts.append(f"{attribute}={value}")
    return " ".join(parts)


def _default_tools(sandbox: Any | None) -> list[Any]:
    if sandbox is None:
        return []
    from tools import builtin_tools

    return list(builtin_tools())


async def _enter(resources: AsyncExitStack, manager: Any, *, shield: bool, after_close=None) -> Any:
    """Enter an async context manager now; exit it with `resources`, shielded from an outer
    cancellation and time-limited when `shield` (only for managers that open no task group)."""
    value = await manager.__aenter__()
    if not shield:
        resources.push_async_exit(manager.__aexit__)
        return value

    async def close(*exc_info) -> bool:
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + CLEANUP_TIMEOUT_S
            await manager.__aexit__(*exc_info)
        if after_close is not None:
            after_close()
        return False

    resources.push_async_exit(close)
    return value


async def _shielded(close) -> None:
    with anyio.CancelScope(shield=True) as scope:
        scope.deadline = anyio.current_time() + CLEANUP_TIMEOUT_S
        await close()
