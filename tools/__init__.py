"""The tool SDK (`@tool`, `Tool`, `Toolset`, `ToolResult`), the built-in tools and the MCP client (`tools.mcp`)."""
from tools.builtin import builtin_tools
from tools.context import ToolContext
from tools.result import DEFAULT_OUTPUT_CAP_BYTES, ToolResult, cap_output
from tools.tool import Tool, function_tool, tool
from tools.toolset import Toolset

__all__ = [
    "DEFAULT_OUTPUT_CAP_BYTES",
    "Tool",
    "ToolContext",
    "ToolResult",
    "Toolset",
    "builtin_tools",
    "cap_output",
    "function_tool",
    "tool",
]
