"""`RemoteBackend` against small in-process fakes of the OpenAI `/v1/completions` servers people scale
DeepSeek-V4 out on, each implementing the request fields and error behaviour its project documents
for that endpoint:

* vLLM: `prompt` as token ids or text (`add_special_tokens` defaults to true), `max_tokens` >= 1
  (`0` is a 400 naming `max_tokens`), `return_token_ids` (the prompt ids in the first streamed chunk,
  the drawn ids in every chunk), `skip_special_tokens` (default true; the stop token's text is never
  in the output), prefix caching reported in `usage.prompt_tokens_details.cached_tokens` in whole
  16-token blocks, errors as `{"error": {message, type: "BadRequestError", param, code: 400}}`, a too
  long prompt as "This model's maximum context length is ...";
* SGLang: the same prompt forms, `max_tokens` must be positive (a pydantic 400 with SGLang's
  top-level `{"object": "error", "message", "type", "param", "code"}` body), `return_token_ids` only
  in recent versions (an older one ignores the field and streams text only), `cached_tokens` in the
  usage, "The input (N tokens) is longer than the model's context length (M tokens).";
* a text-only proxy: `prompt` must be a string (a 400 naming `prompt`), text out.

The fakes draw a scripted DSV4 completion, so an agent run ends the same way on each; what differs
is how the backend has to talk to them, which the fakes record."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from agent import Agent, AgentConfig, ExitStatus
from agent.backends.base import ContextFull
from agent.backends.remote import RemoteBackend, RemoteError
from encoding import Tokenizer
from tools import tool

pytestmark = pytest.mark.timeout(120)

TOK = Tokenizer.default()
RNG = random.Random()
SEED = RNG.randrange(1 << 30)  # in every failure message below
EOS = "<｜end▁of▁sentence｜>"
COMPLETION = TOK.encode("The user wants a greeting.</think>Hello there." + EOS)
CONTEXT = 4096
BLOCK = 16


@dataclass
class Fake:
    """One fake server: `flavour` is vllm, sglang, sglang-old or text-only."""

    flavour: str
    prompts: list = field(default_factory=list)  # what each completion request sent as `prompt`
    bodies: list = field(default_factory=list)
    seen: list = field(default_factory=list)  # sequences in the prefix cache
    cached: list = field(default_factory=list)  # the cached_tokens each request reported

    def error(self, message: str, param: str | None = None, status: int = 400) -> JSONResponse:
        kind = "NotFoundError" if status == 404 else "BadRequestError"
        if self.flavour.startswith("sglang"):
            return JSONResponse({"object": "error", "message": message, "type": kind, "param": param,
                                 "code": status}, status_code=status)
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                            status_code=status)

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "deepseek-ai/DeepSeek-V4-Flash", "object": "model",
                                                         "max_model_len": CONTEXT}]})

    async def completions(self, request: Request):
        body = await request.json()
        self.bodies.append(body)
        if body.get("model") != "deepseek-ai/DeepSeek-V4-Flash":
            message = f"The model `{body.get('model')}` does not exist."
            return self.error(message, "model", status=404)
        prompt, max_tokens = body.get("prompt"), body.get("max_tokens", 16)
        if isinstance(prompt, list) and self.flavour == "text-only":
            return self.error("prompt: Input should be a valid string", "prompt")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            if self.flavour == "vllm":
                return self.error(f"max_tokens must be at least 1, got {max_tokens}. (parameter=max_tokens, "
                                  f"value={max_tokens})", "max_tokens")
            return self.error("1 validation error for CompletionRequest\nmax_tokens\n  Value error, max_tokens must "
                              "be positive [type=value_error]")
        self.prompts.append(prompt)
        if isinstance(prompt, str):  # the server tokenizes text itself: special-token strings become tokens
            ids = ([TOK.bos_id] if body.get("add_special_tokens", True) else []) + TOK.encode(prompt)
        else:
            ids = list(prompt)
        if len(ids) + max_tokens > CONTEXT:
            if self.flavour == "vllm":
                return self.error(f"This model's maximum context length is {CONTEXT} tokens. However, you requested "
                                  f"{len(ids) + max_tokens} tokens ({len(ids)} in the messages, {max_tokens} in the "
                                  "completion). Please reduce the length of the messages or completion.")
            return self.error(f"The input ({len(ids)} tokens) is longer than the model's context length "
                              f"({CONTEXT} tokens).")
        shared = max((_shared(ids, s) for s in self.seen), default=0)
        cached = min(shared, len(ids) - 1) // BLOCK * BLOCK
        self.cached.append(cached)
        drawn = COMPLETION[:max_tokens]
        self.seen.append(ids + drawn)
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(drawn), "total_tokens": len(ids) + len(drawn),
                 "prompt_tokens_details": {"cached_tokens": cached}}
        with_ids = body.get("return_token_ids") and self.flavour in ("vllm", "sglang")
        skip = body.get("skip_special_tokens", True)
        finish = "stop" if drawn and drawn[-1] == TOK.eos_id else "length"
        shown = drawn[:-1] if finish == "stop" else drawn  # the stop token's text is never in the output

        def text(part: list[int]) -> str:
            return TOK._hf.decode(part, skip_special_tokens=skip)

        if not body.get("stream"):
            choice = {"index": 0, "text": text(shown), "finish_reason": finish}
            if with_ids:
                choice.update(prompt_token_ids=ids, token_ids=drawn)
            return JSONResponse({"id": "cmpl-1", "object": "text_completion", "choices": [choice], "usage": usage})

        def events():
            for i, token in enumerate(drawn):
                last = i == len(drawn) - 1
                choice = {"index": 0, "text": "" if token not in shown else text([token]),
                          "finish_reason": finish if last else None}
                if with_ids:
                    choice["token_ids"] = [token]
                    if i == 0:
                        choice["prompt_token_ids"] = ids
                yield f"data: {json.dumps({'id': 'cmpl-1', 'object': 'text_completion', 'choices': [choice]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/models", self.models), Route("/v1/completions", self.completions,
                                                                         methods=["POST"])])


def _shared(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


FLAVOURS = ["vllm", "sglang", "sglang-old", "text-only"]


@pytest.fixture(scope="module")
def fakes(live_server):
    out = {}
    for flavour in FLAVOURS:
        fake = Fake(flavour)
        out[flavour] = (fake, live_server(fake.app()))
    return out


@pytest.mark.anyio
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_the_backend_uses_what_each_server_takes_and_falls_back_on_the_rest(fakes, flavour):
    fake, url = fakes[flavour]
    fake.prompts.clear()
    backend = RemoteBackend(url, seed=SEED)
    await backend.start(TOK)
    assert backend.model == "deepseek-ai/DeepSeek-V4-Flash"
    # a user message quoting the end-of-sentence string: untrusted data, spelled with ordinary tokens
    quoted = TOK.encode(EOS[:5]) + TOK.encode(EOS[5:])
    assert TOK.eos_id not in quoted and TOK.decode(quoted) == EOS
    prompt = TOK.encode("<｜begin▁of▁sentence｜>sys<｜User｜>say hi ") + quoted + TOK.encode("<｜Assistant｜><think>")
    prompt += [RNG.randrange(1000, 50000) for _ in range(40)]
    computed, reused = await backend.prefill(prompt)
    assert (computed, reused) == (len(prompt), 0)
    drawn = [t async for t in backend.decode(20)]
    assert drawn == COMPLETION, f"{flavour}: {TOK.decode(drawn)!r}"
    assert backend.tokens == prompt + COMPLETION
    info = backend.turn_info()
    token_prompts = flavour != "text-only"
    assert info["prompts"] == ("token_ids" if token_prompts else "text")
    assert info["output"] == ("token_ids" if flavour in ("vllm", "sglang") else "text")
    assert backend.prefill_max_tokens == 1  # none of them takes max_tokens 0
    # every prompt the server saw is the session in the same encoding
    sent = fake.prompts[-1]
    if token_prompts:
        assert sent == prompt
    else:
        assert sent == TOK.decode(prompt) and all(b.get("add_special_tokens") is False for b in fake.bodies[-2:])
        # the documented limit of text prompts: the server's tokenizer reads the quoted string as EOS itself
        assert TOK.eos_id in TOK.encode(sent)
    # the next turn: the cache reuse the server reports comes back from prefill
    more = TOK.encode("<｜User｜>again<｜Assistant｜><think>")
    computed, reused = await backend.prefill(more)
    session = len(prompt) + len(COMPLETION) + len(more)
    assert reused == fake.cached[-1] > 0 and computed == session - reused
    if token_prompts:  # the whole earlier session, in whole blocks, is in the server's prefix cache
        assert reused == (session - len(more) - 1) // BLOCK * BLOCK
    await backend.close()


@pytest.mark.anyio
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_refusals_are_context_full_or_a_clear_remote_error(fakes, flavour):
    fake, url = fakes[flavour]
    backend = RemoteBackend(url)
    await backend.start(TOK)
    with pytest.raises(ContextFull, match="context length"):
        await backend.prefill([TOK.bos_id] + [1000] * CONTEXT)
    assert backend.tokens == []  # nothing recorded that the server refused
    await backend.close()
    backend = RemoteBackend(url, model="no-such-model")  # a refusal there is no way around
    await backend.start(TOK)
    with pytest.raises(RemoteError, match="404.*does not exist"):
        await backend.prefill([TOK.bos_id, 1000])
    await backend.close()


@tool
async def note(text: str) -> str:
    """Write a note down."""
    return f"noted {text}"


@pytest.mark.anyio
@pytest.mark.parametrize("flavour", ["vllm", "text-only"])
async def test_an_agent_runs_through_each_server(fakes, flavour, tmp_path):
    _, url = fakes[flavour]
    agent = Agent(backend=RemoteBackend(url, seed=SEED), tools=[note],
                  config=AgentConfig(max_turn_tokens=40, max_steps=2), output_dir=tmp_path)
    result = await agent.run("greet me")
    assert result.status is ExitStatus.completed, result.message
    assert result.final_answer.strip() == "Hello there."
