"""Tool-layer overheads: `Tool.invoke` against a direct call, and an MCP tool call through
`tools.mcp.MCPServer` against a bare `mcp` SDK `Client` call to the same server, in the same run.

    PYTHONPATH=. python bench/bench_tools.py [--calls 2000] [--mcp-calls 600] [--rounds 6] [--out bench/bench_tools.json]

MCP servers are the fixture server of tests/tools (a low-level `mcp.server.Server`), over stdio and
streamable HTTP on 127.0.0.1. Figures are per call: p50 and p95 in microseconds, pooled over rounds
that alternate between the compared variants.
"""
from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path

import anyio
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters

from tools import tool
from tools.mcp import MCPServer
from tools.mcp.stdio import StdioTransport

FIXTURE = str(Path(__file__).resolve().parents[1] / "tests" / "tools" / "mcp_fixture_server.py")


async def sample(call: Callable[[], Awaitable[object]], n: int) -> list[float]:
    """n timed calls, in microseconds."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        out.append((time.perf_counter() - start) * 1e6)
    return out


async def compare(variants: dict[str, Callable[[], Awaitable[object]]], n: int, rounds: int) -> dict[str, object]:
    """Time each variant in alternating rounds, so the load of a shared machine falls on all alike."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for call in variants.values():  # warm-up
        await sample(call, 20)
    for _ in range(rounds):
        for name, call in variants.items():
            samples[name] += await sample(call, n // rounds)
    stats = {}
    for name, values in samples.items():
        values.sort()
        stats[name] = {"p50_us": round(statistics.median(values), 1), "p95_us": round(values[int(0.95 * (len(values) - 1))], 1), "n": len(values)}
    return stats


async def bench_invoke(n: int, rounds: int) -> dict[str, object]:
    async def add_async(a: int, b: int) -> int:
        return a + b

    def add_sync(a: int, b: int) -> int:
        return a + b

    async_tool, sync_tool = tool(add_async), tool(add_sync)
    args = {"a": 2, "b": 3}
    stats = await compare(
        {
            "direct_async_call": lambda: add_async(2, 3),
            "invoke_async_tool": lambda: async_tool.invoke(args),
            "direct_thread_call": lambda: anyio.to_thread.run_sync(add_sync, 2, 3),
            "invoke_sync_tool": lambda: sync_tool.invoke(args),
        },
        n,
        rounds,
    )
    stats["invoke_async_overhead_us"] = round(stats["invoke_async_tool"]["p50_us"] - stats["direct_async_call"]["p50_us"], 1)
    stats["invoke_sync_overhead_us"] = round(stats["invoke_sync_tool"]["p50_us"] - stats["direct_thread_call"]["p50_us"], 1)
    return stats


def with_ratio(stats: dict[str, object]) -> dict[str, object]:
    stats["ratio_p50_mcpserver_vs_sdk"] = round(stats["mcpserver_call_tool"]["p50_us"] / stats["bare_sdk_client"]["p50_us"], 3)
    return stats


async def bench_mcp_stdio(n: int, rounds: int) -> dict[str, object]:
    args = [FIXTURE, "stdio"]
    ping = {"text": "ping"}
    # the middle variant splits our overhead: transport (process-group owner) vs owner-task hop
    async with Client(StdioServerParameters(command=sys.executable, args=args), cache=None) as bare, Client(
        StdioTransport(sys.executable, args), cache=None
    ) as ours_transport:
        async with MCPServer.stdio(sys.executable, args, name="fx") as server:
            echo_tool = next(t for t in server.as_tools() if t.name == "fx__echo")
            stats = await compare(
                {
                    "bare_sdk_client": lambda: bare.call_tool("echo", ping),
                    "sdk_client_over_our_stdio_transport": lambda: ours_transport.call_tool("echo", ping),
                    "mcpserver_call_tool": lambda: server.call_tool("echo", ping),
                    "tool_invoke": lambda: echo_tool.invoke(ping),
                },
                n,
                rounds,
            )
    return with_ratio(stats)


async def bench_mcp_http(n: int, rounds: int) -> dict[str, object]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, FIXTURE, "http", "--port", str(port)])
    ping = {"text": "ping"}
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                await anyio.sleep(0.05)
        url = f"http://127.0.0.1:{port}/mcp"
        async with Client(url, cache=None) as bare, MCPServer.http(url) as server:
            stats = await compare(
                {"bare_sdk_client": lambda: bare.call_tool("echo", ping), "mcpserver_call_tool": lambda: server.call_tool("echo", ping)},
                n,
                rounds,
            )
    finally:
        proc.kill()
        proc.wait()
    return with_ratio(stats)


async def bench_lifecycle(rounds: int) -> dict[str, object]:
    """Connect (spawn + handshake + full tool listing) and close (stdin EOF, group kill) of a stdio server."""
    connect, close = [], []
    for _ in range(rounds):
        server = MCPServer.stdio(sys.executable, [FIXTURE, "stdio"], name="fx")
        start = time.perf_counter()
        await server.__aenter__()
        mid = time.perf_counter()
        await server.__aexit__(None, None, None)
        connect.append(mid - start)
        close.append(time.perf_counter() - mid)
    return {"connect_p50_s": statistics.median(connect), "close_p50_s": statistics.median(close), "n": rounds}


async def main(opts: argparse.Namespace) -> dict[str, object]:
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''} python {platform.python_version()}",
        "command": "PYTHONPATH=. python bench/bench_tools.py " + " ".join(sys.argv[1:]),
        "invoke": await bench_invoke(opts.calls, opts.rounds),
        "mcp_stdio": await bench_mcp_stdio(opts.mcp_calls, opts.rounds),
        "mcp_http": await bench_mcp_http(opts.mcp_calls, opts.rounds),
        "stdio_lifecycle": await bench_lifecycle(5),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--mcp-calls", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=6, help="alternations between the compared variants")
    parser.add_argument("--out", default=str(Path(__file__).with_name("bench_tools.json")))
    options = parser.parse_args()
    report = anyio.run(main, options)
    Path(options.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
