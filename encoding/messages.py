"""Chat messages: pydantic models for them, and the checks every message passes before encoding.

The encoder works on OpenAI-style dicts, exactly like the official one. Callers may pass these
models instead (or mix both); `as_message_dicts` turns models into the dicts the official code
would have been given, and rejects malformed messages with a `MessageError` naming the message
index and the field.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from .errors import MessageError
from .tokens import TASK_TOKENS

Task = Literal["action", "query", "authority", "domain", "title", "read_url"]


class FunctionSchema(BaseModel):
    """A tool's OpenAI `function` object; rendered as one JSON line in the tools block."""

    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolSpec(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionSchema


class FunctionCall(BaseModel):
    name: str
    # JSON object text (as OpenAI sends it) or the already-decoded object.
    arguments: str | dict[str, Any]


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(BaseModel):
    role: Literal["system"] = "system"
    content: str | None = None
    tools: list[ToolSpec] | None = None
    response_format: dict[str, Any] | None = None


class DeveloperMessage(BaseModel):
    """Rendered as a user turn (the internal search-agent role); may carry tools."""

    role: Literal["developer"] = "developer"
    content: str
    tools: list[ToolSpec] | None = None
    response_format: dict[str, Any] | None = None
    task: Task | None = None


class UserMessage(BaseModel):
    role: Literal["user"] = "user"
    content: str | None = None
    task: Task | None = None
    wo_eos: bool | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    task: Task | None = None
    wo_eos: bool | None = None  # render without the closing EOS (a prefilled partial answer)


class ToolMessage(BaseModel):
    role: Literal["tool"] = "tool"
    tool_call_id: str | None = None
    # Text, or OpenAI content parts (text parts are kept, others become "[Unsupported <type>]").
    content: str | list[dict[str, Any]]


class LatestReminderMessage(BaseModel):
    """Date, locale and similar facts placed right before the latest turn."""

    role: Literal["latest_reminder"] = "latest_reminder"
    content: str


Message = Annotated[
    Union[SystemMessage, DeveloperMessage, UserMessage, AssistantMessage, ToolMessage, LatestReminderMessage],
    Field(discriminator="role"),
]

ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")


def decode_arguments(arguments: Any, where: str) -> dict[str, Any]:
    """A tool call's `arguments` as the object whose parameters are rendered: a dict as is; JSON text
    decoded. Text that is not JSON (or that `json` cannot decode: too deep, an integer too long)
    becomes the single parameter {"arguments": text}, as the official encoder renders it; JSON that
    is not an object is rejected, as it is there (`.items()` fails)."""
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str):
        raise MessageError(where, f"must be a JSON object string, got {type(arguments).__name__}")
    try:
        decoded = json.loads(arguments)
    except (ValueError, RecursionError):
        return {"arguments": arguments}
    if not isinstance(decoded, dict):
        raise MessageError(where, f"must be a JSON object, got {type(decoded).__name__}")
    return decoded


class ToolCallLedger:
    """Which tool calls of the latest assistant turn are still waiting for a result."""

    def __init__(self) -> None:
        self.ids: list[str | None] = []
        self.answered: set[str] = set()
        self.answers = 0

    def open(self, calls: list[dict]) -> None:
        self.ids = [call.get("id") for call in calls]
        self.answered = set()
        self.answers = 0

    def answer(self, call_id: str | None, where: str) -> None:
        if not self.ids:
            raise MessageError(where, "tool result without a preceding assistant tool call")
        known = [i for i in self.ids if i]
        if call_id and known:
            if call_id not in known:
                raise MessageError(f"{where}.tool_call_id", f"{call_id!r} matches no call of the preceding assistant turn {known}")
            if call_id in self.answered:
                raise MessageError(f"{where}.tool_call_id", f"second result for call {call_id!r}")
            self.answered.add(call_id)
        self.answers += 1
        if self.answers > len(self.ids):
            raise MessageError(where, f"more tool results than the {len(self.ids)} call(s) of the preceding assistant turn")


