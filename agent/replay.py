"""`dsv4-agent replay`: re-run a recorded run's exact tokens and compare what the loop and the tools did."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape

from agent.display import terminal_safe
from agent.trajectory import EngineCall, ExitEvent, ToolResultEvent

# Exits that follow from the decoded tokens alone, so a faithful replay must end the same way.
DETERMINED_BY_TOKENS = ("completed", "max_steps", "format_error", "stuck")


@dataclass
class ReplayReport:
    steps: int
    differences: list[str] = field(default_factory=list)  # what the model did or how the run ended differs
    notes: list[str] = field(default_factory=list)  # tool outputs that differ (clocks, pids): expected, reported

    @property
    def same(self) -> bool:
        return not self.differences

    def render(self, console: Console) -> None:
        console.rule("replay")
        verdict = "[green]identical[/]" if self.same else "[red]diverged[/]"
        console.print(f"{self.steps} recorded turns replayed: calls, errors and exit status {verdict}")
        for line in self.differences:
            console.print(f"[red]✗[/] {escape(terminal_safe(line))}")
        for line in self.notes:
            console.print(f"[dim]· {escape(terminal_safe(line))}[/]")


def _steps(events: list[Any]) -> dict[int, tuple[EngineCall, dict[str, ToolResultEvent]]]:
    steps = {e.step: (e, {}) for e in events if isinstance(e, EngineCall)}
    for e in events:
        if isinstance(e, ToolResultEvent) and e.step in steps:
            steps[e.step][1][e.call_id] = e
    return steps


def _exit(events: list[Any]) -> ExitEvent | None:
    exits = [e for e in events if isinstance(e, ExitEvent)]
    return exits[-1] if exits else None


def compare(original: list[Any], replayed: list[Any]) -> ReplayReport:
    a, b = _steps(original), _steps(replayed)
    report = ReplayReport(steps=len(a))
    for step in sorted(set(a) | set(b)):
        if step not in b:
            report.differences.append(f"step {step}: not reached by the replay")
            continue
        if step not in a:
            report.differences.append(f"step {step}: only in the replay")
            continue
        (call_a, res_a), (call_b, res_b) = a[step], b[step]
        sig_a = [(c.name, c.arguments, c.error) for c in call_a.calls]
        sig_b = [(c.name, c.arguments, c.error) for c in call_b.calls]
        if sig_a != sig_b:
            report.differences.append(f"step {step}: tool calls differ: {sig_a} vs {sig_b}")
            continue
        for c in call_a.calls:
            ra, rb = res_a.get(c.call_id), res_b.get(c.call_id)
            if ra is None or rb is None:
                report.notes.append(f"step {step} {c.name}: result recorded in {'neither' if ra is rb else 'one'} run")
            elif ra.is_error != rb.is_error or ra.error_kind != rb.error_kind:
                report.differences.append(f"step {step} {c.name}: {ra.error_kind or 'ok'} vs {rb.error_kind or 'ok'}")
            elif ra.content != rb.content:
                report.notes.append(
                    f"step {step} {c.name}: output differs ({ra.content[:60]!r} vs {rb.content[:60]!r})"
                )
    ea, eb = _exit(original), _exit(replayed)
    if ea is None or ea.status not in DETERMINED_BY_TOKENS:
        # Ctrl-C, a kill, a clock or an error ended the original: the replay runs out of recorded turns.
        report.notes.append(
            f"the original ended as {ea.status if ea else 'killed'}; only its recorded turns are compared"
        )
    elif eb is None or (ea.status, ea.final_answer) != (eb.status, eb.final_answer):
        report.differences.append(
            f"exit: {ea.status} {ea.final_answer!r} vs {eb.status if eb else None} {eb.final_answer if eb else None!r}"
        )
    return report
