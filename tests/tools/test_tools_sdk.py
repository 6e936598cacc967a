"""The tool SDK: schemas from hints and docstrings, invoke semantics, Toolset, output capping."""
from __future__ import annotations

import threading
from typing import Annotated, Literal

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from tools import Tool, ToolContext, ToolResult, Toolset, cap_output, tool


@pytest.fixture
def anyio_backend():
    return "asyncio"


@tool
def google_style(path: str, count: int = 3, mode: Literal["fast", "slow"] = "fast") -> str:
    """Summarise a file.

    Reads the file and returns a summary.

    Args:
        path: where the file is,
            relative to the workspace.
        count: how many sentences.
    """
    return f"{path}:{count}:{mode}"


@tool(name="numpy_tool", timeout_s=5, parallel_safe=True)
async def numpy_style(query: str, limit: Annotated[int, Field(ge=1, le=10)] = 5) -> list[str]:
    """Search things.

    Parameters
    ----------
    query : str
        what to look for
    limit : int
        at most this many
    """
    return [query] * limit


def test_schema_from_google_docstring_and_hints():
    schema = google_style.openai_schema()
    assert schema["type"] == "function"
    fn = schema["function"]
    assert fn["name"] == "google_style"
    assert fn["description"] == "Summarise a file.\n\nReads the file and returns a summary."
    params = fn["parameters"]
    assert params["type"] == "object"
    assert params["required"] == ["path"]
    assert params["additionalProperties"] is False
    assert params["properties"]["path"] == {
        "type": "string",
        "description": "where the file is,\nrelative to the workspace.",
    }
    assert params["properties"]["count"] == {"type": "integer", "default": 3, "description": "how many sentences."}
    assert params["properties"]["mode"]["enum"] == ["fast", "slow"]
    assert "title" not in str(params)  # generated titles are stripped


def test_schema_from_numpy_docstring_with_constraints():
    assert numpy_style.name == "numpy_tool"
    assert numpy_style.parallel_safe and numpy_style.timeout_s == 5
    props = numpy_style.parameters["properties"]
    assert props["query"]["description"] == "what to look for"
    assert props["limit"] == {"type": "integer", "minimum": 1, "maximum": 10, "default": 5, "description": "at most this many"}


@pytest.mark.anyio
async def test_sync_tool_runs_in_a_worker_thread_and_async_tool_on_the_loop():
    seen = {}

    @tool
    def where_sync() -> str:
        """Report the thread."""
        seen["sync"] = threading.get_ident()
        return "ok"

    @tool
    async def where_async() -> str:
        """Report the thread."""
        seen["async"] = threading.get_ident()
        return "ok"

    assert (await where_sync.invoke({})).content == "ok"
    assert (await where_async.invoke({})).content == "ok"
    assert seen["async"] == threading.get_ident()
    assert seen["sync"] != threading.get_ident()
    result = await numpy_style.invoke({"query": "q", "limit": 2})
    assert result.content == '["q", "q"]' and not result.is_error


@pytest.mark.anyio
async def test_validation_errors_name_each_parameter_and_never_raise():
    result = await google_style.invoke({"count": "many", "colour": "red"})
    assert result.is_error
    assert "missing required parameter 'path'" in result.content
    assert "parameter 'count'" in result.content and "'many'" in result.content
    assert "unexpected parameter 'colour'" in result.content
    result = await numpy_style.invoke({"query": "q", "limit": 11})
    assert result.is_error and "parameter 'limit'" in result.content and "less than or equal to 10" in result.content
    result = await google_style.invoke(["not", "a", "dict"])  # type: ignore[arg-type]
    assert result.is_error and "JSON object" in result.content


@pytest.mark.anyio
async def test_context_is_injected_and_hidden_from_the_schema():
    @tool
    async def whoami(greeting: str, ctx: ToolContext) -> str:
        """Greet the run."""
        return f"{greeting} {ctx.run_id} {ctx.step}"

    assert list(whoami.parameters["properties"]) == ["greeting"]
    result = await whoami.invoke({"greeting": "hi"}, ToolContext(run_id="r7", step=3))
    assert result.content == "hi r7 3"
    result = await whoami.invoke({"greeting": "hi", "ctx": "forged"}, ToolContext(run_id="r7"))
    assert result.is_error and "unexpected parameter 'ctx'" in result.content


class Move(BaseModel):
    """Where to move."""

    x: int = Field(description="column")
    y: int = Field(description="row")