def _check_text(msg: dict, field: str, where: str, required: bool = False, nonempty: bool = False) -> None:
    value = msg.get(field)
    if value is None:
        if required or nonempty:
            raise MessageError(f"{where}.{field}", "is required")
        return
    if not isinstance(value, str):
        raise MessageError(f"{where}.{field}", f"must be a string, got {type(value).__name__}")
    if nonempty and not value:
        raise MessageError(f"{where}.{field}", "must not be empty")


def _check_tools(tools: Any, where: str) -> None:
    if not isinstance(tools, list):
        raise MessageError(f"{where}.tools", f"must be a list, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise MessageError(f"{where}.tools[{i}]", 'must be {"type": "function", "function": {"name": ..., ...}}')
        _check_json(fn, f"{where}.tools[{i}].function")


def _check_json(value: Any, where: str) -> None:
    """Values rendered with json.dumps (tool schemas, response formats) must be JSON data."""
    try:
        json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as err:
        raise MessageError(where, f"is not JSON-serialisable ({err})") from None


def _check_tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list):
        raise MessageError(f"{where}.tool_calls", f"must be a list, got {type(calls).__name__}")
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise MessageError(f"{where}.tool_calls[{i}]", 'must be {"type": "function", "function": {"name", "arguments"}}')
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise MessageError(f"{where}.tool_calls[{i}].function.name", "must be a non-empty string")
        decode_arguments(fn.get("arguments"), f"{where}.tool_calls[{i}].function.arguments")


def _check_tool_content(content: Any, where: str) -> None:
    if isinstance(content, str):
        return
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return
    raise MessageError(f"{where}.content", "must be a string or a list of content parts (dicts)")


def _as_dict(message: Any, where: str) -> dict:
    if isinstance(message, BaseModel):
        return message.model_dump(exclude_none=True)
    if isinstance(message, dict):
        return message
    raise MessageError(where, f"must be a dict or a pydantic message, got {type(message).__name__}")


def as_message_dicts(messages: Any, name: str = "messages", ledger: ToolCallLedger | None = None) -> list[dict]:
    """Check `messages` and return them as dicts (dicts are passed through, not copied).

    `ledger` carries the pending tool calls from an earlier list (the `context` before `messages`).
    """
    if not isinstance(messages, (list, tuple)):
        raise MessageError(name, f"must be a list of messages, got {type(messages).__name__}")
    ledger = ledger if ledger is not None else ToolCallLedger()
    out = []
    for index, message in enumerate(messages):
        where = f"{name}[{index}]"
        msg = _as_dict(message, where)
        role = msg.get("role")
        if role not in ROLES:
            raise MessageError(f"{where}.role", f"unknown role {role!r}; expected one of {list(ROLES)}")
        task = msg.get("task")
        if task is not None and (not isinstance(task, str) or task not in TASK_TOKENS):
            raise MessageError(f"{where}.task", f"unknown task {task!r}; expected one of {list(TASK_TOKENS)}")
        if msg.get("tools"):
            _check_tools(msg["tools"], where)
        if msg.get("response_format"):
            _check_json(msg["response_format"], f"{where}.response_format")
        if role == "tool":
            _check_tool_content(msg.get("content"), where)
            call_id = msg.get("tool_call_id")
            if call_id is not None and not isinstance(call_id, str):
                raise MessageError(f"{where}.tool_call_id", "must be a string")
            ledger.answer(call_id, where)
        else:
            _check_text(msg, "content", where, required=role == "latest_reminder", nonempty=role == "developer")
        if role == "assistant":
            _check_text(msg, "reasoning_content", where)
            if msg.get("tool_calls"):
                _check_tool_calls(msg["tool_calls"], where)
            ledger.open(msg.get("tool_calls") or [])
        out.append(msg)
    return out
