"""`MCPServer`: one MCP server (stdio or streamable HTTP), owned by one task, its tools as `Tool`s.

Every request goes through the server's owner task, which alone opens and closes the connection:
the cure for anyio's "exit cancel scope in a different task" teardown bug of MCP clients
(agent-anchors §0.14). Everything the model can cause (a JSON-RPC error, a timeout, a crash) comes
back as an error `ToolResult`. A server whose connection drops is restarted once; a second loss
marks it down and its tools answer with that error.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import httpx2
import mcp_types
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tools.context import ToolContext
from tools.mcp.stdio import StdioTransport
from tools.result import ToolResult
from tools.tool import Tool, strip_titles

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
MAX_RESTARTS = 1
# A paginating server that never stops cannot hang the client: stop listing after this many pages.
MAX_LIST_PAGES = 1000
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")


class MCPServerDown(Exception):
    """The server is unreachable for good (failed to start, or lost more than MAX_RESTARTS times)."""


class MCPConnectionLost(Exception):
    """The connection ended while a request was in flight."""


class MCPHandshakeTimeout(Exception):
    """The server did not finish the handshake (initialize, tools/list) within its `timeout_s`."""


@dataclass
class _Request:
    """One operation on the connected client, run by the owner task on the caller's behalf."""

    operation: Callable[[Client], Awaitable[Any]]
    done: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    value: Any = None
    error: BaseException | None = None


