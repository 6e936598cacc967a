"""MCP servers from a config file (Claude Desktop's `mcpServers` shape) or from a CLI flag.

    {"mcpServers": {
        "time":  {"command": "mcp-server-time", "args": ["--local-timezone", "UTC"], "env": {"K": "${K}"}},
        "tools": {"url": "https://host/mcp", "headers": {"Authorization": "Bearer ${TOKEN}"}}}}

JSON or YAML. `${VAR}` and `${VAR:-default}` are expanded from the environment in every string;
a variable that is unset and has no default is an error naming it and the server.
"""
from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tools.mcp.server import DEFAULT_TIMEOUT_S, MCPServer

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_STDIO_KEYS = {"command", "args", "env", "cwd", "type", "timeout", "start_timeout"}
_HTTP_KEYS = {"url", "headers", "type", "timeout", "start_timeout"}


class MCPConfigError(ValueError):
    """A config file or flag that cannot describe an MCP server; the message says where and why."""


def load_mcp_config(path: str | Path, environ: Mapping[str, str] | None = None) -> list[MCPServer]:
    """The servers of a config file, in file order (not connected yet)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise MCPConfigError(f"cannot read MCP config {path}: {exc}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise MCPConfigError(f"MCP config {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}")
    if not isinstance(data, dict) or not isinstance(data.get("mcpServers"), dict):
        raise MCPConfigError(f"MCP config {path} needs a top-level 'mcpServers' mapping of name -> server")
    env = os.environ if environ is None else environ
    return [_server(name, spec, env, f"{path}: server {name!r}") for name, spec in data["mcpServers"].items()]


def parse_mcp_flag(flag: str) -> MCPServer:
    """`NAME=COMMAND ARGS...` (stdio) or `NAME=http(s)://URL` (streamable HTTP), as given to `--mcp`."""
    name, sep, target = flag.partition("=")
    name, target = name.strip(), target.strip()
    if not sep or not name or not target:
        raise MCPConfigError(f"--mcp {flag!r}: expected NAME=COMMAND [ARGS...] or NAME=URL")
    if target.startswith(("http://", "https://")):
        return _server(name, {"url": target}, os.environ, f"--mcp {flag!r}")
    try:
        command, *args = shlex.split(target)
    except ValueError as exc:
        raise MCPConfigError(f"--mcp {flag!r}: cannot split the command line: {exc}") from exc
    return _server(name, {"command": command, "args": args}, os.environ, f"--mcp {flag!r}")


def _server(name: str, spec: Any, env: Mapping[str, str], where: str) -> MCPServer:
    if not isinstance(spec, dict):
        raise MCPConfigError(f"{where}: expected a mapping with 'command' or 'url', got {type(spec).__name__}")
    spec = _expand(spec, env, where)
    kind = spec.get("type")
    timeout = spec.get("timeout", DEFAULT_TIMEOUT_S)
    start_timeout = spec.get("start_timeout", timeout)
    for key, value in (("timeout", timeout), ("start_timeout", start_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise MCPConfigError(f"{where}: {key!r} must be a positive number of seconds, got {value!r}")
    try:
        if "url" in spec:
            _check_keys(spec, _HTTP_KEYS, where)
            if kind not in (None, "http", "streamable-http", "streamable_http"):
                raise MCPConfigError(f"{where}: transport {kind!r} is not supported (use streamable HTTP)")
            headers = spec.get("headers") or {}
            _check_str_map(headers, "headers", where)
            return MCPServer.http(spec["url"], headers=headers, name=name, timeout_s=float(timeout),
                                  start_timeout_s=float(start_timeout))
        if "command" in spec:
            _check_keys(spec, _STDIO_KEYS, where)
            args, server_env = spec.get("args") or [], spec.get("env") or {}
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                raise MCPConfigError(f"{where}: 'args' must be a list of strings")
            _check_str_map(server_env, "env", where)
            return MCPServer.stdio(spec["command"], args, server_env, name=name, cwd=spec.get("cwd"),
                                   timeout_s=float(timeout), start_timeout_s=float(start_timeout))
    except ValueError as exc:
        if isinstance(exc, MCPConfigError):
            raise
        raise MCPConfigError(f"{where}: {exc}") from exc
    raise MCPConfigError(f"{where}: needs 'command' (stdio) or 'url' (streamable HTTP)")


def _expand(value: Any, env: Mapping[str, str], where: str) -> Any:
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise MCPConfigError(f"{where}: environment variable {name!r} is not set (write ${{{name}:-default}} for a default)")

        return _VAR.sub(substitute, value)
    if isinstance(value, list):
        return [_expand(v, env, where) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, env, where) for k, v in value.items()}
    return value


def _check_keys(spec: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise MCPConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _check_str_map(value: Any, what: str, where: str) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise MCPConfigError(f"{where}: {what!r} must map strings to strings")
