"""The engine side of the server and its routes: `GET /v1/models`, `GET /v1/models/{id}`,
`POST /v1/completions`, `POST /v1/chat/completions` (request and response handling in
agent/server/endpoints.py, validation in requests.py, errors in errors.py, access in access.py).

Requests run concurrently on the engine's scheduler (dsv4/runtime/scheduler.py): every step decodes
all running requests together and prefills new prompts in chunks between those steps. Each request
runs on a pooled session found by token-id prefix (agent/server/pool.py), so a client that re-sends
its whole conversation every turn gets append-only prefill; `usage.prompt_tokens_reused` counts the
prompt tokens whose KV was already resident. A request's logits processors (its grammar constraint,
its logprob recorder) come with its `Generation`.

A client that disconnects (streaming or not) ends its request: its sequence is free from the
scheduler's next step. Every request has a deadline (`request_timeout_s`, 504 when it passes); a chat
request without `max_tokens` / `max_completion_tokens` decodes at most `default_max_tokens`. Refusals
are JSON errors (agent/server/errors.py): 413 `kv_budget_exceeded` (the request cannot fit the KV
budget even with every idle session spilled), 429 `engine_busy` (too many requests already wait for
KV memory).
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.routing import Route

from agent.backends.engine import ConstrainedDecoding
from agent.server import endpoints
from agent.server.access import ApiKeyMiddleware, exposure_warning
from agent.server.errors import (
    JSONInternalErrors,
    RequestError,
    engine_error,
    exception_handlers,
)
from agent.server.logprobs import LogprobRecorder
from agent.server.pool import SessionPool
from agent.server.requests import Sampling


@dataclass
class Generation:
    """One request's turn on a pooled session, filled in as it runs."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    deadline: float | None = None  # time.monotonic() by which the request must have finished
    reused: int = 0  # prompt tokens whose KV was resident before this request
    how: str = ""  # how the pool found the session: new, extend, fork, truncate
    ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    constrained: ConstrainedDecoding | None = None  # the request's grammar (DSML or JSON), this request's own
    thinking: bool = False  # the completion starts in the reasoning (the prompt ends with <think>)
    logprobs: LogprobRecorder | None = None

    def processors(self) -> tuple[Any, ...]:
        """The logits processors, the recorder last: it sees the constrained distribution."""
        return tuple(p for p in (self.constrained, self.logprobs) if p is not None)

    def start_turn(self) -> None:
        if self.constrained is not None:
            self.constrained.start_turn(thinking=self.thinking)
        if self.logprobs is not None:
            self.logprobs.start_turn()

    def usage(self) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": len(self.prompt), "completion_tokens": len(self.ids),
                                 "total_tokens": len(self.prompt) + len(self.ids), "prompt_tokens_reused": self.reused,
                                 "prompt_tokens_details": {"cached_tokens": self.reused}}
        if self.constrained is not None:
            usage["constrained_steps"] = self.constrained.constrained_steps
        return usage


DEFAULT_CHAT_MAX_TOKENS = 8192  # a chat request naming no limit decodes at most this many tokens
REQUEST_TIMEOUT_S = 600.0  # a request's deadline, from its arrival


