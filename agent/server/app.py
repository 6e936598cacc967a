"""The HTTP routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`.

Requests are serialised: one lock covers all engine work (checkout, prefill, decode), so concurrent
requests wait their turn in arrival order, and a streamed response holds the engine until its last
token. Each request runs on a pooled session found by token-id prefix (agent/server/pool.py), so a
client that re-sends its whole conversation every turn gets append-only prefill;
`usage.prompt_tokens_reused` counts the prompt tokens whose KV was already resident. A chat request
declaring tools decodes under the DSML constraint (agent/server/chat.py `constrained_decoding`) unless
it says `"dsml_constraint": false`.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agent.backends.engine import ConstrainedDecoding
from agent.server.chat import (
    ChatParser,
    constrained_decoding,
    dumps,
    render_chat,
    tool_names,
)
from agent.server.pool import SessionPool
from agent.server.schemas import (
    ChatRequest,
    CompletionRequest,
    RequestError,
    Sampling,
    parse_request,
)


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
    constrained: ConstrainedDecoding | None = None  # chat with tools: the DSML constraint, this request's own

    def usage(self) -> dict[str, int]:
        usage = {"prompt_tokens": len(self.prompt), "completion_tokens": len(self.ids),
                 "total_tokens": len(self.prompt) + len(self.ids), "prompt_tokens_reused": self.reused}
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
            found = self.pool.checkout(gen.prompt)
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
                processors = () if gen.constrained is None else (gen.constrained,)
                while True:
                    if gen.constrained is not None:  # thinking mode: the rendered prompt ends with <think>
                        gen.constrained.start_turn(thinking=gen.prompt[-1] == self.tokenizer.think_start_id)
                    tokens = session.generate(max_tokens=gen.max_tokens, temperature=s.temperature, top_p=s.top_p,
                                              seed=s.seed, stop=gen.stop, logits_processors=processors)
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
            except ContextLengthExceeded as e:
                raise RequestError("prompt", str(e), code="context_length_exceeded") from None
            except KVBudgetExceeded as e:
                raise RequestError("prompt", str(e), status=413, code="kv_budget_exceeded") from None
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

    # ---- /v1/completions ----------------------------------------------------------------------
    async def completions(self, request: Request) -> Any:
        body = parse_request(CompletionRequest, await _json(request))
        prompt = self.tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        gen = self.plan(prompt, body, default_max=16)
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name}
        if not body.stream:
            await self.collect(gen)
            choice = {"index": 0, "text": self.tokenizer.decode(gen.ids), "logprobs": None,
                      "finish_reason": gen.finish_reason}
            if body.return_token_ids:
                choice.update(prompt_token_ids=gen.prompt, token_ids=gen.ids)
            return JSONResponse({**head, "choices": [choice], "usage": gen.usage()})

        async def events() -> AsyncIterator[dict]:
            detok, sent = self.detokenizer(), ""
            async with aclosing(self.run(gen)) as tokens:
                async for token in tokens:
                    text = detok.push(token)
                    sent += text
                    choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
                    if body.return_token_ids:
                        choice["token_ids"] = [token]
                        if len(gen.ids) == 1:
                            choice["prompt_token_ids"] = gen.prompt
                    if text or body.return_token_ids:
                        yield {"data": dumps({**head, "choices": [choice]})}
            tail = self.tokenizer.decode(gen.ids)[len(sent):]  # characters held back at the end
            last = {"index": 0, "text": tail, "logprobs": None, "finish_reason": gen.finish_reason}
            if body.return_token_ids:
                last["token_ids"] = []
                if not gen.ids:
                    last["prompt_token_ids"] = gen.prompt
            yield {"data": dumps({**head, "choices": [last], "usage": gen.usage()})}

        return _stream(events())

    # ---- /v1/chat/completions -----------------------------------------------------------------
    async def chat(self, request: Request) -> Any:
        body = parse_request(ChatRequest, await _json(request))
        text, mode = render_chat(body)
        gen = self.plan(self.tokenizer.encode(text), body, default_max=body.max_completion_tokens)
        gen.constrained = constrained_decoding(body, self.tokenizer)
        rid = uuid.uuid4().hex[:24]
        parser = ChatParser(mode, call_prefix=f"call_{rid[:8]}", tool_names=tool_names(body))
        head = {"id": f"chatcmpl-{rid}", "created": int(time.time()), "model": self.model_name}
        if not body.stream:
            await self.collect(gen)
            parser.feed(self.tokenizer.decode(gen.ids))
            parser.close()
            choice = {"index": 0, "message": parser.message(), "logprobs": None,
                      "finish_reason": parser.finish_reason(gen.finish_reason)}
            if body.return_token_ids:
                choice.update(prompt_token_ids=gen.prompt, token_ids=gen.ids)
            return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": gen.usage()})

        def chunk(delta: dict, finish: str | None = None, **extra: Any) -> dict:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"data": dumps({**head, "object": "chat.completion.chunk", "choices": [choice], **extra})}

        async def events() -> AsyncIterator[dict]:
            yield chunk({"role": "assistant"})
            detok, sent = self.detokenizer(), ""
            async with aclosing(self.run(gen)) as tokens:
                async for token in tokens:
                    piece = detok.push(token)
                    sent += piece
                    for delta in parser.feed(piece):
                        yield chunk(delta)
            for delta in parser.feed(self.tokenizer.decode(gen.ids)[len(sent):]) + parser.close():
                yield chunk(delta)
            extra = {"usage": gen.usage()}
            if parser.errors:
                extra["dsml_errors"] = parser.errors
            yield chunk({}, parser.finish_reason(gen.finish_reason), **extra)

        return _stream(events())

    # ---- /v1/models -----------------------------------------------------------------------------
    async def models(self, request: Request) -> JSONResponse:
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "dsv4-agent",
                "max_model_len": self.engine.max_context}
        return JSONResponse({"object": "list", "data": [card]})


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise RequestError(None, "the request body is not valid JSON") from None


def _stream(events: AsyncIterator[dict]) -> Any:
    """SSE: the events, then `[DONE]`; an engine error after the stream began becomes an error event."""
    from sse_starlette.sse import EventSourceResponse

    async def guarded() -> AsyncIterator[dict]:
        try:
            async for event in events:
                yield event
        except RequestError as e:
            yield {"data": dumps(e.body())}
            return
        yield {"data": "[DONE]"}

    return EventSourceResponse(guarded())


async def _request_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestError)
    return JSONResponse(exc.body(), status_code=exc.status)


def create_app(engine: Any, tokenizer: Any, *, model_name: str = "dsv4", max_sessions: int = 8) -> Starlette:
    """The OpenAI-compatible app over `engine` (a dsv4.Engine); `tokenizer` an `encoding.Tokenizer`."""
    server = Server(engine, tokenizer, model_name, max_sessions)
    routes = [
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        server.pool.close()  # the sessions' KV memory goes back to the engine

    app = Starlette(routes=routes, exception_handlers={RequestError: _request_error}, lifespan=lifespan)
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
          max_sessions: int = 8, log_level: str = "info", sock: socket.socket | None = None) -> None:
    """Run the app under uvicorn until interrupted, on `sock` (from `listen`) or on a new socket at host:port."""
    import uvicorn

    sock = sock or listen(host, port)
    app = create_app(engine, tokenizer, model_name=model_name, max_sessions=max_sessions)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
    finally:
        sock.close()
