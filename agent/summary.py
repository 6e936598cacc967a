"""`dsv4-agent inspect`: one run's trajectory summarised per step (tokens, calls, results) and overall."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.display import terminal_safe
from agent.history import History
from agent.trajectory import ExitEvent, RunResumed, SandboxEvent, ToolResultEvent, Usage


class CallSummary(BaseModel):
    call_id: str
    name: str
    arguments: dict[str, Any] | None
    outcome: str  # "ok", an error kind, or "no result" (killed while it ran)
    wall_s: float | None


class StepSummary(BaseModel):
    step: int
    usage: Usage
    stop_reason: str
    prefill_s: float
    decode_s: float
    calls: list[CallSummary]


class ReplySummary(BaseModel):
    after_step: int
    text: str


class RunSummary(BaseModel):
    run_id: str
    task: str
    backend: str
    status: str
    exit_code: int | None
    message: str
    final_answer: str | None
    steps: list[StepSummary]
    usage: Usage
    wall_s: float | None
    resumes: int
    replies: list[ReplySummary]
    sandbox_events: list[str]


def summarise(events: list[Any]) -> RunSummary:
    started = events[0]
    exits = [e for e in events if isinstance(e, ExitEvent)]
    history = History.from_events(events)
    results: dict[str, ToolResultEvent] = {e.call_id: e for e in events if isinstance(e, ToolResultEvent)}
    steps = []
    for record in history.steps:
        calls = [
            CallSummary(
                call_id=c.call_id,
                name=c.name,
                arguments=c.arguments,
                outcome=("ok" if not results[c.call_id].is_error else results[c.call_id].error_kind or "error")
                if c.call_id in results
                else "no result",
                wall_s=results[c.call_id].wall_s if c.call_id in results else None,
            )
            for c in record.call.calls
        ]
        call = record.call
        steps.append(
            StepSummary(
                step=call.step,
                usage=call.usage,
                stop_reason=call.stop_reason,
                prefill_s=call.prefill_s,
                decode_s=call.decode_s,
                calls=calls,
            )
        )
    last = exits[-1] if exits else None
    killed = not isinstance(events[-1], ExitEvent)  # the process died after its last event
    return RunSummary(
        run_id=started.run_id,
        task=started.task,
        backend=started.backend,
        status="killed (no exit event): continue it with `dsv4-agent resume`" if killed else last.status,
        exit_code=None if killed else last.exit_code,
        message="" if killed else last.message,
        final_answer=None if killed else last.final_answer,
        steps=steps,
        usage=history.usage() if killed else last.usage,
        wall_s=None if killed else last.wall_s,
        resumes=sum(isinstance(e, RunResumed) for e in events),
        replies=[ReplySummary(after_step=m.step, text=m.text) for m in history.messages],
        sandbox_events=[f"{e.kind}: {e.detail}" for e in events if isinstance(e, SandboxEvent)],
    )


def render(summary: RunSummary, console: Console) -> None:
    """Print the summary; recorded text (task, answers, tool output) goes through `terminal_safe`."""

    def shown(text: str) -> str:
        return escape(terminal_safe(text))

    console.rule(f"run {summary.run_id}")
    console.print(f"[bold]task[/]     {shown(summary.task)}")
    console.print(f"[bold]backend[/]  {shown(summary.backend)}")
    console.print(
        f"[bold]status[/]   {escape(summary.status)}"
        + (f" (exit code {summary.exit_code})" if summary.exit_code is not None else "")
    )
    if summary.message:
        console.print(f"[bold]reason[/]   {shown(summary.message)}")
    if summary.resumes:
        console.print(f"[bold]resumed[/]  {summary.resumes} time(s)")
    table = Table(
        "step", "prefill new", "reused", "reasoning", "content", "tool-call", "stop", "decode s", box=box.SIMPLE
    )
    for st in summary.steps:
        u = st.usage
        table.add_row(
            str(st.step),
            f"{u.prefill_new:,}",
            f"{u.prefill_reused:,}",
            f"{u.reasoning:,}",
            f"{u.content:,}",
            f"{u.tool_call:,}",
            st.stop_reason,
            f"{st.decode_s:.2f}",
        )
    console.print(table)
    for st in summary.steps:
        calls = ", ".join(f"{c.name} → {c.outcome}" for c in st.calls) or (
            "(no call)" if st.stop_reason == "eos" else "(cut off)"
        )
        console.print(f"  step {st.step}: {shown(calls)}")
        for reply in (r for r in summary.replies if r.after_step == st.step):
            console.print(f"  [bold]reply[/]: {shown(reply.text)}")
    u = summary.usage
    console.print(
        f"totals: {u.engine_calls} engine calls · prefill {u.prefill_new:,} new / {u.prefill_reused:,} reused · "
        f"decoded {u.decoded:,} (reasoning {u.reasoning:,}, content {u.content:,}, tool calls {u.tool_call:,})"
        + (f" · {summary.wall_s:.1f} s" if summary.wall_s is not None else "")
    )
    for line in summary.sandbox_events:
        console.print(f"sandbox {shown(line)}")
    if summary.final_answer:
        console.print(f"[bold]answer[/]   {shown(summary.final_answer)}")