class Server:
    def __init__(self, engine: Any, tokenizer: Any, model_name: str, max_sessions: int,
                 request_timeout_s: float | None = REQUEST_TIMEOUT_S,
                 default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS) -> None:
        if engine.cfg.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"the model's vocabulary ({engine.cfg.vocab_size}) is smaller than the "
                             f"tokenizer's ({tokenizer.vocab_size}): it cannot read DSV4 chat tokens")
        if request_timeout_s is not None and not request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0 (or None), got {request_timeout_s}")
        if default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {default_max_tokens}")
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.pool = SessionPool(engine, max_sessions)
        self.request_timeout_s, self.default_max_tokens = request_timeout_s, default_max_tokens

    # ---- the engine side --------------------------------------------------------------------
    def plan(self, prompt: list[int], sampling: Sampling, requested: int | None, default_max: int | None) -> Generation:
        """Check a prompt and its budget against the model before queueing it: `requested` tokens
        must fit the context; without them, `default_max` (None: the rest of the context) is cut to fit."""
        if sampling.model is not None and sampling.model != self.model_name:
            raise RequestError("model", f"model: {sampling.model!r} is not served here; this server serves "
                               f"{self.model_name!r}", status=404, code="model_not_found")
        if not prompt:
            raise RequestError("prompt", "prompt: empty")
        vocab = self.engine.cfg.vocab_size
        bad = next((t for t in prompt if isinstance(t, bool) or not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError("prompt", f"prompt: token id {bad} is not in [0, {vocab})")
        room = self.engine.max_context - len(prompt)
        if room < 0:
            raise RequestError("prompt", f"prompt: {len(prompt)} tokens exceed the context of "
                               f"{self.engine.max_context}", code="context_length_exceeded")
        max_tokens = requested if requested is not None else min(room, default_max or room)
        if max_tokens > room:
            raise RequestError("max_tokens", f"{len(prompt)} prompt tokens + max_tokens {max_tokens} exceed "
                               f"the context of {self.engine.max_context}", code="context_length_exceeded")
        deadline = None if self.request_timeout_s is None else time.monotonic() + self.request_timeout_s
        return Generation(prompt, max_tokens, sampling, sampling.stop_strings(), deadline)

    async def run(self, gen: Generation) -> AsyncIterator[int]:
        """Prefill the prompt's new suffix on a pooled session, then decode (max_tokens 0: prefill only);
        both go through the engine's scheduler, batched with every other request."""
        from dsv4.runtime.errors import EngineError

        session = None
        try:
            found = await self.pool.checkout(gen.prompt, salt=gen.sampling.cache_salt)
            session, gen.how = found.session, found.how
            gen.reused = session.cached_length
            suffix = gen.prompt[len(session):]
            if suffix:
                await session.aappend(suffix, deadline=gen.deadline)
            if gen.max_tokens == 0:
                gen.finish_reason = "length"
                return
            s = gen.sampling
            gen.start_turn()
            tokens = session.generate(max_tokens=gen.max_tokens, temperature=s.temperature, top_p=s.top_p,
                                      seed=s.seed, stop=gen.stop, logits_processors=gen.processors(),
                                      deadline=gen.deadline)
            async with aclosing(tokens):  # a disconnect closes it: the sequence is freed at the next step
                async for token in tokens:
                    gen.ids.append(token)
                    yield token
            gen.finish_reason = session.finish_reason
        except EngineError as e:
            known = engine_error(e)
            if known is None:
                raise
            raise known from None
        finally:
            if session is not None:
                self.pool.release(session)

    async def unless_disconnected(self, request: Request, work: Awaitable[None]) -> bool:
        """Await `work` (a non-streamed request's run) unless its client disconnects first: then it
        is cancelled (its sequence is freed at the scheduler's next step) and False is returned."""
        finished, error = False, None
        async with anyio.create_task_group() as tg:
            async def watch() -> None:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                await work
                finished = True
            except Exception as e:  # noqa: BLE001 - raised below: inside the task group it would come wrapped
                error = e
            finally:
                tg.cancel_scope.cancel()
        if error is not None:
            raise error
        return finished

    def detokenizer(self):
        from dsv4.runtime.sampling import IncrementalDetokenizer

        return IncrementalDetokenizer(self.tokenizer.decode)


def create_app(engine: Any, tokenizer: Any, *, model_name: str = "dsv4", max_sessions: int = 8,
               api_key: str | None = None, request_timeout_s: float | None = REQUEST_TIMEOUT_S,
               default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS) -> Starlette:
    """The OpenAI-compatible app over `engine` (a dsv4.Engine); `tokenizer` an `encoding.Tokenizer`.
    With `api_key`, every request must carry `Authorization: Bearer <api_key>` (401 otherwise)."""
    server = Server(engine, tokenizer, model_name, max_sessions, request_timeout_s, default_max_tokens)
    routes = [
        Route("/v1/models", partial(endpoints.models, server), methods=["GET"]),
        Route("/v1/models/{model_id:path}", partial(endpoints.model, server), methods=["GET"]),
        Route("/v1/completions", partial(endpoints.completions, server), methods=["POST"]),
        Route("/v1/chat/completions", partial(endpoints.chat, server), methods=["POST"]),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        server.pool.close()  # the sessions' KV memory goes back to the engine

    middleware = [Middleware(JSONInternalErrors)]
    if api_key:
        middleware.append(Middleware(ApiKeyMiddleware, api_key=api_key))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=exception_handlers(), lifespan=lifespan)
    app.state.server = server
    return app


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port and listening. `dsv4-agent serve` takes it before the model loads,
    so a busy port fails at once rather than after minutes of loading. Raises OSError (`errno.EADDRINUSE`
    when the port is taken, `socket.gaierror` for a host that does not resolve)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def serve(engine: Any, tokenizer: Any, *, model_name: str = "dsv4", host: str = "127.0.0.1", port: int = 8000,
          max_sessions: int = 8, api_key: str | None = None, log_level: str = "info",
          sock: socket.socket | None = None, request_timeout_s: float | None = REQUEST_TIMEOUT_S,
          default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS) -> None:
    """Run the app under uvicorn until interrupted, on `sock` (from `listen`) or on a new socket at host:port;
    first a warning if it is reachable beyond this machine without an API key."""
    import sys

    import uvicorn

    sock = sock or listen(host, port)
    warning = exposure_warning(sock.getsockname()[0], api_key)
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    app = create_app(engine, tokenizer, model_name=model_name, max_sessions=max_sessions, api_key=api_key,
                     request_timeout_s=request_timeout_s, default_max_tokens=default_max_tokens)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
    finally:
        sock.close()
