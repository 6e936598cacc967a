"""The engine side of the server and its routes: `GET /v1/models`, `GET /v1/models/{id}`,
`POST /v1/completions`, `POST /v1/chat/completions` (request and response handling in
agent/server/endpoints.py, validation in requests.py, errors in errors.py, access in access.py).

Requests are serialised: one lock covers all engine work (checkout, prefill, decode), so concurrent
requests wait their turn in arrival order, and a streamed response holds the engine until its last
token. Each request runs on a pooled session found by token-id prefix (agent/server/pool.py), so a
client that re-sends its whole conversation every turn gets append-only prefill;
`usage.prompt_tokens_reused` counts the prompt tokens whose KV was already resident. A request's
logits processors (its grammar constraint, its logprob recorder) come with its `Generation`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route

from agent.backends.engine import ConstrainedDecoding
from agent.server import endpoints
from agent.server.access import ApiKeyMiddleware, exposure_warning
from agent.server.errors import JSONInternalErrors, RequestError, engine_error, exception_handlers
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


class Server:
    def __init__(self, engine: Any, tokenizer: Any, model_name: str, max_sessions: int) -> None:
        if engine.cfg.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"the model's vocabulary ({engine.cfg.vocab_size}) is smaller than the "
                             f"tokenizer's ({tokenizer.vocab_size}): it cannot read DSV4 chat tokens")
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.pool = SessionPool(engine, max_sessions)
        self.lock = asyncio.Lock()  # all engine work, one request at a time (FIFO)

    # ---- the engine side --------------------------------------------------------------------
    def plan(self, prompt: list[int], sampling: Sampling, default_max: int | None) -> Generation:
        """Check a prompt and its budget against the model before queueing it."""
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
        wanted = sampling.max_tokens if sampling.max_tokens is not None else default_max
        max_tokens = room if wanted is None else wanted
        if max_tokens > room:
            raise RequestError("max_tokens", f"{len(prompt)} prompt tokens + max_tokens {max_tokens} exceed "
                               f"the context of {self.engine.max_context}", code="context_length_exceeded")
        return Generation(prompt, max_tokens, sampling, sampling.stop_strings())

    async def run(self, gen: Generation) -> AsyncIterator[int]:
        """Prefill the prompt's new suffix on a pooled session, then decode (max_tokens 0: prefill only)."""
        from dsv4.runtime.errors import ContextLengthExceeded, KVBudgetExceeded

        async with self.lock:
            found = self.pool.checkout(gen.prompt, salt=gen.sampling.cache_salt)
            session, gen.how = found.session, found.how
            gen.reused = session.cached_length
            try:
                suffix = gen.prompt[len(session):]
                while suffix:
                    try:
                        await session.aappend(suffix)
                        break
                    except KVBudgetExceeded:
                        if not self.pool.evict_one(keep=session):
                            raise
                if gen.max_tokens == 0:
                    gen.finish_reason = "length"
                    return
                s = gen.sampling
                while True:
                    gen.start_turn()
                    tokens = session.generate(max_tokens=gen.max_tokens, temperature=s.temperature, top_p=s.top_p,
                                              seed=s.seed, stop=gen.stop, logits_processors=gen.processors())
                    try:
                        async with aclosing(tokens):
                            async for token in tokens:
                                gen.ids.append(token)
                                yield token
                        break
                    except KVBudgetExceeded:  # before the first token the session is unchanged: make room, retry
                        if gen.ids or not self.pool.evict_one(keep=session):
                            raise
                gen.finish_reason = session.finish_reason
            except (ContextLengthExceeded, KVBudgetExceeded) as e:
                raise engine_error(e) from None
            finally:
                if len(session) == 0:  # a new session whose prefill was refused holds nothing
                    self.pool.drop(session)

    async def collect(self, gen: Generation) -> None:
        async with aclosing(self.run(gen)) as tokens:
            async for _ in tokens:
                pass

    def detokenizer(self):
        from dsv4.runtime.sampling import IncrementalDetokenizer

        return IncrementalDetokenizer(self.tokenizer.decode)


def create_app(engine: Any, tokenizer: Any, *, model_name: str = "dsv4", max_sessions: int = 8,
               api_key: str | None = None) -> Starlette:
    """The OpenAI-compatible app over `engine` (a dsv4.Engine); `tokenizer` an `encoding.Tokenizer`.
    With `api_key`, every request must carry `Authorization: Bearer <api_key>` (401 otherwise)."""
    server = Server(engine, tokenizer, model_name, max_sessions)
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
          sock: socket.socket | None = None) -> None:
    """Run the app under uvicorn until interrupted, on `sock` (from `listen`) or on a new socket at host:port;
    first a warning if it is reachable beyond this machine without an API key."""
    import sys

    import uvicorn

    sock = sock or listen(host, port)
    warning = exposure_warning(sock.getsockname()[0], api_key)
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    app = create_app(engine, tokenizer, model_name=model_name, max_sessions=max_sessions, api_key=api_key)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
    finally:
        sock.close()
