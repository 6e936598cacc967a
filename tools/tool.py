"""`Tool`: a named, JSON-schema-described action the model can call; `@tool` builds one from a function.

The schema comes from the function's type hints and its docstring (Google or numpy style
parameter sections) through a pydantic model, which also validates the model's arguments before
the function runs. Whatever goes wrong inside `invoke` (bad arguments, an exception, a timeout)
comes back as an error `ToolResult` for the model to read, never as an exception.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import json
import re
import threading
import time
import types
import typing
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import docstring_parser
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from tools.context import ToolContext
from tools.result import DEFAULT_OUTPUT_CAP_BYTES, ToolResult, cap_output, valid_unicode

# What OpenAI-style function calling accepts as a name; DSML is laxer, so this is the binding rule.
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# handler(arguments, ctx) -> a ToolResult, or any value `_as_result` turns into one
Handler = Callable[[dict[str, Any], "ToolContext | None"], Awaitable[Any]]


class ArgumentError(Exception):
    """The model's arguments do not fit the tool's schema; the message names each bad parameter."""


class Tool:
    """A callable the model sees as `{name, description, parameters}`.

    Build one with `@tool` from a function, or directly from a JSON schema and an async handler
    (the MCP client does that for remote tools).
    """

    def __init__(
        self,
        name: str,
        description: str,
        parameters: dict[str, Any],
        handler: Handler,
        *,
        timeout_s: float | None = None,
        parallel_safe: bool = False,
        max_output_bytes: int = DEFAULT_OUTPUT_CAP_BYTES,
    ) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"tool name {name!r} must be 1-64 characters of letters, digits, '_' or '-'")
        if parameters.get("type") != "object":
            raise ValueError(f"tool {name!r}: parameters must be a JSON schema of type 'object', got {parameters!r}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"tool {name!r}: timeout_s must be positive, got {timeout_s}")
        self.name = name
        self.description = description
        self.parameters = parameters
        self.timeout_s = timeout_s
        self.parallel_safe = parallel_safe
        """Safe to run concurrently with other parallel-safe calls of the same turn (no side effects)."""
        self.max_output_bytes = max_output_bytes
        self._handler = handler

    def __repr__(self) -> str:
        return f"Tool({self.name!r}, parallel_safe={self.parallel_safe}, timeout_s={self.timeout_s})"

    def openai_schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    async def invoke(self, arguments: Mapping[str, Any] | None, ctx: ToolContext | None = None) -> ToolResult:
        """Run the tool. Never raises for anything the model or the tool did wrong: that is an error result."""
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, Mapping):
            return ToolResult.error(
                f"tool {self.name!r} takes a JSON object of named arguments, got {type(arguments).__name__}"
            )
        started = time.perf_counter()
        with anyio.move_on_after(self.timeout_s) as deadline:
            try:
                result = _as_result(await self._handler(dict(arguments), ctx))
            except ArgumentError as exc:
                result = ToolResult.error(f"invalid arguments for tool {self.name!r}: {exc}")
            except SystemExit as exc:  # sys.exit() in a tool ends this call, not the agent
                result = ToolResult.error(
                    f"tool {self.name!r} failed: SystemExit: it called sys.exit({exc.code!r}), "
                    "which ends only this call"
                )
            except Exception as exc:  # the tool's own failure is information for the model
                result = ToolResult.error(f"tool {self.name!r} failed: {type(exc).__name__}: {exc}")
        if deadline.cancelled_caught:
            result = ToolResult.error(f"tool {self.name!r} timed out after {self.timeout_s:g} s", timed_out=True)
        content, elided = cap_output(valid_unicode(result.content), self.max_output_bytes)
        metadata = {**result.metadata, "duration_s": time.perf_counter() - started}
        if elided:
            metadata["elided_bytes"] = metadata.get("elided_bytes", 0) + elided
        return result.model_copy(update={"content": content, "metadata": metadata})


def _as_result(value: Any) -> ToolResult:
    """A tool function's return value as the text the model will read."""
    if isinstance(value, ToolResult):
        return value
    if value is None:
        return ToolResult(content="(no output)")
    if isinstance(value, str):
        return ToolResult(content=value)
    if isinstance(value, bytes):
        return ToolResult(content=value.decode("utf-8", errors="replace"))
    if isinstance(value, BaseModel):
        return ToolResult(content=value.model_dump_json())
    return ToolResult(content=json.dumps(value, ensure_ascii=False, default=str))


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float | None = None,
    parallel_safe: bool = False,
    max_output_bytes: int = DEFAULT_OUTPUT_CAP_BYTES,
) -> Any:
    """Turn a function (sync or async) into a `Tool`: `@tool`, `@tool(timeout_s=30, ...)` or `tool(fn)`.

    Every parameter needs a type hint. A parameter annotated `ToolContext` is injected at call time
    and hidden from the model. A function whose only other parameter is a pydantic model takes that
    model's fields as its arguments. Sync functions run in a daemon thread of their own (see
    `_run_in_daemon_thread`). Arguments are validated strictly as JSON: `true` is no integer.
    """

    def build(f: Callable[..., Any]) -> Tool:
        return _from_function(f, name, description, timeout_s, parallel_safe, max_output_bytes)

    return build(fn) if fn is not None else build


