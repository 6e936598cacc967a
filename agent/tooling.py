"""Running the model's tool calls: every failure becomes a tool result, parallel-safe calls overlap.

`ToolRunner.run` turns one parsed call into a `ToolOutcome` and never raises for anything the model
caused or the world did (malformed call, unknown tool, bad arguments, the tool's exception, a timeout, a
sandbox or MCP error, a denied approval). `TurnCalls` schedules one turn's calls: a parallel-safe call
starts the moment the stream parser closes it, while the engine is still decoding the next one, as
long as every call before it in the turn is parallel-safe too; any other call waits for all earlier
calls and runs alone. Results go back to the model in call order.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import anyio

from agent.trajectory import ParsedCall
from tools import Tool, ToolContext, ToolResult
from tools.result import valid_unicode

Approver = Callable[[ParsedCall], Awaitable[bool]]
_RAISED = re.compile(r"tool '[^']*' failed: ")  # `Tool.invoke`'s wording for an exception it caught


@dataclass
class ToolOutcome:
    call_id: str
    name: str
    content: str  # what the model reads
    is_error: bool
    error_kind: str | None = None
    wall_s: float = 0.0


def error_kind(result: ToolResult) -> str:
    """Name the kind of a failed `ToolResult` for the trajectory (the model reads the text itself)."""
    if result.metadata.get("timed_out"):
        return "timeout"
    if "mcp_server" in result.metadata:  # tools.mcp marks its results with the server's name
        return "mcp"
    if result.metadata.get("exit_code") not in (None, 0):  # a sandbox command that failed
        return "command_failed"
    if result.content.startswith("invalid arguments"):  # `Tool.invoke`'s wording for an ArgumentError
        return "bad_arguments"
    if _RAISED.match(result.content):
        return "exception"  # `Tool.invoke` caught what the tool raised
    return "tool_error"  # the tool itself answered with an error


class ToolRunner:
    """Runs calls against a fixed name -> tool table, with per-call timeouts and approval.

    `Tool.invoke` already turns bad arguments, the tool's exceptions and its own timeout into error
    results (and caps the output); this adds what only the loop knows: malformed calls, unknown names,
    approval, and the default timeout for tools that set none.
    """

    def __init__(
        self,
        tools: dict[str, Tool],
        context: Callable[[ParsedCall], ToolContext],
        *,
        default_timeout_s: float,
        approver: Approver | None = None,
        max_parallel: int = 8,
    ) -> None:
        self.tools = tools
        self.context = context  # builds the ToolContext of one call
        self.default_timeout_s = default_timeout_s
        self.approver = approver
        self.limiter = anyio.CapacityLimiter(max_parallel)

    def parallel_safe(self, call: ParsedCall) -> bool:
        tool = self.tools.get(call.name)
        # A call that will only produce an error touches nothing, so it never has to wait.
        return call.error is not None or tool is None or bool(tool.parallel_safe)

    async def run(self, call: ParsedCall) -> ToolOutcome:
        started = time.monotonic()
        outcome = await self._run(call)
        outcome.wall_s = time.monotonic() - started
        return outcome

    async def _run(self, call: ParsedCall) -> ToolOutcome:
        def error(kind: str, text: str) -> ToolOutcome:
            return ToolOutcome(call.call_id, call.name, f"Error ({kind}): {text}", True, kind)

        tool = self.tools.get(call.name)
        if tool is None:
            return error(
                "unknown_tool", f"there is no tool named {call.name!r}; the tools are: {', '.join(sorted(self.tools))}"
            )
        if call.error is not None:
            return error(
                "malformed", f"{call.error}. Write the call again in the exact DSML format of the system prompt."
            )
        if self.approver is not None and not await self.approver(call):
            return error("denied", "the user did not approve this call; do not repeat it, choose another way")
        timeout = tool.timeout_s or self.default_timeout_s
        try:
            async with self.limiter:
                with anyio.fail_after(timeout):
                    result = await tool.invoke(call.arguments or {}, self.context(call))
        except TimeoutError:
            return error("timeout", f"{call.name} did not finish within {timeout:g} s and was cancelled")
        except (Exception, SystemExit) as e:  # noqa: BLE001 - a Tool subclass may raise; the model still hears of it
            return error("exception", valid_unicode(f"{type(e).__name__}: {e}"))
        kind = error_kind(result) if result.is_error else None
        content = f"Error ({kind}): {result.content}" if kind else result.content
        return ToolOutcome(call.call_id, call.name, content, result.is_error, kind)


class TurnCalls:
    """The calls of one turn, scheduled as they stream in; `finish()` returns their outcomes in call order."""

    def __init__(
        self, runner: ToolRunner, task_group: anyio.abc.TaskGroup, on_start, on_done, *, overlap: bool
    ) -> None:
        self.runner = runner
        self.task_group = task_group
        self.on_start = on_start  # (call) -> None: written to the trajectory when the call starts
        self.on_done = on_done  # (outcome) -> None
        self.overlap = overlap  # start parallel-safe calls during decode (off in confirm mode)
        self.calls: list[ParsedCall] = []
        self.outcomes: dict[str, ToolOutcome] = {}
        self._running: list[anyio.Event] = []
        self._queued: list[ParsedCall] = []

    def submit(self, call: ParsedCall) -> None:
        """A call the parser just closed; it starts at once if nothing before it must run first."""
        self.calls.append(call)
        if self.overlap and not self._queued and self.runner.parallel_safe(call):
            self._start(call)
        else:
            self._queued.append(call)

    def _start(self, call: ParsedCall) -> anyio.Event:
        done = anyio.Event()
        self._running.append(done)

        async def run_one() -> None:
            try:
                self.on_start(call)
                outcome = await self.runner.run(call)
                self.outcomes[call.call_id] = outcome
                self.on_done(outcome)
            finally:
                done.set()

        self.task_group.start_soon(run_one)
        return done

    async def _wait_running(self) -> None:
        for done in self._running:
            await done.wait()
        self._running.clear()

    async def finish(self) -> list[ToolOutcome]:
        """Run what is queued: runs of parallel-safe calls together, any other call alone, all in order."""
        for call in self._queued:
            if not (self.overlap and self.runner.parallel_safe(call)):
                await self._wait_running()  # a barrier: everything before it is done
                await self._start(call).wait()
                self._running.clear()
            else:
                self._start(call)
        await self._wait_running()
        self._queued.clear()
        return [self.outcomes[c.call_id] for c in self.calls]