class MCPServer:
    """An MCP server connection. Build with `MCPServer.stdio(...)` or `MCPServer.http(...)`, then
    `async with server:` connects (and lists the tools once), and leaving it closes the connection
    and, for stdio, kills the server's whole process group."""

    def __init__(
        self,
        name: str,
        *,
        command: str | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        url: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        start_timeout_s: float | None = None,
    ) -> None:
        if (command is None) == (url is None):
            raise ValueError(f"MCP server {name!r}: give exactly one of a command (stdio) or a url (HTTP)")
        if not name or _UNSAFE_NAME_CHARS.search(name):
            raise ValueError(f"MCP server name {name!r} must be letters, digits, '_' or '-' (it prefixes tool names)")
        for what, value in (("timeout_s", timeout_s), ("start_timeout_s", start_timeout_s)):
            if value is not None and value <= 0:
                raise ValueError(f"MCP server {name!r}: {what} must be positive, got {value}")
        self.name = name
        self.command, self.args, self.env, self.cwd = command, list(args), dict(env or {}), cwd
        self.url, self.headers = url, dict(headers or {})
        self.timeout_s = timeout_s
        """Bound on each request (a tool call, a listing)."""
        self.start_timeout_s = start_timeout_s if start_timeout_s is not None else timeout_s
        """Bound on each (re)connection: the process start and the whole handshake (initialize, tools/list)."""
        self.tools: list[mcp_types.Tool] = []
        """The server's tools as listed at connect time (refreshed only by `list_tools()`)."""
        self.restarts = 0
        self.crash_reports: list[str] = []
        """One line per lost connection: what happened, for the run's log and trajectory."""
        self._transport: StdioTransport | None = None
        self._requests: anyio.abc.ObjectSendStream[_Request] | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._down: str | None = None

    @classmethod
    def stdio(
        cls,
        command: str,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        *,
        name: str | None = None,
        cwd: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        start_timeout_s: float | None = None,
    ) -> MCPServer:
        """A server run as a child process speaking MCP on its stdin/stdout."""
        default_name = _UNSAFE_NAME_CHARS.sub("_", command.rsplit("/", 1)[-1]) or "mcp"
        return cls(name or default_name, command=command, args=args, env=env, cwd=cwd, timeout_s=timeout_s,
                   start_timeout_s=start_timeout_s)

    @classmethod
    def http(
        cls,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        name: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        start_timeout_s: float | None = None,
    ) -> MCPServer:
        """A server reached over streamable HTTP at `url` (e.g. http://127.0.0.1:8000/mcp)."""
        host = httpx2.URL(url).host or "mcp"
        return cls(name or _UNSAFE_NAME_CHARS.sub("_", host), url=url, headers=headers, timeout_s=timeout_s,
                   start_timeout_s=start_timeout_s)

    def __repr__(self) -> str:
        where = f"stdio {self.command} {' '.join(self.args)}".rstrip() if self.command else f"http {self.url}"
        return f"MCPServer({self.name!r}, {where})"

    @property
    def pid(self) -> int | None:
        """The stdio server's process id (the current one, after a restart); None for HTTP."""
        return self._transport.pid if self._transport is not None else None

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> MCPServer:
        if self._task_group is not None:
            raise RuntimeError(f"{self!r} is already connected")
        self._down, self.restarts, self.crash_reports = None, 0, []
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        try:
            await task_group.start(self._own)
        except BaseException as exc:
            await task_group.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        if self._down is not None:  # the owner could not connect and has returned
            await task_group.__aexit__(None, None, None)
            raise MCPServerDown(self._down)
        self._task_group = task_group
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        task_group, self._task_group = self._task_group, None
        assert task_group is not None and self._requests is not None
        self._requests.close()  # the owner stops serving and closes the connection
        return await task_group.__aexit__(*exc_info)

    async def _own(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """The owner task: connect, serve requests, reconnect once after a loss, close.

        The reconnect waits for the next request: an HTTP server restarted by its operator in the
        meantime is found again, and an idle stdio server costs nothing until it is needed.
        """
        self._requests, requests = anyio.create_memory_object_stream[_Request](math.inf)
        started = False
        waiting: _Request | None = None  # the request that triggers a reconnect, served first
        async with requests:
            while True:
                failure: Exception | None = None
                shaking_hands = True
                try:
                    # One bound on the whole handshake, whatever the SDK's own per-request timeouts add up to.
                    with anyio.fail_after(self.start_timeout_s) as handshake:
                        async with self._connect() as client:
                            listing = await _list_all_tools(client)
                            handshake.deadline, shaking_hands = math.inf, False
                            if not started:
                                self.tools = listing
                                task_status.started()
                                started = True
                            if not await self._serve(client, requests, waiting):
                                return  # asked to stop
                except Exception as exc:
                    if shaking_hands and isinstance(exc, TimeoutError):
                        exc = MCPHandshakeTimeout(
                            f"no answer to the MCP handshake (initialize, tools/list) within {self.start_timeout_s:g} s"
                        )
                    if not started:
                        self._down = f"failed to start: {self._describe_loss(exc)}"
                        task_status.started()
                        return
                    failure = exc
                loss = self._describe_loss(failure)
                self.crash_reports.append(loss)
                if self.restarts >= MAX_RESTARTS:
                    self._down = f"{loss}; it was restarted {self.restarts} time(s) already and is now down"
                    logger.error("%s", self._down)
                    if waiting is not None and not waiting.done.is_set():  # the reconnect it asked for failed
                        waiting.error = MCPServerDown(self._down)
                        waiting.done.set()
                    break
                self.restarts += 1
                logger.warning("%s; it will be restarted (%d of %d) for the next call", loss, self.restarts, MAX_RESTARTS)
                if waiting is None or waiting.done.is_set():
                    try:
                        waiting = await requests.receive()
                    except anyio.EndOfStream:
                        return
            # Down: answer whatever still arrives until the context closes.
            async for request in requests:
                request.error = MCPServerDown(self._down)
                request.done.set()

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[Client]:
        async with AsyncExitStack() as stack:
            if self.command is not None:
                self._transport = StdioTransport(self.command, self.args, self.env, self.cwd)
                transport: Any = self._transport
            else:
                # 300 s read: a streamable-HTTP response may be a long-lived event stream
                http = httpx2.AsyncClient(headers=self.headers, timeout=httpx2.Timeout(30, read=300))
                await stack.enter_async_context(http)
                transport = streamable_http_client(self.url, http_client=http)
            # cache=None: a listing is fetched when asked for, never served stale
            client = Client(transport, read_timeout_seconds=self.timeout_s, cache=None)
            yield await stack.enter_async_context(client)

    async def _serve(
        self, client: Client, requests: anyio.abc.ObjectReceiveStream[_Request], first: _Request | None
    ) -> bool:
        """Run requests concurrently until told to stop (False) or the connection is lost (True)."""
        lost = False
        async with anyio.create_task_group() as tg:
            if first is not None:
                tg.start_soon(self._run_request, client, first)
            if self._transport is not None:

                async def watch_process() -> None:
                    nonlocal lost
                    await self._transport.disconnected.wait()
                    lost = True
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_process)
            async for request in requests:
                tg.start_soon(self._run_request, client, request)
            tg.cancel_scope.cancel()  # stopping: abandon what is still running
        return lost

    async def _run_request(self, client: Client, request: _Request) -> None:
        completed = False
        try:
            with request.scope:
                request.value = await request.operation(client)
                completed = True
        except MCPError as exc:
            request.error = MCPConnectionLost(self._lost_message()) if exc.code == mcp_types.CONNECTION_CLOSED else exc
        except Exception as exc:
            request.error = exc
        finally:
            if not completed and request.error is None:  # cancelled by a lost connection or by the caller
                request.error = MCPConnectionLost(self._lost_message())
            request.done.set()

    async def _request(self, operation: Callable[[Client], Awaitable[Any]]) -> Any:
        if self._down is not None:
            raise MCPServerDown(self._down)
        if self._requests is None or self._task_group is None:
            raise RuntimeError(f"{self!r} is not connected: use `async with server:` first")
        request = _Request(operation)
        try:
            self._requests.send_nowait(request)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise MCPServerDown(self._down or f"MCP server {self.name!r} is closed") from None
        try:
            await request.done.wait()
        finally:
            request.scope.cancel()  # a cancelled caller cancels its request on the server too
        if request.error is not None:
            raise request.error
        return request.value

    def _describe_loss(self, exc: BaseException | None) -> str:
        """What ended the connection: the exit code and stderr of a stdio server, and the error seen."""
        parts = []
        transport = self._transport
        if transport is not None and transport.returncode is not None:
            parts.append(transport.describe_exit())
            tail = " | ".join(line for line in transport.stderr_tail if line.strip())[-500:]
            if tail:
                parts.append(f"(stderr: {tail})")
        else:
            parts.append("lost its connection")
        if exc is not None:
            parts.append(f"[{_describe(exc)}]")
        hint = transport.stray_output_hint() if transport is not None else ""
        return f"MCP server {self.name!r} " + " ".join(parts) + (f"; {hint}" if hint else "")

    def _lost_message(self) -> str:
        """For a request cut off by a lost connection. Called before the owner counts the restart,
        since the owner waits for every in-flight request before reconnecting."""
        if self.restarts < MAX_RESTARTS:
            next_step = "it is being restarted; the call was not retried, so call again if it is still needed"
        else:
            next_step = "it will not be restarted again, so its tools are unavailable for the rest of the run"
        return f"{self._describe_loss(None)} during the call; {next_step}"

    # -- requests --------------------------------------------------------------------------------

    async def list_tools(self) -> list[mcp_types.Tool]:
        """All of the server's tools, every page; also refreshes `self.tools`."""
        self.tools = await self._request(_list_all_tools)
        return self.tools

    async def call_tool(
        self, name: str, arguments: Mapping[str, Any] | None = None, timeout_s: float | None = None
    ) -> ToolResult:
        """Call a tool on the server. Never raises for server-side trouble: that is an error result."""
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        meta = {"mcp_server": self.name, "mcp_tool": name}
        try:
            result: mcp_types.CallToolResult = await self._request(
                lambda client: client.call_tool(name, dict(arguments or {}), read_timeout_seconds=timeout)
            )
        except MCPError as exc:
            if exc.code == mcp_types.REQUEST_TIMEOUT:
                return ToolResult.error(
                    f"tool {name!r} on MCP server {self.name!r} timed out after {timeout:g} s; "
                    "retry with a smaller request or take another approach",
                    timed_out=True,
                    **meta,
                )
            return ToolResult.error(
                f"MCP server {self.name!r} rejected the call to {name!r} (JSON-RPC error {exc.code}): {exc.message}",
                mcp_error_code=exc.code,
                **meta,
            )
        except MCPConnectionLost as exc:
            return ToolResult.error(str(exc), server_lost=True, **meta)
        except MCPServerDown as exc:
            return ToolResult.error(str(exc), server_down=True, **meta)
        except Exception as exc:  # e.g. a result that fails the protocol's validation
            return ToolResult.error(f"calling {name!r} on MCP server {self.name!r} failed: {_describe(exc)}", **meta)
        return _to_tool_result(result, meta)

    def as_tools(self) -> list[Tool]:
        """The listed tools as `Tool`s named `<server>__<tool>` (see `local_tool_names`), sorted by name
        so the prompt's tool block does not change with the server's listing order."""
        names = local_tool_names(self.name, [t.name for t in self.tools])
        return [self._as_tool(t, names[t.name]) for t in sorted(self.tools, key=lambda t: t.name)]

    def _as_tool(self, remote: mcp_types.Tool, name: str) -> Tool:
        schema = strip_titles(dict(remote.input_schema or {}))
        schema.setdefault("type", "object")
        remote_name = remote.name

        async def handler(arguments: dict[str, Any], ctx: ToolContext | None) -> ToolResult:
            return await self.call_tool(remote_name, arguments)

        read_only = bool(remote.annotations is not None and remote.annotations.read_only_hint)
        return Tool(
            name,
            remote.description or remote.title or "",
            schema,
            handler,
            # the request's own timeout answers first; this only guards a reconnect that hangs
            timeout_s=self.timeout_s * 2 + 5,
            parallel_safe=read_only,
        )