def _from_function(
    fn: Callable[..., Any],
    name: str | None,
    description: str | None,
    timeout_s: float | None,
    parallel_safe: bool,
    max_output_bytes: int,
) -> Tool:
    """The work of `tool`: read the signature and docstring, build the arguments model and the handler."""
    tool_name = name or fn.__name__
    doc = docstring_parser.parse(inspect.getdoc(fn) or "")
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except NameError as exc:  # string annotations naming a class local to a function
        raise TypeError(
            f"tool {tool_name!r}: cannot resolve its type hints ({exc}); define the types they name at module level"
        ) from exc
    context_param: str | None = None
    value_params: list[inspect.Parameter] = []
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"tool {tool_name!r}: *args and **kwargs cannot be described to the model")
        if param.name not in hints:
            raise TypeError(f"tool {tool_name!r}: parameter {param.name!r} needs a type hint")
        if _is_context(hints[param.name]):
            context_param = param.name
        else:
            value_params.append(param)

    model_param: str | None = None
    if len(value_params) == 1 and _is_model_class(hints[value_params[0].name]):
        model_param = value_params[0].name
        args_model: type[BaseModel] = hints[model_param]
    else:
        param_docs = {p.arg_name: p.description for p in doc.params}
        fields: dict[str, Any] = {}
        for param in value_params:
            default = ... if param.default is inspect.Parameter.empty else param.default
            fields[param.name] = (hints[param.name], Field(default, description=param_docs.get(param.name)))
        args_model = create_model(
            f"{tool_name}_arguments", __config__=ConfigDict(extra="forbid"), **fields  # type: ignore[call-overload]
        )

    is_async = inspect.iscoroutinefunction(fn)

    async def handler(arguments: dict[str, Any], ctx: ToolContext | None) -> Any:
        validated = _validate(args_model, arguments)
        kwargs = {model_param: validated} if model_param else {k: getattr(validated, k) for k in args_model.model_fields}
        if context_param is not None:
            kwargs[context_param] = ctx if ctx is not None else ToolContext()
        if is_async:
            return await fn(**kwargs)
        return await _run_in_daemon_thread(functools.partial(fn, **kwargs), tool_name)

    summary = "\n\n".join(part for part in (doc.short_description, doc.long_description) if part)
    return Tool(
        tool_name,
        description if description is not None else summary,
        json_schema(args_model),
        handler,
        timeout_s=timeout_s,
        parallel_safe=parallel_safe,
        max_output_bytes=max_output_bytes,
    )


def _validate(args_model: type[BaseModel], arguments: dict[str, Any]) -> BaseModel:
    """The model's arguments checked as the JSON they are, in pydantic's strict mode: `true` is not an
    integer and "5" is not a number, while JSON strings still become dates, enums and paths."""
    try:
        payload = json.dumps(arguments)
    except (TypeError, ValueError) as exc:
        raise ArgumentError(f"arguments must be JSON values: {exc}") from None
    try:
        return args_model.model_validate_json(payload, strict=True)
    except ValidationError as exc:
        raise ArgumentError(_describe_validation_error(exc, args_model)) from None


async def _run_in_daemon_thread(call: Callable[[], Any], name: str) -> Any:
    """Run a sync tool function in a daemon thread of its own and wait for it.

    A sync function cannot be interrupted: a call that times out returns at once and leaves the
    thread to finish alone. Being a daemon, such a thread never keeps the process from exiting
    (anyio's worker threads are joined at interpreter exit, so a tool blocked forever would hang it).
    """
    token = anyio.lowlevel.current_token()
    done = anyio.Event()
    outcome: list[tuple[bool, Any]] = []  # (raised, value or exception)
    context = contextvars.copy_context()

    def work() -> None:
        try:
            outcome.append((False, context.run(call)))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting task, which raises it
            outcome.append((True, exc))
        try:
            anyio.from_thread.run_sync(done.set, token=token)
        except RuntimeError:  # the event loop has ended: nobody waits for this result any more
            pass

    threading.Thread(target=work, name=f"tool {name}", daemon=True).start()
    await done.wait()
    raised, value = outcome[0]
    if raised:
        raise value
    return value


def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The arguments model as the JSON schema the model sees, without pydantic's generated titles
    (they repeat the names and cost prompt tokens in every request)."""
    return strip_titles(model.model_json_schema())


_NAME_MAPS = frozenset({"properties", "$defs", "definitions", "patternProperties"})


def strip_titles(node: Any, names_level: bool = False) -> Any:
    """A JSON schema without its generated "title" strings (properties named "title" stay)."""
    if isinstance(node, dict):
        return {
            key: strip_titles(value, names_level=not names_level and key in _NAME_MAPS)
            for key, value in node.items()
            # in a name map, "title" is a property called title, not a generated title
            if names_level or not (key == "title" and isinstance(value, str))
        }
    if isinstance(node, list):
        return [strip_titles(item) for item in node]
    return node


def _is_context(hint: Any) -> bool:
    if hint is ToolContext:
        return True
    # ToolContext | None, Optional[ToolContext]
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and ToolContext in typing.get_args(hint)


def _is_model_class(hint: Any) -> bool:
    return inspect.isclass(hint) and issubclass(hint, BaseModel)


def _describe_validation_error(exc: ValidationError, model: type[BaseModel]) -> str:
    problems = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "(arguments)"
        if err["type"] == "missing":
            problems.append(f"missing required parameter {where!r}")
        elif err["type"] == "extra_forbidden":
            known = ", ".join(model.model_fields) or "no parameters"
            problems.append(f"unexpected parameter {where!r} (this tool takes: {known})")
        else:
            got = repr(err.get("input"))
            got = got if len(got) <= 80 else got[:77] + "..."
            problems.append(f"parameter {where!r}: {err['msg']} (got {got})")
    return "; ".join(problems)