@pytest.mark.anyio
async def test_pydantic_model_as_the_arguments_type():
    @tool
    def move(args: Move, ctx: ToolContext | None) -> Move:
        """Move the cursor."""
        return Move(x=args.x + 1, y=args.y + 1)

    assert move.parameters["properties"]["x"] == {"type": "integer", "description": "column"}
    assert move.parameters["required"] == ["x", "y"]
    assert (await move.invoke({"x": 1, "y": 2})).content == '{"x":2,"y":3}'
    bad = await move.invoke({"x": "left"})
    assert bad.is_error and "parameter 'x'" in bad.content and "missing required parameter 'y'" in bad.content


@pytest.mark.anyio
async def test_exceptions_and_timeouts_become_error_results():
    @tool
    def broken(n: int) -> str:
        """Divide."""
        return str(1 / n)

    @tool(timeout_s=0.2)
    async def slow() -> str:
        """Take too long."""
        await anyio.sleep(10)
        return "never"

    @tool(timeout_s=0.2)
    def slow_sync() -> str:
        """Take too long in a thread."""
        threading.Event().wait(1.0)
        return "never"

    result = await broken.invoke({"n": 0})
    assert result.is_error and result.content == "tool 'broken' failed: ZeroDivisionError: division by zero"
    for t in (slow, slow_sync):
        with anyio.fail_after(0.9):  # the call returns at its timeout, not when the work ends
            result = await t.invoke({})
        assert result.is_error and "timed out after 0.2 s" in result.content and result.metadata["timed_out"]


@pytest.mark.anyio
async def test_tool_output_is_capped_with_the_elision_stated():
    @tool(max_output_bytes=1000)
    def chatty() -> str:
        """Talk a lot."""
        return "".join(f"line {i}\n" for i in range(5000))

    result = await chatty.invoke({})
    assert len(result.content.encode()) <= 1000
    assert result.content.startswith("line 0\n") and result.content.endswith("line 4999\n")
    assert f"[{result.metadata['elided_bytes']} bytes elided]" in result.content


def test_decorator_rejects_what_cannot_be_described():
    class Local(BaseModel):
        v: int

    def uses_local(arg: Local) -> None: ...

    with pytest.raises(TypeError, match="cannot resolve its type hints"):
        tool(uses_local)
    with pytest.raises(TypeError, match="'x' needs a type hint"):
        tool(lambda x: x)
    with pytest.raises(TypeError, match=r"\*args"):

        @tool
        def variadic(*items: int) -> None: ...

    with pytest.raises(ValueError, match="tool name"):

        @tool(name="has space")
        def named() -> None: ...


@pytest.mark.anyio
async def test_toolset_keeps_order_rejects_collisions_and_reports_unknown_tools():
    @tool
    def alpha() -> str:
        """A."""
        return "a"

    tools = Toolset([numpy_style, alpha, google_style])
    assert tools.names == ["numpy_tool", "alpha", "google_style"]
    assert [s["function"]["name"] for s in tools.openai_schemas()] == tools.names
    with pytest.raises(ValueError, match="'alpha' is already"):
        tools.add(alpha)
    with pytest.raises(TypeError, match="Tool objects"):
        tools.add(lambda: None)  # type: ignore[arg-type]
    assert (await tools.invoke("alpha", {})).content == "a"
    unknown = await tools.invoke("beta", {})
    assert unknown.is_error and "unknown tool 'beta'" in unknown.content and "alpha" in unknown.content


@pytest.mark.anyio
async def test_tool_built_from_a_schema_and_handler():
    async def handler(arguments, ctx):
        return ToolResult(content=str(sorted(arguments)), metadata={"k": 1})

    t = Tool("raw", "Raw tool.", {"type": "object", "properties": {}}, handler)
    result = await t.invoke({"b": 1, "a": 2})
    assert result.content == "['a', 'b']" and result.metadata["k"] == 1 and "duration_s" in result.metadata
    with pytest.raises(ValueError, match="type 'object'"):
        Tool("raw", "", {"type": "string"}, handler)


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=0, max_size=3000), cap=st.integers(min_value=64, max_value=2000))
def test_cap_output_keeps_head_and_tail_within_the_cap(text, cap):
    capped, elided = cap_output(text, cap)
    data = text.encode()
    if len(data) <= cap:
        assert (capped, elided) == (text, 0)
        return
    assert len(capped.encode()) <= cap
    head, marker_and_tail = capped.split("\n... [", 1)
    tail = marker_and_tail.split("] ...\n", 1)[1]
    assert marker_and_tail.startswith(f"{elided} bytes elided")
    assert text.startswith(head) and text.endswith(tail)
    assert len(head.encode()) + elided + len(tail.encode()) == len(data)
