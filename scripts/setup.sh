#!/usr/bin/env bash
# Idempotent set-up for a fresh machine of our kind (Debian, root, 2 cores, no GPU).
#   .venv with the CPU torch wheel, the package in editable mode with its test extras,
#   a running Docker engine, the offline-built sandbox base image, and the MCP Inspector
#   (npm, into .tools/: a third-party MCP client the `dsv4-agent mcp` tests drive it with).
# Every step checks before it acts, so running it twice costs seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- Python environment ---------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
PY=.venv/bin/python
pip_install() {
    # This machine's pip.conf names local find-links folders that may be absent; drop that noise.
    $PY -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
if ! $PY -c 'import torch' 2>/dev/null; then
    # The pinned CPU wheel lies on this machine's disk; an unpinned torch would pull a CUDA build.
    pip_install --upgrade pip
    pip_install torch==2.13.0
fi
stamp=.venv/.dsv4-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    pip_install -e ".[test]"
    touch "$stamp"
fi

# --- Docker engine (sandboxes) ----------------------------------------------------------
if [ "${DSV4_SKIP_DOCKER:-0}" != "1" ]; then
    if ! command -v dockerd >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
    fi
    if ! docker info >/dev/null 2>&1; then
        (setsid dockerd >/tmp/dockerd.log 2>&1 &)
        for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    fi
    if docker info >/dev/null 2>&1 && $PY -c 'import sandboxes.image' 2>/dev/null; then
        .venv/bin/dsv4-agent sandbox build --if-missing
    fi
fi

# --- MCP Inspector (a third-party MCP client for tests/agent/test_agent_mcp_server.py) ------------
# 0.15.0: the last release that runs on Node.js 20 (later ones need 22). About 40 s, once.
if command -v npm >/dev/null 2>&1 && [ ! -x .tools/node_modules/.bin/mcp-inspector ]; then
    npm install --prefix .tools --no-audit --no-fund --silent @modelcontextprotocol/inspector@0.15.0 >/dev/null \
        || echo "setup: the MCP Inspector did not install; its test will be skipped" >&2
fi
