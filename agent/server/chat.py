"""Chat completions on DSV4: OpenAI messages and tools rendered by `encoding.encode_messages` (thinking
mode, Think Max unless the request says otherwise); the completion parsed by the tolerant
`encoding.StreamParser` into OpenAI deltas (`reasoning_content`, `content`, `tool_calls`)."""

from __future__ import annotations

import json
from typing import Any

from agent.backends.engine import ConstrainedDecoding
from agent.server.schemas import ChatRequest, RequestError


def render_chat(request: ChatRequest) -> tuple[str, str]:
    """(prompt text, thinking mode) for a chat request; the tools ride on the system message."""
    from encoding import MessageError, encode_messages

    messages = [dict(m) for m in request.messages]
    if request.tools:
        for i, tool in enumerate(request.tools):
            if not isinstance(tool.get("function"), dict) or not tool["function"].get("name"):
                raise RequestError(f"tools.{i}.function", f"tools[{i}] needs a function with a name")
        if messages[0].get("role") == "system":
            messages[0]["tools"] = request.tools
        else:
            messages.insert(0, {"role": "system", "content": "", "tools": request.tools})
    mode = "chat" if request.reasoning_effort == "none" else "thinking"
    effort = None if request.reasoning_effort == "none" else request.reasoning_effort
    try:
        return encode_messages(messages, mode, reasoning_effort=effort), mode
    except MessageError as e:
        raise RequestError("messages", str(e)) from None


class ChatParser:
    """Completion text in, OpenAI chat deltas out; `.message()` is the whole turn."""

    def __init__(self, mode: str, call_prefix: str, tool_names: set[str] | None) -> None:
        from encoding import StreamParser

        self.parser = StreamParser(mode, strict=False, tool_names=tool_names)
        self.call_prefix = call_prefix
        self.reasoning, self.content = [], []
        self.tool_calls: list[dict[str, Any]] = []
        self.errors: list[str] = []  # calls the model botched: reported, never dropped silently

    def feed(self, text: str) -> list[dict[str, Any]]:
        return self._deltas(self.parser.feed(text))

    def close(self) -> list[dict[str, Any]]:
        return self._deltas(self.parser.close())

    def _deltas(self, events: list[Any]) -> list[dict[str, Any]]:
        from encoding.stream import ContentDelta, End, ReasoningDelta, ToolCallComplete

        out = []
        for event in events:
            if isinstance(event, ReasoningDelta):
                self.reasoning.append(event.text)
                out.append({"reasoning_content": event.text})
            elif isinstance(event, ContentDelta):
                self.content.append(event.text)
                out.append({"content": event.text})
            elif isinstance(event, ToolCallComplete) and event.error is None:
                call = {"id": f"{self.call_prefix}_{len(self.tool_calls)}", "type": "function",
                        "function": {"name": event.name, "arguments": event.arguments}}
                out.append({"tool_calls": [{"index": len(self.tool_calls), **call}]})
                self.tool_calls.append(call)
            elif isinstance(event, ToolCallComplete):
                self.errors.append(f"tool call {event.name!r} not returned: {event.error}")
            elif isinstance(event, End) and event.incomplete_call:
                self.errors.append(f"tool call cut off by the end of the completion: {event.incomplete_call}")
        return out

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) or None,
                                   "reasoning_content": "".join(self.reasoning) or None}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.errors:
            message["dsml_errors"] = self.errors
        return message

    def finish_reason(self, engine_reason: str | None) -> str:
        return "tool_calls" if self.tool_calls else (engine_reason or "stop")


def constrained_decoding(request: ChatRequest, tokenizer: Any) -> ConstrainedDecoding | None:
    """The DSML constraint over exactly the request's tools (as the agent's EngineBackend applies it);
    None without tools or with `"dsml_constraint": false`. Fresh per request: it holds the turn's state."""
    from encoding import DSMLConstraint

    if not request.tools or not request.dsml_constraint:
        return None
    try:
        return ConstrainedDecoding(DSMLConstraint(tokenizer, request.tools))
    except ValueError as e:  # a tool or parameter name DSML cannot write
        raise RequestError("tools", f"tools: {e}") from None


def tool_names(request: ChatRequest) -> set[str] | None:
    return {t["function"]["name"] for t in request.tools} if request.tools else None


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)
