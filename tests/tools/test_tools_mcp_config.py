"""MCP server configuration: Claude-Desktop-style files (JSON, YAML) and --mcp flags."""
from __future__ import annotations

import json
import sys

import anyio
import pytest

from tools.mcp import MCPServer, load_mcp_config, parse_mcp_flag
from tools.mcp.config import MCPConfigError


def test_json_config_with_variable_expansion(tmp_path):
    path = tmp_path / "mcp.json"
    path.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "time": {
                        "command": "${PY}",
                        "args": ["-m", "mcp_server_time", "--local-timezone", "${TZ_NAME:-UTC}"],
                        "env": {"API_KEY": "${SECRET}"},
                        "timeout": 5,
                    },
                    "remote": {"url": "https://${HOST}/mcp", "headers": {"Authorization": "Bearer ${SECRET}"},
                               "start_timeout": 90},
                }
            }
        )
    )
    env = {"PY": "/usr/bin/python3", "SECRET": "s3", "HOST": "tools.example"}
    time_server, remote = load_mcp_config(path, environ=env)
    assert (time_server.name, time_server.command) == ("time", "/usr/bin/python3")
    assert time_server.args == ["-m", "mcp_server_time", "--local-timezone", "UTC"]
    assert time_server.env == {"API_KEY": "s3"} and time_server.timeout_s == 5 == time_server.start_timeout_s
    assert (remote.timeout_s, remote.start_timeout_s) == (60, 90)
    assert (remote.name, remote.url) == ("remote", "https://tools.example/mcp")
    assert remote.headers == {"Authorization": "Bearer s3"} and remote.command is None


def test_yaml_config(tmp_path):
    path = tmp_path / "mcp.yaml"
    path.write_text("mcpServers:\n  fs:\n    command: npx\n    args: [-y, server-filesystem, /data]\n")
    (server,) = load_mcp_config(path, environ={})
    assert (server.name, server.command, server.args) == ("fs", "npx", ["-y", "server-filesystem", "/data"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"servers": {}}', "top-level 'mcpServers'"),
        ('{"mcpServers": {"a": {"command": "x", "env": {"K": "${UNSET_VAR_42}"}}}}', "'UNSET_VAR_42' is not set"),
        ('{"mcpServers": {"a": {"args": ["x"]}}}', "needs 'command' (stdio) or 'url'"),
        ('{"mcpServers": {"a": {"command": "x", "argz": []}}}', "unknown key(s) ['argz']"),
        ('{"mcpServers": {"a": {"command": "x", "args": "one"}}}', "'args' must be a list of strings"),
        ('{"mcpServers": {"a b": {"command": "x"}}}', "server 'a b'"),
        ('{"mcpServers": {"a": {"url": "http://h/mcp", "type": "sse"}}}', "transport 'sse' is not supported"),
        ('{"mcpServers": {"a": {"command": "x", "timeout": -1}}}', "'timeout' must be a positive number"),
        ('{"mcpServers": {"a": {"command": "x", "start_timeout": true}}}', "'start_timeout' must be a positive"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "mcp.json"
    path.write_text(text)
    with pytest.raises(MCPConfigError) as info:
        load_mcp_config(path, environ={})
    assert message in str(info.value) and str(path) in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(MCPConfigError, match="cannot read MCP config"):
        load_mcp_config(tmp_path / "absent.json")


def test_mcp_flag():
    server = parse_mcp_flag("time=mcp-server-time --local-timezone 'Europe/Paris'")
    assert (server.name, server.command, server.args) == ("time", "mcp-server-time", ["--local-timezone", "Europe/Paris"])
    web = parse_mcp_flag("web=http://127.0.0.1:9000/mcp")
    assert (web.name, web.url) == ("web", "http://127.0.0.1:9000/mcp")
    for bad in ("no-equals-sign", "=cmd", "name=", "name=cmd 'unclosed"):
        with pytest.raises(MCPConfigError, match="--mcp"):
            parse_mcp_flag(bad)


def test_server_constructor_checks():
    with pytest.raises(ValueError, match="exactly one"):
        MCPServer("x")
    with pytest.raises(ValueError, match="timeout_s"):
        MCPServer.stdio("cmd", timeout_s=0)
    assert MCPServer.stdio("/usr/local/bin/mcp-server-time").name == "mcp-server-time"


def test_flag_server_connects():
    async def main():
        async with parse_mcp_flag(f"clock={sys.executable} -m mcp_server_time --local-timezone UTC") as server:
            return [t.name for t in server.as_tools()]

    assert anyio.run(main) == ["clock__convert_time", "clock__get_current_time"]
