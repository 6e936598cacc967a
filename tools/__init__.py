r"""The tool SDK (`@tool`, `Tool`, `Toolset`, `ToolResult`), the built-in tools and the MCP client (`tools.mcp`).

    from tools import Toolset, ToolContext, builtin_tools, tool
    from tools.mcp import MCPServer

    @tool(timeout_s=30, parallel_safe=True)
    async def glossary(term: str, ctx: ToolContext) -> str:
        '''Look a term up in the project glossary.

        Args:
            term: the word to look up.
        '''
        text = (await ctx.sandbox.read_file("GLOSSARY.md")).decode()
        return "\n".join(line for line in text.splitlines() if term.lower() in line.lower())

    async with MCPServer.stdio("mcp-server-time", ["--local-timezone", "UTC"], name="time") as clock:
        toolset = Toolset([*builtin_tools(), glossary, *clock.as_tools()])
        result = await toolset.invoke("time__get_current_time", {"timezone": "Asia/Tokyo"}, ToolContext(sandbox=sb))
"""
from tools.builtin import builtin_tools
from tools.context import ToolContext
from tools.result import DEFAULT_OUTPUT_CAP_BYTES, ToolResult, cap_output
from tools.tool import Tool, tool
from tools.toolset import Toolset

__all__ = [
    "DEFAULT_OUTPUT_CAP_BYTES",
    "Tool",
    "ToolContext",
    "ToolResult",
    "Toolset",
    "builtin_tools",
    "cap_output",
    "tool",
]
