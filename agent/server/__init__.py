"""`dsv4-agent serve`: an OpenAI-compatible HTTP server over the embedded engine, with resident sessions
found again by token-id prefix (see docs/agent.md, "Serving").

    app = create_app(engine, tokenizer, model_name="dsv4")   # a Starlette app
    serve(engine, tokenizer, host="127.0.0.1", port=8000)     # the same app under uvicorn
"""

from __future__ import annotations

from agent.server.app import create_app, listen, serve
from agent.server.pool import SessionPool

__all__ = ["SessionPool", "create_app", "listen", "serve"]
