"""Chat completions on DSV4: OpenAI messages, tools and response format rendered by
`encoding.render_messages` (the mode from `reasoning_effort`, see agent/server/requests.py) and encoded
by `Tokenizer.encode_prompt`, so no text of a message becomes a control token; the
decoding constrained by the request's grammar (`tool_choice` through the DSML constraint, a JSON
`response_format` through the JSON constraint); the completion parsed by the tolerant
`encoding.StreamParser` into OpenAI deltas (`reasoning_content`, `content`, `tool_calls`)."""

from __future__ import annotations

from typing import Any

from agent.backends.engine import ConstrainedDecoding
from agent.server.errors import RequestError
from agent.server.requests import ChatRequest, JsonObjectFormat, JsonSchemaFormat, NamedToolChoice


def render_chat(request: ChatRequest, tokenizer: Any) -> tuple[list[int], str]:
    """(prompt ids, thinking mode) for a chat request; tools and response format ride on the system message."""
    from encoding import MessageError, render_messages

    messages = [m.as_encoding_dict() for m in request.messages]
    extras: dict[str, Any] = {}
    if request.tools:
        extras["tools"] = request.tool_dicts()
    if isinstance(request.response_format, (JsonObjectFormat, JsonSchemaFormat)):
        extras["response_format"] = request.response_format.model_dump(by_alias=True, exclude_none=True)
    if extras:
        if messages[0]["role"] == "system":
            messages[0].update(extras)
        else:
            messages.insert(0, {"role": "system", "content": "", **extras})
    mode, effort = request.thinking_mode()
    try:
        pieces = render_messages(messages, mode, reasoning_effort=effort)
    except MessageError as e:
        raise RequestError("messages", str(e)) from None
    return tokenizer.encode_prompt(pieces), mode


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


def chat_constraint(request: ChatRequest, tokenizer: Any) -> ConstrainedDecoding | None:
    """The grammar of a chat request, fresh (it holds the turn's state): a JSON `response_format`, or the
    DSML constraint over exactly the request's tools honouring `tool_choice`; None when nothing
    constrains it (no tools, or `"dsml_constraint": false` with `tool_choice` auto)."""
    from encoding import DSMLConstraint

    choice = request.tool_choice
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    calls = "required" if named else (choice or "auto")
    if calls == "required" and not request.tools:
        raise RequestError("tool_choice", f"tool_choice {named or 'required'!r} needs tools")
    if named and named not in {tool.function.name for tool in request.tools}:
        raise RequestError("tool_choice", f"tool_choice names {named!r}, which is not among the tools")
    json_format = json_constraint(request.response_format, tokenizer)
    if json_format is not None:
        if request.tools and calls != "none":
            raise RequestError("response_format", "a JSON response_format with tools needs tool_choice 'none' "
                                                  "(the answer is then the JSON, never a call)")
        return json_format
    if not request.tools:
        return None
    if not request.dsml_constraint:
        if calls != "auto":
            raise RequestError("tool_choice", f"tool_choice {choice if isinstance(choice, str) else named!r} is "
                                              "enforced by the DSML constraint; it cannot be honoured with "
                                              "dsml_constraint: false")
        return None
    try:
        return ConstrainedDecoding(DSMLConstraint(tokenizer, request.tool_dicts(), calls=calls,
                                                  allowed=[named] if named else None,
                                                  parallel=request.parallel_tool_calls))
    except ValueError as e:  # a tool or parameter name DSML cannot write
        raise RequestError("tools", f"tools: {e}") from None


def json_constraint(response_format: Any, tokenizer: Any) -> ConstrainedDecoding | None:
    """The JSON constraint of a `response_format` (json_object: any object; json_schema: its schema);
    None for text or none. A schema outside the supported subset is a 400 naming what is unsupported."""
    from encoding import JSONConstraint, UnsupportedSchema, compile_schema

    if isinstance(response_format, JsonObjectFormat):
        return ConstrainedDecoding(JSONConstraint(tokenizer, compile_schema(None)))
    if isinstance(response_format, JsonSchemaFormat):
        schema = response_format.json_schema.schema_
        try:
            grammar = compile_schema(schema if schema is not None else {"type": "object"})
        except UnsupportedSchema as e:
            raise RequestError("response_format.json_schema.schema", f"response_format.json_schema.schema: {e}",
                               code="unsupported_schema") from None
        return ConstrainedDecoding(JSONConstraint(tokenizer, grammar))
    return None


def tool_names(request: ChatRequest) -> set[str] | None:
    return {tool.function.name for tool in request.tools} if request.tools else None
