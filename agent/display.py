"""What the user sees while a run decodes: reasoning, content and tool calls as they stream, and a progress line.

The loop reports to an `Observer`; the base class ignores everything (the SDK default), `RichDisplay`
draws to the terminal. Streamed text is committed line by line above a live footer that holds the
partial line and the progress (step, tokens, time), so output appears token by token without tearing.

Everything shown that a model, a tool or a server wrote passes `terminal_safe` first: tool output may
hold escape sequences (clear the screen, set the window title, OSC 8 links) that must not reach the
operator's terminal. The trajectory keeps the raw text.
"""

from __future__ import annotations

import json
import re
import time
from typing import TYPE_CHECKING, Any

import anyio
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.prompt import Confirm
from rich.text import Text

from agent.trajectory import ParsedCall, Usage

if TYPE_CHECKING:
    from agent.loop import RunResult
    from agent.tooling import ToolOutcome


_CONTROL = re.compile(r"\r\n|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _visible(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\r\n":
        return "\n"
    code = ord(char)
    if code < 0x20:
        return chr(0x2400 + code)  # the Unicode control picture: ESC shows as ␛
    return "\u2421" if code == 0x7F else f"\\x{code:02x}"  # DEL as ␡, C1 controls (0x9b is CSI) as \x9b


def terminal_safe(text: str) -> str:
    r"""`text` that cannot drive a terminal: each control character but newline and tab becomes a visible
    symbol (ESC as ␛, so "\x1b[2J" prints as "␛[2J" instead of clearing the screen; CR LF is a newline)."""
    return _CONTROL.sub(_visible, text)


class Observer:
    """Hooks the loop calls as a run unfolds. Override what you need; every hook is optional."""

    def run_started(self, run_id: str, backend: str, task: str, resumed_from: int | None) -> None: ...

    def starting(self, what: str) -> None:
        """Something that may take a while begins (the backend, the sandbox, an MCP server)."""

    def tools_ready(self, tools: list[str]) -> None:
        """The sandbox and MCP servers are up; `tools` are the names rendered into the prompt."""

    def turn_started(self, step: int, max_steps: int) -> None: ...

    def prefilled(self, step: int, new: int, reused: int, seconds: float) -> None: ...

    def reasoning(self, text: str) -> None: ...

    def content(self, text: str) -> None: ...

    def token(self, usage: Usage) -> None:
        """Called once per decoded token with the run's running totals."""

    def tool_call_started(self, name: str) -> None:
        """The parser read an invoke header; its arguments are still being decoded."""

    def tool_call(self, call: ParsedCall) -> None: ...

    def turn_finished(
        self, step: int, turn: Usage, total: Usage, prefill_s: float, decode_s: float, info: dict
    ) -> None: ...

    def tool_result(self, outcome: ToolOutcome) -> None: ...

    def notice(self, kind: str, text: str) -> None: ...

    def sandbox(self, kind: str, detail: str) -> None: ...

    def run_finished(self, result: RunResult) -> None: ...

    async def confirm(self, call: ParsedCall) -> bool:
        """Asked before each call in `approval="confirm"` mode."""
        arguments = terminal_safe(json.dumps(call.arguments, ensure_ascii=False))
        question = escape(f"Run tool {call.name} with {arguments}?")
        return await anyio.to_thread.run_sync(lambda: Confirm.ask(question, default=False))


def _short(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = terminal_safe(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class RichDisplay(Observer):
    """Terminal display for the CLI."""

    STYLES = {"reasoning": "dim italic", "content": "bold", "call": "yellow"}

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False)
        self._live: Live | None = None
        self._section: str | None = None  # "reasoning" or "content": the kind of the partial line
        self._partial = ""
        self._step = 0
        self._max_steps = 0
        self._usage = Usage()
        self._started = time.monotonic()
        self._activity = ""  # what is starting, shown in the footer until the tools are ready

    # --- the live footer ---------------------------------------------------------------------------
    def _footer(self) -> Group:
        if self._activity:
            return Group(Text(f"{self._activity} … {time.monotonic() - self._started:5.1f} s", style="cyan"))
        u = self._usage
        progress = Text(
            f"step {self._step}/{self._max_steps} · {u.processed:,} tokens computed "
            f"(prefill {u.prefill_new:,} new / {u.prefill_reused:,} reused · reasoning {u.reasoning:,} · "
            f"content {u.content:,} · tool calls {u.tool_call:,}) · {time.monotonic() - self._started:5.1f} s",
            style="cyan",
        )
        if self._partial:
            return Group(Text(self._partial, style=self.STYLES.get(self._section or "", "")), progress)
        return Group(progress)

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._footer())

    def _print(self, *renderables: Any) -> None:
        self.console.print(*renderables)
        self._refresh()

    def _stream(self, section: str, text: str) -> None:
        text = terminal_safe(text)
        if section != self._section:
            self._flush_partial()
            self._section = section
            if section == "reasoning":
                self._print(Text("thinking", style="dim"))
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self.console.print(Text(line, style=self.STYLES[section]))
        self._refresh()

    def _flush_partial(self) -> None:
        if self._partial:
            self.console.print(Text(self._partial, style=self.STYLES.get(self._section or "", "")))
        self._partial = ""
        self._section = None

    # --- observer hooks ------------------------------------------------------------------------------
    def run_started(self, run_id: str, backend: str, task: str, resumed_from: int | None) -> None:
        self._started = time.monotonic()
        verb = f"resuming run {run_id} at step {resumed_from}" if resumed_from else f"run {run_id}"
        self.console.rule(f"[bold]dsv4-agent[/] {escape(verb)}")
        self.console.print(f"[bold]backend[/]  {escape(terminal_safe(backend))}")
        self.console.print(f"[bold]task[/]     {escape(terminal_safe(task))}")
        self._live = Live(self._footer(), console=self.console, refresh_per_second=12, transient=True)
        self._live.start()

    def starting(self, what: str) -> None:
        self._activity = terminal_safe(what)
        self._refresh()

    def tools_ready(self, tools: list[str]) -> None:
        self._activity = ""
        self._print(Text.assemble(("tools", "bold"), f"    {', '.join(tools) or '(none)'}"))

    def turn_started(self, step: int, max_steps: int) -> None:
        self._step, self._max_steps = step, max_steps
        self._flush_partial()
        self._print(Text(f"── step {step}", style="bold blue"))

    def prefilled(self, step: int, new: int, reused: int, seconds: float) -> None:
        self._print(
            Text(
                f"prefill: {new:,} new tokens, {reused:,} reused from the KV cache ({seconds * 1000:.0f} ms)",
                style="dim cyan",
            )
        )

    def reasoning(self, text: str) -> None:
        self._stream("reasoning", text)

    def content(self, text: str) -> None:
        self._stream("content", text)

    def token(self, usage: Usage) -> None:
        self._usage = usage
        self._refresh()

    def tool_call_started(self, name: str) -> None:
        # Shown in the live footer until the call closes: long arguments (a file's content) take a while.
        self._flush_partial()
        self._section, self._partial = "call", f"→ {terminal_safe(name)}(… writing the arguments"
        self._refresh()

    def tool_call(self, call: ParsedCall) -> None:
        self._partial, self._section = "", None
        self._flush_partial()
        if call.error:
            self._print(Text(f"✗ malformed tool call {_short(call.name)}: {_short(call.error)}", style="red"))
        else:
            self._print(Text(f"→ {_short(call.name)}({_short(call.arguments)})", style="yellow"))

    def turn_finished(
        self, step: int, turn: Usage, total: Usage, prefill_s: float, decode_s: float, info: dict
    ) -> None:
        if self._section == "call":  # a call the turn ended inside: it will not run
            self._partial = self._partial.replace("(… writing the arguments", " cut off: it will not run")
        self._flush_partial()
        self._usage = total
        extra = "".join(
            f" · {k.replace('_', ' ')} {v:,}" if isinstance(v, int) else f" · {k.replace('_', ' ')} {v}"
            for k, v in info.items()
        )
        self._print(
            Text(
                f"decoded {turn.decoded:,} tokens (reasoning {turn.reasoning:,}, content {turn.content:,}, "
                f"tool calls {turn.tool_call:,}) in {decode_s:.2f} s ({turn.decoded / max(decode_s, 1e-9):,.0f} tok/s){extra}",
                style="dim cyan",
            )
        )

    def tool_result(self, outcome: ToolOutcome) -> None:
        style = "red" if outcome.is_error else "green"
        name = terminal_safe(outcome.name)  # an unknown tool's name is whatever the model wrote
        head = f"← {name} [{outcome.error_kind}]" if outcome.is_error else f"← {name}"
        self._print(Text(f"{head} ({outcome.wall_s:.2f} s): {_short(outcome.content)}", style=style))

    def notice(self, kind: str, text: str) -> None:
        self._print(Text(f"! {kind}: {_short(text)}", style="magenta"))

    def sandbox(self, kind: str, detail: str) -> None:
        self._print(Text(f"sandbox {kind}: {terminal_safe(detail)}", style="dim"))

    def run_finished(self, result: RunResult) -> None:
        self._flush_partial()
        if self._live is not None:
            self._live.stop()
            self._live = None
        u = result.usage
        style = "green" if result.status.exit_code == 0 else "red"
        self.console.rule(f"[{style}]{result.status.value}[/] (exit code {result.status.exit_code})")
        if result.final_answer:
            self.console.print(f"[bold]answer[/]  {escape(terminal_safe(result.final_answer))}")
        if result.message:
            self.console.print(f"[bold]reason[/]  {escape(terminal_safe(result.message))}")
        self.console.print(
            f"{result.steps} steps · prefill {u.prefill_new:,} new / {u.prefill_reused:,} reused · "
            f"decoded {u.decoded:,} (reasoning {u.reasoning:,}, content {u.content:,}, tool calls {u.tool_call:,}) · "
            f"{result.wall_s:.1f} s"
        )
        self.console.print(f"[bold]trajectory[/] {escape(terminal_safe(str(result.trajectory_path)))}")

    async def confirm(self, call: ParsedCall) -> bool:
        self._flush_partial()
        live, self._live = self._live, None
        if live is not None:
            live.stop()
        try:
            return await super().confirm(call)
        finally:
            if live is not None:
                live.start()
                self._live = live
