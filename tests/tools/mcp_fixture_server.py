"""A small MCP server the tools tests run as a real process, over stdio or streamable HTTP.

It is a low-level `mcp.server.Server` so the tests control what the SDK's high-level server hides:
paginated tool listings, JSON-RPC errors, slow calls, a crash, a death by signal, a grandchild process, and
replies of any text (a file's).

    python tests/tools/mcp_fixture_server.py stdio [--page-size N] [--tools N] [--start-once MARKER]
    python tests/tools/mcp_fixture_server.py http --port PORT
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

import anyio
import mcp_types as types
from mcp.server import Server
from mcp.shared.exceptions import MCPError

# name -> (description, input schema properties, required)
FIXED_TOOLS: dict[str, tuple[str, dict, list[str]]] = {
    "echo": ("Return the text unchanged.", {"text": {"type": "string"}}, ["text"]),
    "read_text": ("Return the text of a file.", {"path": {"type": "string"}}, ["path"]),
    "add": ("Add two integers.", {"a": {"type": "integer"}, "b": {"type": "integer"}}, ["a", "b"]),
    "sleep": ("Sleep for some seconds, then answer.", {"seconds": {"type": "number"}}, ["seconds"]),
    "reject": ("Answer with a JSON-RPC error (invalid params).", {}, []),
    "explode": ("Raise an exception inside the handler.", {}, []),
    "soft_fail": ("Return a result flagged isError.", {}, []),
    "crash": ("Exit the server process at once.", {}, []),
    "kill_self": ("End the server process with SIGKILL, as the OOM killer would.", {}, []),
    "spawn_child": ("Start a long-lived grandchild process; answer its pid.", {}, []),
    "pid": ("Answer the server's process id.", {}, []),
}


def _tool_list(extra: int) -> list[types.Tool]:
    tools = [
        types.Tool(
            name=name,
            description=desc,
            input_schema={"type": "object", "properties": props, "required": req},
            annotations=types.ToolAnnotations(read_only_hint=name in ("echo", "add", "pid")),
        )
        for name, (desc, props, req) in FIXED_TOOLS.items()
    ]
    tools += [
        types.Tool(name=f"extra_{i:02d}", description=f"Filler tool {i}.", input_schema={"type": "object"})
        for i in range(extra)
    ]
    return tools


def _text(text: str, is_error: bool = False) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=is_error)


def build_server(page_size: int, extra_tools: int) -> Server:
    tools = _tool_list(extra_tools)

    async def list_tools(ctx, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        start = int(params.cursor) if params is not None and params.cursor else 0
        end = start + page_size
        return types.ListToolsResult(tools=tools[start:end], next_cursor=str(end) if end < len(tools) else None)

    async def call_tool(ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
        args = params.arguments or {}
        name = params.name
        if name == "echo":
            return _text(args["text"])
        if name == "read_text":
            with open(args["path"], encoding="utf-8") as file:
                return _text(file.read())
        if name == "add":
            return _text(str(args["a"] + args["b"]))
        if name == "sleep":
            await anyio.sleep(float(args["seconds"]))
            return _text(f"slept {args['seconds']}")
        if name == "reject":
            raise MCPError(code=types.INVALID_PARAMS, message="reject always refuses: no valid input exists")
        if name == "explode":
            raise RuntimeError("the explode tool blew up")
        if name == "soft_fail":
            return _text("soft failure reported by the tool", is_error=True)
        if name == "crash":
            os._exit(3)
        if name == "kill_self":
            os.kill(os.getpid(), signal.SIGKILL)
        if name == "spawn_child":
            child = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            return _text(str(child.pid))
        if name == "pid":
            return _text(str(os.getpid()))
        if name.startswith("extra_"):
            return _text(name)
        raise MCPError(code=types.METHOD_NOT_FOUND, message=f"unknown tool {name!r}")

    return Server("fixture", version="1.0", on_list_tools=list_tools, on_call_tool=call_tool)


async def _serve_stdio(server: Server) -> None:
    from mcp.server.stdio import stdio_server

    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=["stdio", "http"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument("--tools", type=int, default=0, help="filler tools beyond the fixed ones")
    parser.add_argument("--start-once", metavar="MARKER", help="exit with code 4 if MARKER exists, else create it")
    opts = parser.parse_args()
    if opts.start_once:
        if os.path.exists(opts.start_once):
            print("refusing to start twice", file=sys.stderr)
            sys.exit(4)
        open(opts.start_once, "w").close()
    server = build_server(opts.page_size, opts.tools)
    if opts.transport == "stdio":
        anyio.run(_serve_stdio, server)
    else:
        import uvicorn

        app = server.streamable_http_app()
        uvicorn.run(app, host="127.0.0.1", port=opts.port, log_level="warning")
    sys.exit(0)


if __name__ == "__main__":
    main()
