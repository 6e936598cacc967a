"""Decoding one turn: ids from the backend -> text -> the streaming DSML parser -> display, calls, counts.

Tool calls are handed to `on_call` the moment the parser closes them, so parallel-safe ones can run
while the engine is still decoding the rest of the turn.
"""

from __future__ import annotations

import json
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal

from agent.display import Observer
from agent.trajectory import ParsedCall, Usage

if TYPE_CHECKING:
    from agent.backends.base import Backend
    from encoding import Tokenizer


class IncrementalDetokenizer:
    """Turns ids into text as they arrive; holds back bytes of a character that is not complete yet."""

    WINDOW = 6  # ids of context re-decoded with each new id: enough for any multi-id character

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._emitted = 0  # index into ids up to which text was emitted
        self._prefix = 0  # start of the context window

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self._prefix : self._emitted])
        after = self.tokenizer.decode(self.ids[self._prefix :])
        if after.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next id
            return ""
        new = after[len(before) :]
        self._emitted = len(self.ids)
        self._prefix = max(0, self._emitted - self.WINDOW)
        return new


@dataclass
class DecodedTurn:
    ids: list[int] = field(default_factory=list)  # generated ids, EOS included when the model stopped
    text: str = ""
    reasoning: str = ""
    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    stop_reason: Literal["eos", "max_tokens"] = "max_tokens"
    decode_s: float = 0.0
    incomplete_call: str | None = None  # a call the output cut off: it never runs
    parse_warnings: list[str] = field(default_factory=list)  # what tolerant parsing recovered from
    backend_info: dict = field(default_factory=dict)  # Backend.turn_info() after the turn


def _arguments(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # absurdly deep JSON is the model's error, not ours
        return None
    return value if isinstance(value, dict) else None


class TokenClassifier:
    """Counts each decoded id as reasoning (up to and including </think>), content, or tool call (from DSML on)."""

    def __init__(self, tokenizer: Tokenizer, thinking: bool) -> None:
        self.think_end = tokenizer.token_to_id("</think>")
        self.dsml = tokenizer.token_to_id("｜DSML｜")
        self.section = "reasoning" if thinking else "content"

    def section_of(self, token: int) -> str:
        """The counter this id belongs to ("reasoning", "content" or "tool_call"); EOS counts where it falls."""
        if token == self.dsml:
            self.section = "tool_call"
        section = self.section
        if token == self.think_end and self.section == "reasoning":
            self.section = "content"
        return section


async def decode_turn(
    backend: Backend,
    tokenizer: Tokenizer,
    parser,
    *,
    step: int,
    max_tokens: int,
    thinking: bool,
    observer: Observer,
    running_total: Usage,
    on_call: Callable[[ParsedCall], None],
) -> DecodedTurn:
    """Decode until EOS or `max_tokens`; `running_total` is updated live for the progress display."""
    from encoding import ContentDelta, End, ReasoningDelta, ToolCallComplete, ToolCallStarted

    turn = DecodedTurn()
    detok = IncrementalDetokenizer(tokenizer)
    classify = TokenClassifier(tokenizer, thinking)
    started = time.monotonic()

    def handle(events) -> None:
        for event in events:
            if isinstance(event, ReasoningDelta):
                turn.reasoning += event.text
                observer.reasoning(event.text)
            elif isinstance(event, ContentDelta):
                turn.content += event.text
                observer.content(event.text)
            elif isinstance(event, ToolCallStarted):
                observer.tool_call_started(event.name)
            elif isinstance(event, ToolCallComplete):
                arguments, error = _arguments(event.arguments), event.error
                if arguments is None and error is None:
                    error = f"tool call {event.name!r}: the parameters do not form a JSON object"
                call = ParsedCall(
                    call_id=f"call_{step}_{event.index}", step=step, name=event.name, arguments=arguments, error=error
                )
                turn.calls.append(call)
                observer.tool_call(call)
                on_call(call)
            elif isinstance(event, End):
                turn.incomplete_call = event.incomplete_call
                turn.parse_warnings = list(event.warnings)

    async with aclosing(backend.decode(max_tokens)) as tokens:  # stopping early must release the session
        async for token in tokens:
            turn.ids.append(token)
            section = classify.section_of(token)
            for usage in (turn.usage, running_total):
                setattr(usage, section, getattr(usage, section) + 1)
            observer.token(running_total)
            text = detok.push(token)
            turn.text += text
            handle(parser.feed(text))
            if token == tokenizer.eos_id:
                turn.stop_reason = "eos"
                break
    handle(parser.close())
    turn.usage.engine_calls = 1
    turn.decode_s = time.monotonic() - started
    return turn
