"""The OpenAI endpoints: a request in (validated by agent/server/requests.py), one `Generation` per
prompt handed to the engine side (`Server.plan`, `Server.run`), the response out, whole or over SSE.

Streams follow OpenAI: the chunks, then (with `stream_options.include_usage`) one chunk with empty
`choices` and the `usage`, then `data: [DONE]`; a stream that fails after it began sends one
`data: {"error": ...}` event and then `[DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from agent.server.chat import ChatParser, chat_constraint, json_constraint, render_chat, tool_names
from agent.server.errors import RequestError, stream_error_event
from agent.server.logprobs import LogprobFormatter, LogprobRecorder, TokenLogprob
from agent.server.requests import ChatRequest, CompletionRequest, parse_request

if TYPE_CHECKING:
    from agent.server.app import Generation, Server


# ---- /v1/models ---------------------------------------------------------------------------------------------
def _card(server: Server) -> dict[str, Any]:
    return {"id": server.model_name, "object": "model", "created": 0, "owned_by": "dsv4-agent",
            "max_model_len": server.engine.max_context}


async def models(server: Server, request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [_card(server)]})


async def model(server: Server, request: Request) -> JSONResponse:
    name = request.path_params["model_id"]
    if name != server.model_name:
        raise RequestError("model", f"model {name!r} is not served here; this server serves {server.model_name!r}",
                           status=404, code="model_not_found")
    return JSONResponse(_card(server))


# ---- /v1/completions ------------------------------------------------------------------------------------------
async def completions(server: Server, request: Request) -> Any:
    body: CompletionRequest = parse_request(CompletionRequest, await request.body())
    tokenizer = server.tokenizer
    gens = []
    for prompt in body.prompts():  # every prompt is checked before any runs
        gen = server.plan(tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt), body, body.max_tokens,
                          default_max=16)
        gen.constrained = json_constraint(body.response_format, tokenizer)
        gen.logprobs = None if body.logprobs is None else LogprobRecorder(body.logprobs)
        gens.append(gen)
    head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": server.model_name}
    formatter = LogprobFormatter(tokenizer)

    if not body.stream:
        choices = []
        for index, gen in enumerate(gens):
            entries = await _drain(server, gen, request)
            if entries is None:
                return _CLIENT_GONE
            choice = {"index": index, "text": tokenizer.decode(gen.ids), "logprobs": None,
                      "finish_reason": gen.finish_reason}
            if gen.logprobs is not None:
                choice["logprobs"] = formatter.completion(entries, _char_offsets(server, gen.ids))
            if body.return_token_ids:
                choice.update(prompt_token_ids=gen.prompt, token_ids=gen.ids)
            choices.append(choice)
        return JSONResponse({**head, "choices": choices, "usage": _total_usage(gens)})

    async def events() -> AsyncIterator[dict]:
        for index, gen in enumerate(gens):
            detok, sent = server.detokenizer(), ""
            async with aclosing(server.run(gen)) as tokens:
                async for token in tokens:
                    offset = len(sent)
                    text = detok.push(token)
                    sent += text
                    choice: dict[str, Any] = {"index": index, "text": text, "logprobs": None, "finish_reason": None}
                    if gen.logprobs is not None:
                        choice["logprobs"] = formatter.completion([gen.logprobs.take(token)], [offset])
                    if body.return_token_ids:
                        choice["token_ids"] = [token]
                        if len(gen.ids) == 1:
                            choice["prompt_token_ids"] = gen.prompt
                    if text or body.return_token_ids or gen.logprobs is not None:
                        yield {**head, "choices": [choice]}
            last = {"index": index, "text": tokenizer.decode(gen.ids)[len(sent):],  # characters held back at the end
                    "logprobs": None, "finish_reason": gen.finish_reason}
            if body.return_token_ids:
                last["token_ids"] = []
                if not gen.ids:
                    last["prompt_token_ids"] = gen.prompt
            yield {**head, "choices": [last]}
        if body.include_usage:
            yield {**head, "choices": [], "usage": _total_usage(gens)}

    return _sse(events())


# ---- /v1/chat/completions ---------------------------------------------------------------------------------------
async def chat(server: Server, request: Request) -> Any:
    body: ChatRequest = parse_request(ChatRequest, await request.body())
    tokenizer = server.tokenizer
    prompt, mode = render_chat(body, tokenizer)
    requested = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    gen = server.plan(prompt, body, requested, default_max=server.default_max_tokens)
    gen.constrained = chat_constraint(body, tokenizer)
    gen.thinking = prompt[-1] == tokenizer.think_start_id  # thinking mode: the prompt opens the reasoning
    gen.logprobs = LogprobRecorder(body.top_logprobs or 0) if body.logprobs else None
    rid = uuid.uuid4().hex[:24]
    parser = ChatParser(mode, call_prefix=f"call_{rid[:8]}", tool_names=tool_names(body))
    head = {"id": f"chatcmpl-{rid}", "created": int(time.time()), "model": server.model_name}
    formatter = LogprobFormatter(tokenizer)

    if not body.stream:
        entries = await _drain(server, gen, request)
        if entries is None:
            return _CLIENT_GONE
        parser.feed(tokenizer.decode(gen.ids))
        parser.close()
        choice = {"index": 0, "message": parser.message(),
                  "logprobs": formatter.chat(entries) if body.logprobs else None,
                  "finish_reason": parser.finish_reason(gen.finish_reason)}
        if body.return_token_ids:
            choice.update(prompt_token_ids=gen.prompt, token_ids=gen.ids)
        return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": gen.usage()})

    def chunk(delta: dict, entries: list[TokenLogprob], finish: str | None = None, **extra: Any) -> dict:
        logprobs = formatter.chat(entries) if body.logprobs and entries else None
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**head, "object": "chat.completion.chunk", "choices": [choice], **extra}

    async def events() -> AsyncIterator[dict]:
        yield chunk({"role": "assistant", "content": ""}, [])
        detok, sent = server.detokenizer(), ""
        pending: list[TokenLogprob] = []  # logprobs of tokens whose text has not gone out yet
        async with aclosing(server.run(gen)) as tokens:
            async for token in tokens:
                if gen.logprobs is not None:
                    pending.append(gen.logprobs.take(token))
                piece = detok.push(token)
                sent += piece
                for delta in parser.feed(piece):
                    yield chunk(delta, pending)
                    pending = []
        for delta in parser.feed(tokenizer.decode(gen.ids)[len(sent):]) + parser.close():
            yield chunk(delta, pending)
            pending = []
        extra = {"dsml_errors": parser.errors} if parser.errors else {}
        yield chunk({}, pending, parser.finish_reason(gen.finish_reason), **extra)
        if body.include_usage:
            yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": gen.usage()}

    return _sse(events())


# ---- helpers ------------------------------------------------------------------------------------------------------
_CLIENT_GONE = Response(status_code=499)  # nobody reads it: the client disconnected


async def _drain(server: Server, gen: Generation, request: Request) -> list[TokenLogprob] | None:
    """Run a generation to its end; the logprobs of its tokens (empty when not asked for), or None
    when the client disconnected first (the generation was stopped)."""
    entries = []

    async def run() -> None:
        async with aclosing(server.run(gen)) as tokens:
            async for token in tokens:
                if gen.logprobs is not None:
                    entries.append(gen.logprobs.take(token))

    return entries if await server.unless_disconnected(request, run()) else None


def _char_offsets(server: Server, ids: list[int]) -> list[int]:
    """Each token's character offset in the completion text (a character split over tokens counts
    for the token that completes it)."""
    detok, offsets, length = server.detokenizer(), [], 0
    for token in ids:
        offsets.append(length)
        length += len(detok.push(token))
    return offsets


def _total_usage(gens: list[Generation]) -> dict[str, Any]:
    usage = gens[0].usage()
    for gen in gens[1:]:
        for key, value in gen.usage().items():
            if isinstance(value, int):
                usage[key] += value
        usage["prompt_tokens_details"]["cached_tokens"] += gen.reused
    return usage


def _sse(events: AsyncIterator[dict]) -> Any:
    """SSE: the events, then `[DONE]`; an error after the stream began becomes an error event first."""
    from sse_starlette.sse import EventSourceResponse

    async def guarded() -> AsyncIterator[dict]:
        try:
            async for event in events:
                yield {"data": dumps(event)}
        except Exception as e:  # the response has begun: the status cannot change, so the error is an event
            yield {"data": dumps(stream_error_event(e))}
        yield {"data": "[DONE]"}

    return EventSourceResponse(guarded())


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)
