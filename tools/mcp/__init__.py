"""The MCP client: servers over stdio or streamable HTTP, their tools as `tools.Tool`s, and config loading."""
from tools.mcp.config import load_mcp_config, parse_mcp_flag
from tools.mcp.server import MCPConnectionLost, MCPServer, MCPServerDown

__all__ = ["MCPConnectionLost", "MCPServer", "MCPServerDown", "load_mcp_config", "parse_mcp_flag"]