def local_tool_names(server: str, remote_names: Sequence[str]) -> dict[str, str]:
    """remote tool name -> `<server>__<tool>`, cut to what a tool name may hold (letters, digits, _ and -,
    64 characters). Names that would come out the same get a short hash of their remote name (a name
    that needed no cleaning keeps its own), so each tool gets a distinct name that depends on nothing
    but the names themselves, never on the listing order."""

    def digest(text: str) -> str:
        return hashlib.sha1(text.encode()).hexdigest()[:8]

    def fit(name: str) -> str:
        return name if len(name) <= 64 else f"{name[:55]}_{digest(name)}"

    cleaned = {remote: f"{server}__{_UNSAFE_NAME_CHARS.sub('_', remote)}" for remote in remote_names}
    uses = Counter(fit(name) for name in cleaned.values())
    names = {}
    for remote, name in cleaned.items():
        if uses[fit(name)] > 1 and _UNSAFE_NAME_CHARS.search(remote):
            name = f"{name}_{digest(remote)}"
        names[remote] = fit(name)
    return names


async def _list_all_tools(client: Client) -> list[mcp_types.Tool]:
    tools: list[mcp_types.Tool] = []
    cursor: str | None = None
    seen: set[str] = set()
    for _ in range(MAX_LIST_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if cursor is None:
            return tools
        if cursor in seen:
            raise MCPError(mcp_types.INTERNAL_ERROR, f"tools/list repeated the cursor {cursor!r}")
        seen.add(cursor)
    raise MCPError(mcp_types.INTERNAL_ERROR, f"tools/list did not end after {MAX_LIST_PAGES} pages")


def _to_tool_result(result: mcp_types.CallToolResult, meta: dict[str, Any]) -> ToolResult:
    """MCP content blocks as text for the model; binary payloads are described, not inlined."""
    parts = []
    for block in result.content:
        if isinstance(block, mcp_types.TextContent):
            parts.append(block.text)
        elif isinstance(block, (mcp_types.ImageContent, mcp_types.AudioContent)):
            parts.append(f"[{block.type} {block.mime_type}, {len(block.data) * 3 // 4} bytes]")
        elif isinstance(block, mcp_types.EmbeddedResource):
            resource = block.resource
            text = getattr(resource, "text", None)
            parts.append(text if text is not None else f"[resource {resource.uri} ({resource.mime_type})]")
        elif isinstance(block, mcp_types.ResourceLink):
            parts.append(f"[resource link {block.uri}]")
        else:
            parts.append(f"[{getattr(block, 'type', type(block).__name__)} content]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    metadata = dict(meta)
    if result.structured_content is not None:
        metadata["structured_content"] = result.structured_content
    return ToolResult(content="\n".join(parts), is_error=bool(result.is_error), metadata=metadata)


def _describe(exc: BaseException) -> str:
    """An exception, or the leaves of an exception group, as one line."""
    inner = getattr(exc, "exceptions", None)  # an exception group (no builtin name on Python 3.10)
    if isinstance(inner, (list, tuple)):
        return "; ".join(_describe(e) for e in inner)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
