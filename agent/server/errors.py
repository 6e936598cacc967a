"""Every refusal of the server as an OpenAI-style JSON error body with the right HTTP status.

    {"error": {"message": ..., "type": "invalid_request_error" | "authentication_error" | "server_error",
               "param": the offending field or null, "code": a short identifier or null}}

`RequestError` is what handlers raise; `exception_handlers()` turns it and Starlette's own HTTP errors
(unknown route 404, wrong method 405) into such bodies, `JSONInternalErrors` any unexpected exception
(500, never plain text). A stream that fails after it began sends `stream_error_event` and then `[DONE]`.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

log = logging.getLogger("agent.server")


class RequestError(ValueError):
    """A request the server refuses: HTTP `status`, the offending field in `param`."""

    def __init__(self, param: str | None, message: str, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code

    def body(self) -> dict[str, Any]:
        return error_body(str(self), self.status, self.param, self.code)


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(status) or (
        "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def engine_error(exc: Exception) -> RequestError | None:
    """The engine's refusals as request errors (None for anything else: a bug, a 500)."""
    from dsv4.runtime.errors import (
        ContextLengthExceeded,
        DeadlineExceeded,
        EngineBusy,
        KVBudgetExceeded,
    )

    if isinstance(exc, ContextLengthExceeded):
        return RequestError("prompt", str(exc), code="context_length_exceeded")
    if isinstance(exc, KVBudgetExceeded):  # cannot fit even with every idle session spilled
        return RequestError("prompt", str(exc), status=413, code="kv_budget_exceeded")
    if isinstance(exc, EngineBusy):  # the memory is held by running requests: try again later
        return RequestError(None, str(exc), status=429, code="engine_busy")
    if isinstance(exc, DeadlineExceeded):
        return RequestError(None, "the request did not finish before its deadline (serve --request-timeout)",
                            status=504, code="deadline_exceeded")
    return None


def stream_error_event(exc: Exception) -> dict[str, Any]:
    """The body of the `data:` event a failing stream sends before `[DONE]`."""
    known = exc if isinstance(exc, RequestError) else engine_error(exc)
    if known is not None:
        return known.body()
    log.exception("a streamed request failed", exc_info=exc)
    return error_body(f"internal error: {type(exc).__name__}: {exc}", 500, code="internal_error")


async def _request_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestError)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    message = {404: f"no route {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
    return JSONResponse(error_body(message, exc.status_code), status_code=exc.status_code, headers=exc.headers)


class JSONInternalErrors:
    """A pure ASGI middleware: an unexpected exception before the response began is logged and answered
    with a JSON 500 (Starlette's own handler would re-raise it, and the server then drops the connection)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            known = engine_error(exc)
            if known is None:
                log.exception("request failed", exc_info=exc)
                known = RequestError(None, f"internal error: {type(exc).__name__}: {exc}", status=500,
                                     code="internal_error")
            await JSONResponse(known.body(), status_code=known.status)(scope, receive, send)


def exception_handlers() -> dict[Any, Any]:
    return {RequestError: _request_error, HTTPException: _http_error}
