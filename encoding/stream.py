"""`StreamParser`: DSV4 completion text, fed in chunks of any size, to typed events.

    parser = StreamParser("thinking", tool_names={"bash", "read_file"})
    for chunk in text_chunks:
        for event in parser.feed(chunk):
            ...
    for event in parser.close():   # always ends with exactly one `End`
        ...

Events (frozen dataclasses, in the order of the text):
  ReasoningDelta(text)            reasoning text (thinking mode), before `</think>`
  ContentDelta(text)              answer text
  ToolCallStarted(index, name)    an invoke header was read; `index` counts calls in this completion
  ToolCallParameter(index, name, value, string)
                                  one parameter, raw text as written; `string` = string="true"
  ToolCallComplete(index, name, arguments, error)
                                  the invoke is closed. `arguments` is the JSON text the official
                                  parser builds. `error` is None when the call may run; otherwise
                                  it says why not, naming the tool, the parameter and the character
                                  position in the completion (unknown tool, a string="false" value
                                  that is not JSON, a malformed or unclosed invoke).
  End(reason, message, incomplete_call, warnings)
                                  last event. reason: "eos" (the EOS token ended the output),
                                  "no_eos" (the text ended after a complete answer without EOS),
                                  "truncated" (the text ended inside the reasoning or a tool call).
                                  `message` is the parsed assistant message (official shape) with
                                  every completed call; `incomplete_call` names a call that was cut
                                  off (it is in no event but ToolCallStarted and must never run);
                                  `warnings` lists what tolerant parsing recovered from.

No markup ever reaches a delta: text that may be the start of a special token or tag is held
back until the next chunk decides it.

strict=True accepts and rejects exactly what the official `parse_message_from_completion_text`
does (raising `DSMLParseError` at the first point where the text can no longer be valid), and
`End.message` equals its result. strict=False (the agent's mode) never raises on model output;
it recovers what the model plainly meant: a tool block opened inside the reasoning (no
`</think>`), a block without its leading blank line, an invoke without its block, a second block,
a missing EOS, special tokens or junk where they do not belong (dropped, with a warning); a call
cut off by the end of the text is reported as `incomplete_call`, never completed.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from .dsml import arguments_json
from .errors import DSMLParseError
from .parse import INVOKE_HEADER, PARAMETER_BODY, PARAMETER_END, SEPARATOR
from .tokens import (
    BOS,
    DSML,
    EOS,
    INVOKE_CLOSE,
    INVOKE_OPEN,
    PARAMETER_CLOSE,
    PARAMETER_OPEN,
    THINK_END,
    THINK_START,
    TOOL_CALLS_CLOSE,
    TOOL_CALLS_START,
)


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStarted:
    index: int
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallParameter:
    index: int
    name: str
    value: str
    string: bool


@dataclass(frozen=True, slots=True)
class ToolCallComplete:
    index: int
    name: str
    arguments: str
    error: str | None = None


@dataclass(frozen=True, slots=True)
class End:
    reason: Literal["eos", "no_eos", "truncated"]
    message: dict[str, Any]
    incomplete_call: str | None = None
    warnings: tuple[str, ...] = ()


Event = Union[ReasoningDelta, ContentDelta, ToolCallStarted, ToolCallParameter, ToolCallComplete, End]

TOOL_CALLS_BARE = f"<{DSML}tool_calls"  # a block start without the blank line before it
# Stop markers per phase: (strict, tolerant). The first found in the text wins (list order on ties).
_STOPS = {
    "reasoning": (
        (THINK_END, TOOL_CALLS_START, BOS, EOS, THINK_START, DSML),
        (THINK_END, TOOL_CALLS_START, TOOL_CALLS_BARE, EOS, BOS, THINK_START, DSML),
    ),
    "content": (
        (EOS, TOOL_CALLS_START, BOS, THINK_START, THINK_END, DSML),
        (EOS, TOOL_CALLS_START, TOOL_CALLS_BARE, INVOKE_OPEN, BOS, THINK_START, THINK_END, DSML),
    ),
    "block": ((INVOKE_OPEN, TOOL_CALLS_CLOSE), (INVOKE_OPEN, TOOL_CALLS_CLOSE, EOS)),
    "header": (
        (PARAMETER_OPEN, INVOKE_CLOSE),
        (PARAMETER_OPEN, INVOKE_CLOSE, INVOKE_OPEN, TOOL_CALLS_CLOSE, EOS),
    ),
    "param": (
        (PARAMETER_END,),
        (PARAMETER_CLOSE, PARAMETER_OPEN, INVOKE_CLOSE, INVOKE_OPEN, TOOL_CALLS_CLOSE, EOS),
    ),
    "after_param": (
        (PARAMETER_OPEN, INVOKE_CLOSE),
        (PARAMETER_OPEN, INVOKE_CLOSE, INVOKE_OPEN, TOOL_CALLS_CLOSE, EOS),
    ),
    "after_block": ((EOS,), (EOS, TOOL_CALLS_BARE)),
}
_MAX_STOP = max(len(s) for pair in _STOPS.values() for stops in pair for s in stops)
_SPILL_CHARS = 4096
_FIRST_CHARS = frozenset(s[0] for pair in _STOPS.values() for stops in pair for s in stops)

LENIENT_HEADER = re.compile(r'\s*name\s*=\s*"(.*?)"\s*>?\s*$', re.DOTALL)
LENIENT_PARAMETER = re.compile(r'\s*name\s*=\s*"(.*?)"\s*string\s*=\s*"(true|false)"\s*>(.*)$', re.DOTALL)


def find_stop(buf: str, start: int, stops: tuple[str, ...], final: bool) -> tuple[int, str | None, int]:
    """(position, stop, hold): the first stop in `buf[start:]` once it is certain, else stop None.

    `hold` is where a proper prefix of some stop begins at the end of `buf` (len(buf) if none):
    text from there on may still become a marker and must not be released. A found stop is only
    certain when no such prefix begins before it (a longer marker may still be completing).
    """
    pos, found = -1, None
    for stop in stops:
        p = buf.find(stop, start)
        if p != -1 and (found is None or p < pos):
            pos, found = p, stop
    hold = len(buf)
    if not final:
        for q in range(max(start, len(buf) - _MAX_STOP + 1), len(buf)):
            if buf[q] in _FIRST_CHARS:
                tail = buf[q:]
                if any(len(tail) < len(s) and s.startswith(tail) for s in stops):
                    hold = q
                    break
    if found is not None and (final or pos < hold):
        return pos, found, hold
    return -1, None, hold


@dataclass
class _OpenCall:
    index: int
    name: str
    position: int  # of its invoke header in the completion
    params: list[tuple[str, str, bool, int]] = field(default_factory=list)  # (name, value, is_string, position)
    problems: list[str] = field(default_factory=list)


class StreamParser:
    """Incremental parser of one completion; see the module docstring for events and modes."""

    def __init__(self, thinking_mode: str, strict: bool = False, tool_names: set[str] | list[str] | None = None):
        if thinking_mode not in ("chat", "thinking"):
            raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
        self.strict = strict
        self.tool_names = frozenset(tool_names) if tool_names is not None else None
        self._phase = "reasoning" if thinking_mode == "thinking" else "content"
        self._buf = ""
        self._base = 0  # offset in the completion of the unresolved text (self._spill, then self._buf)
        # A long header or parameter body moves to _spill as it arrives, so that feeding it in
        # small chunks stays linear; no marker can begin there (see _find).
        self._spill: list[str] = []
        self._spilled = 0
        self._scan_from = 0  # no stop can begin before this offset of self._buf
        self._events: list[Event] = []
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._calls: list[tuple[str, str]] = []
        self._n_calls = 0
        self._call: _OpenCall | None = None
        self._eos = False
        self._closed = False
        self._warnings: list[str] = []
        self._junk_warned = False  # one warning per stretch of ignored text between tags

    # -- public ---------------------------------------------------------------------------
    def feed(self, text: str) -> list[Event]:
        if self._closed:
            raise RuntimeError("StreamParser.feed after close()")
        self._buf += text
        while self._step(final=False):
            pass
        return self._take()

    def close(self) -> list[Event]:
        """End of the text: settle what is buffered and emit `End`."""
        if self._closed:
            raise RuntimeError("StreamParser.close called twice")
        while self._step(final=True):
            pass
        self._closed = True
        self._events.append(self._end())
        return self._take()

    # -- helpers --------------------------------------------------------------------------
    def _take(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _fail(self, problem: str, offset: int = 0) -> None:
        raise DSMLParseError(problem, self._base + offset)

    def _warn(self, problem: str, offset: int = 0) -> None:
        self._warnings.append(f"{problem} (at character {self._base + offset})")

    def _consume(self, n: int) -> None:
        """Drop the spilled text and the first `n` characters of the buffer."""
        self._buf = self._buf[n:]
        self._base += self._spilled + n
        self._spill, self._spilled = [], 0
        self._scan_from = 0

    def _unresolved(self, end: int) -> str:
        return "".join(self._spill) + self._buf[:end] if self._spill else self._buf[:end]

    def _emit_text(self, text: str) -> None:
        if not text:
            return
        if self._phase == "reasoning":
            self._reasoning.append(text)
            self._events.append(ReasoningDelta(text))
        else:
            self._content.append(text)
            self._events.append(ContentDelta(text))

    def _find(self, final: bool) -> tuple[int, str | None, int]:
        stops = _STOPS[self._phase][0 if self.strict else 1]
        pos, stop, hold = find_stop(self._buf, self._scan_from, stops, final)
        if stop is None and not final:
            safe = len(self._buf) - _MAX_STOP + 1  # a marker can only begin after this
            if self._phase in ("header", "param") and safe >= _SPILL_CHARS:
                self._spill.append(self._buf[:safe])
                self._spilled += safe
                self._buf = self._buf[safe:]
                hold -= safe
            self._scan_from = max(0, len(self._buf) - _MAX_STOP + 1)
        return pos, stop, hold

    # -- the state machine ------------------------------------------------------------------
    def _step(self, final: bool) -> bool:
        """Advance over one marker if the buffer decides it; False when more text is needed."""
        phase = self._phase
        if phase == "done":
            if self._buf:
                if self.strict:
                    self._fail(f"text after EOS: {self._buf[:40]!r}")
                if not self._junk_warned:
                    self._warn(f"ignored text after EOS: {self._buf[:40]!r}")
                    self._junk_warned = True
                self._consume(len(self._buf))
            return False
        if phase in ("reasoning", "content"):
            return self._text_step(final)
        if phase in ("block", "after_param", "after_block"):
            return self._separator_step(final)
        if phase == "header":
            return self._header_step(final)
        return self._param_step(final)

    def _text_step(self, final: bool) -> bool:
        pos, stop, hold = self._find(final)
        if stop is None:
            self._emit_text(self._buf if final else self._buf[:hold])
            self._consume(len(self._buf) if final else hold)
            return False
        self._emit_text(self._buf[:pos])
        self._consume(pos)
        self._consume(len(stop))
        reasoning = self._phase == "reasoning"
        if stop == THINK_END and reasoning:
            self._phase = "content"
        elif stop in (TOOL_CALLS_START, TOOL_CALLS_BARE):
            if reasoning:
                if self.strict:
                    self._fail("tool block inside the reasoning (no </think> before it)", -len(stop))
                self._warn("tool block inside the reasoning without </think>", -len(stop))
            elif stop == TOOL_CALLS_BARE:
                self._warn("tool block without the blank line before it", -len(stop))
            self._phase = "block"
        elif stop == INVOKE_OPEN:  # tolerant content only: a call written without its block
            self._warn("invoke without a tool_calls block around it", -len(stop))
            self._phase = "header"
        elif stop == EOS and (not reasoning or not self.strict):
            if reasoning:
                self._warn("EOS before </think>", -len(stop))
            self._eos = True
            self._phase = "done"
        else:
            where = "reasoning" if reasoning else "content"
            if self.strict:
                self._fail(f"{stop!r} inside the {where}", -len(stop))
            self._warn(f"dropped {stop!r} from the {where}", -len(stop))
        return True

    def _separator_step(self, final: bool) -> bool:
        """Between tags, where the grammar allows exactly '>\\n' (or nothing, after the block)."""
        expected = "" if self._phase == "after_block" else SEPARATOR
        pos, stop, hold = self._find(final)
        between = self._buf[:pos] if stop is not None else (self._buf if final else self._buf[:hold])
        if self.strict:
            if stop is None and not expected.startswith(between) or stop is not None and between != expected:
                self._fail(f"expected {expected!r} between tags, got {between[:40]!r}")
        elif between.strip() not in ("", ">") and not self._junk_warned:
            self._warn(f"ignored text between tags: {between[:40]!r}")
            self._junk_warned = True
        if stop is None:
            if not self.strict:
                self._consume(len(between))  # tolerant: nothing here is kept, so nothing is buffered
            return False
        self._consume(pos + len(stop))
        self._junk_warned = False
        self._after_marker(stop)
        return True

    def _after_marker(self, stop: str) -> None:
        """Phase change on a structural marker (block, invoke and parameter tags, EOS)."""
        if stop == EOS:
            if self._call is not None:
                self._warn(f"EOS inside the call of {self._call.name!r}; it will not run")
            elif self._phase == "block":
                self._warn("EOS before the tool block was closed")
            self._eos = True
            self._phase = "done"
        elif stop == TOOL_CALLS_CLOSE:
            if self._call is not None:
                self._call.problems.append("its invoke tag is not closed")
                self._complete_call()
            self._phase = "after_block"
        elif stop == INVOKE_OPEN:
            if self._call is not None:
                self._call.problems.append("its invoke tag is not closed")
                self._complete_call()
            self._phase = "header"
        elif stop == INVOKE_CLOSE:
            self._complete_call()
            self._phase = "block"
        elif stop == PARAMETER_OPEN:
            self._phase = "param"
        elif stop == TOOL_CALLS_BARE:  # tolerant, after a closed block: a second block
            self._warn("a second tool block")
            self._phase = "block"

    def _header_step(self, final: bool) -> bool:
        pos, stop, _ = self._find(final)
        if stop is None and not final:
            return False
        header = self._unresolved(len(self._buf) if stop is None else pos)
        if self.strict:
            match = INVOKE_HEADER.match(header)
            if match is None:
                self._fail(f"malformed invoke header {header[:60]!r}")
            name, problem = match.group(1), None
        else:
            match = LENIENT_HEADER.match(header)
            name = match.group(1) if match else header.strip()[:60]
            problem = None if match else f"malformed invoke header {header[:60]!r}"
        self._call = _OpenCall(self._n_calls, name, self._base)
        self._n_calls += 1
        if problem:
            self._call.problems.append(problem)
        self._events.append(ToolCallStarted(self._call.index, name))
        if stop is None:  # end of the text right after the header
            self._consume(len(self._buf))
            if self.strict:
                self._complete_call()  # upstream counts it as a call without parameters
                self._phase = "block"
            else:
                self._phase = "after_param"  # left open: _end reports it as incomplete
            return False
        self._consume(pos + len(stop))
        self._after_marker(stop)
        return True

    def _param_step(self, final: bool) -> bool:
        pos, stop, _ = self._find(final)
        if stop is None:
            return False  # at the end of the text, settled by _end
        body = self._unresolved(pos)
        call = self._call
        pattern = PARAMETER_BODY if self.strict else LENIENT_PARAMETER
        match = pattern.match(body) if stop in (PARAMETER_END, PARAMETER_CLOSE) else None
        if match is None:
            problem = f"malformed parameter {body[:60]!r}" if stop in (PARAMETER_END, PARAMETER_CLOSE) else "a parameter is not closed"
            if self.strict:
                self._fail(problem)
            call.problems.append(f"{problem} (at character {self._base})")
        else:
            key, flag, value = match.groups()
            if any(key == p[0] for p in call.params):
                if self.strict:
                    self._fail(f"duplicate parameter {key!r} in a call of {call.name!r}")
                call.problems.append(f"duplicate parameter {key!r}")
            else:
                call.params.append((key, value, flag == "true", self._base + match.start(3)))
                self._events.append(ToolCallParameter(call.index, key, value, flag == "true"))
        self._consume(pos + len(stop))
        if stop in (PARAMETER_END, PARAMETER_CLOSE):
            self._phase = "after_param"
        else:
            self._after_marker(stop)
        return True

    def _complete_call(self) -> None:
        call, self._call = self._call, None
        problems = list(call.problems)
        if self.tool_names is not None and call.name not in self.tool_names:
            known = ", ".join(sorted(self.tool_names)) or "none"
            problems.insert(0, f"unknown tool {call.name!r} (invoke at character {call.position}; known: {known})")
        for key, value, is_string, position in call.params:
            if not is_string:
                try:
                    json.loads(value)
                except (ValueError, RecursionError) as err:  # RecursionError: absurdly deep nesting
                    at = position + getattr(err, "pos", 0)
                    problems.append(f"parameter {key!r}: string=\"false\" value is not valid JSON ({getattr(err, 'msg', err)} at character {at})")
        arguments = arguments_json([(k, v, s) for k, v, s, _ in call.params])
        error = f"tool call {call.name!r}: " + "; ".join(problems) if problems else None
        self._calls.append((call.name, arguments))
        self._events.append(ToolCallComplete(call.index, call.name, arguments, error))

    def _end(self) -> End:
        """Settle the end of the text in the current phase; build the final message."""
        phase, buf, incomplete = self._phase, self._buf, None
        at_end = self._spilled + len(buf)  # offset of the end of the text from self._base
        if self.strict:
            self._settle_strict_end(phase, buf)
            reason = "eos" if self._eos else "no_eos"
        else:
            if self._eos:
                reason = "eos"
            elif phase in ("content", "after_block"):
                reason = "no_eos"
            else:
                reason = "truncated"
                self._warn(f"text ended inside the {'reasoning' if phase == 'reasoning' else 'tool block'}", at_end)
            if self._call is not None:
                incomplete = self._call.name
                self._warn(f"the call of {incomplete!r} is incomplete; it must not run", at_end)
        message = {
            "role": "assistant",
            "content": "".join(self._content),
            "reasoning_content": "".join(self._reasoning),
            "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in self._calls],
        }
        return End(reason, message, incomplete, tuple(self._warnings))

    def _settle_strict_end(self, phase: str, buf: str) -> None:
        """What upstream accepts at the end of the text without EOS (only inside a tool block)."""
        if self._eos:
            return
        if phase == "reasoning":
            self._fail("reasoning is not closed by </think>", len(buf))
        if phase == "content":
            self._fail("completion does not end with the EOS token", len(buf))
        if phase == "after_param" and buf == SEPARATOR:
            self._complete_call()  # upstream: a call whose last parameter was fully read is complete
        elif buf or phase in ("param", "after_param"):
            self._fail(f"text ended inside the tool block: {buf[:40]!r}")
