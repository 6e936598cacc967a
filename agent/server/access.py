"""Who may use the server: `serve --api-key KEY` (or `$DSV4_AGENT_API_KEY`) makes every request carry
`Authorization: Bearer KEY`, as vLLM's `--api-key` does; anything else is a 401 JSON error. Binding
beyond the loopback interface without a key gets a warning: anyone who can reach the port could use
the GPU and read what other clients' prompts cost in time (`cache_salt` separates clients that share
a key)."""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any

from agent.server.errors import error_body


class ApiKeyMiddleware:
    """A pure ASGI middleware: HTTP requests without the right bearer token get a 401 before any route."""

    def __init__(self, app: Any, api_key: str) -> None:
        if not api_key:
            raise ValueError("an API key must not be empty")
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or ()).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        reason = "no Authorization header" if not given else "a wrong API key"
        body = json.dumps(error_body(f"{reason}: send 'Authorization: Bearer <the server's API key>'", 401,
                                     code="invalid_api_key")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for serving beyond this machine without a key; None when there is nothing to warn about."""
    if api_key or is_loopback(host):
        return None
    return (f"serving on {host} without an API key: anyone who can reach this port can run the model. "
            "Pass --api-key KEY (or set $DSV4_AGENT_API_KEY), or bind to 127.0.0.1.")
