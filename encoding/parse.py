"""`parse_message_from_completion_text`: the official, strict parser of one whole completion.

Grammar (what the model writes after the prompt's `<｜Assistant｜><think>` or `…</think>`):

    thinking:  REASONING </think> CONTENT ( <EOS> | TOOL_BLOCK [<EOS>] )
    chat:      CONTENT ( <EOS> | TOOL_BLOCK [<EOS>] )
    TOOL_BLOCK = "\\n\\n<｜DSML｜tool_calls>\\n" INVOKE ("\\n" INVOKE)* "\\n</｜DSML｜tool_calls>"

It reads the text the way upstream does, as a sequence of "read until the first of these
markers, then check what was read", and accepts and rejects exactly what upstream does,
including its leniencies at the end of the text (a tool block cut right after a marker passes).
`encoding.StreamParser(strict=True)` implements the same reading incrementally; this whole-text
version is its reference in the tests.
"""
from __future__ import annotations

import re
from typing import Any

from .dsml import arguments_json
from .errors import DSMLParseError
from .tokens import (
    EOS,
    FORBIDDEN_IN_TEXT,
    INVOKE_CLOSE,
    INVOKE_OPEN,
    PARAMETER_OPEN,
    THINK_END,
    TOOL_CALLS_CLOSE,
    TOOL_CALLS_START,
    DSML,
)

# `$` also matches before a final "\n", as in upstream's patterns (an invoke with no parameters
# renders its header as ' name="x">\n\n').
INVOKE_HEADER = re.compile(r'\s*name="(.*?)">\n$', re.DOTALL)
PARAMETER_BODY = re.compile(r' name="(.*?)" string="(true|false)">(.*?)<$', re.DOTALL)
# Upstream stops a parameter value at "/｜DSML｜parameter" (without the "<", which the body keeps).
PARAMETER_END = f"/{DSML}parameter"
SEPARATOR = ">\n"


def read_until(text: str, start: int, stops: tuple[str, ...]) -> tuple[int, str, str | None]:
    """(index after the first stop found, text before it, the stop), or (len, rest, None)."""
    best, found = len(text), None
    for stop in stops:
        pos = text.find(stop, start)
        if pos != -1 and pos < best:
            best, found = pos, stop
    if found is None:
        return len(text), text[start:], None
    return best + len(found), text[start:best], found


def _parse_tool_block(text: str, index: int) -> tuple[int, list[tuple[str, str]]]:
    """Invokes from just after "\\n\\n<｜DSML｜tool_calls" to the block end; (index, [(name, arguments)])."""
    calls = []
    while index < len(text):
        at = index
        index, between, stop = read_until(text, index, (INVOKE_OPEN, TOOL_CALLS_CLOSE))
        if between != SEPARATOR:
            raise DSMLParseError(f"expected '>\\n' in the tool block, got {between[:40]!r}", at)
        if stop == TOOL_CALLS_CLOSE:
            break
        if stop is None:
            raise DSMLParseError("tool block ends without an invoke or its closing tag", at)
        at = index
        index, header, stop = read_until(text, index, (PARAMETER_OPEN, INVOKE_CLOSE))
        match = INVOKE_HEADER.match(header)
        if match is None:
            raise DSMLParseError(f"malformed invoke header {header[:60]!r}", at)
        name, params, seen = match.group(1), [], set()
        while stop == PARAMETER_OPEN:
            at = index
            index, body, stop = read_until(text, index, (PARAMETER_END,))
            match = PARAMETER_BODY.match(body)
            if match is None:
                raise DSMLParseError(f"malformed parameter {body[:60]!r}", at)
            key, flag, value = match.groups()
            if key in seen:
                raise DSMLParseError(f"duplicate parameter {key!r} in a call of {name!r}", at)
            seen.add(key)
            params.append((key, value, flag == "true"))
            at = index
            index, between, stop = read_until(text, index, (PARAMETER_OPEN, INVOKE_CLOSE))
            if between != SEPARATOR:
                raise DSMLParseError(f"expected '>\\n' after a parameter, got {between[:40]!r}", at)
        calls.append((name, arguments_json(params)))
    return index, calls


def parse_message_from_completion_text(text: str, thinking_mode: str) -> dict[str, Any]:
    """One completion (EOS included) to `{"role", "content", "reasoning_content", "tool_calls"}`.

    Raises `DSMLParseError` where the official parser raises (`ValueError`/`AssertionError`).
    """
    if thinking_mode not in ("chat", "thinking"):
        raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
    index, reasoning, calls = 0, "", []
    if thinking_mode == "thinking":
        index, reasoning, stop = read_until(text, 0, (THINK_END, TOOL_CALLS_START))
        if stop != THINK_END:
            raise DSMLParseError("reasoning is not closed by </think>", index - len(stop or ""))
    content_start = index
    index, content, stop = read_until(text, index, (EOS, TOOL_CALLS_START))
    if stop == TOOL_CALLS_START:
        index, calls = _parse_tool_block(text, index)
        at = index
        index, trailing, stop = read_until(text, index, (EOS,))
        if trailing:
            raise DSMLParseError(f"text after the tool block: {trailing[:40]!r}", at)
    elif stop != EOS:
        raise DSMLParseError("completion does not end with the EOS token", len(text))
    if index != len(text):
        raise DSMLParseError(f"text after EOS: {text[index:index + 40]!r}", index)
    for token in FORBIDDEN_IN_TEXT:
        if token in reasoning:
            raise DSMLParseError(f"{token!r} inside the reasoning", reasoning.index(token))
        if token in content:
            raise DSMLParseError(f"{token!r} inside the content", content_start + content.index(token))
    return {
        "role": "assistant",
        "content": content,
        "reasoning_content": reasoning,
        "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}} for name, args in calls],
    }
