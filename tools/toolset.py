"""`Toolset`: the tools one agent offers the model, in a fixed order, names unique."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from tools.context import ToolContext
from tools.result import ToolResult
from tools.tool import Tool


class Toolset:
    """An ordered set of tools. The order is the order of addition, and it is the order of the schemas
    rendered into the prompt: keep it fixed for a session so the prompt prefix (and its KV cache) stays
    valid."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, tool: Tool) -> None:
        if not isinstance(tool, Tool):
            raise TypeError(f"Toolset holds Tool objects, got {type(tool).__name__} (decorate functions with @tool)")
        if tool.name in self._tools:
            raise ValueError(f"a tool named {tool.name!r} is already in this toolset")
        self._tools[tool.name] = tool

    def extend(self, tools: Iterable[Tool]) -> None:
        for t in tools:
            self.add(t)

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __getitem__(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            raise KeyError(f"no tool named {name!r}; tools: {', '.join(self._tools) or '(none)'}") from None

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def openai_schemas(self) -> list[dict[str, Any]]:
        return [t.openai_schema() for t in self._tools.values()]

    async def invoke(self, name: str, arguments: Mapping[str, Any] | None, ctx: ToolContext | None = None) -> ToolResult:
        """Call a tool by the name the model gave; an unknown name is an error result listing the real ones."""
        tool = self._tools.get(name)
        if tool is None:
            return ToolResult.error(f"unknown tool {name!r}; available tools: {', '.join(self._tools) or '(none)'}")
        return await tool.invoke(arguments, ctx)
