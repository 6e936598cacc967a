"""`dsv4-agent serve` with the official `openai` Python SDK as the client, on a tiny random DSV4
checkpoint (full tokenizer vocabulary) served in-process behind an API key: plain and streamed chat
and completions parse into the SDK's types and agree, a forced tool call and its result make a
multi-turn exchange, a multi-turn thinking chat reports its reuse, errors arrive as the SDK's typed
exceptions (streamed ones too), logprobs and JSON-schema answers parse, and a wrong key is refused."""

from __future__ import annotations

import json
import random

import jsonschema
import openai
import pytest
import torch

from agent.server import create_app
from dsv4 import Engine, ModelConfig
from dsv4.loading.testing import write_random_checkpoint
from encoding import Tokenizer

pytestmark = pytest.mark.timeout(120)

RNG = random.Random()  # fresh data each run; the seed is in every failure message below
SEED = RNG.randrange(1 << 30)
KEY = "sk-" + "".join(RNG.choice("abcdef0123456789") for _ in range(32))
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The current time.",
                                          "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What time is it?"}]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, live_server):
    tokenizer = Tokenizer.default()
    cfg = ModelConfig.tiny().model_copy(update={"vocab_size": tokenizer.vocab_size})
    engine = Engine(write_random_checkpoint(tmp_path_factory.mktemp("ckpt"), cfg, seed=SEED), device="cpu",
                    dtype=torch.float32)
    return live_server(create_app(engine, tokenizer, model_name="tiny", api_key=KEY)) + "/v1"


@pytest.fixture
def client(base_url):
    with openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def test_plain_and_streamed_chat_agree(client):
    [card] = client.models.list().data
    assert card.id == "tiny" and client.models.retrieve("tiny").id == "tiny"
    kwargs = {"model": "tiny", "messages": ASK, "max_tokens": 6, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)
    message = whole.choices[0].message
    assert message.role == "assistant" and whole.usage.completion_tokens <= 6
    reasoning = message.model_extra.get("reasoning_content") or ""
    content, streamed_reasoning, usage = "", "", None
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        streamed_reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
    assert (content, streamed_reasoning) == (message.content or "", reasoning), f"seed {SEED}"
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens  # the same prompt: all reused


def test_completions_plain_streamed_and_a_list_of_prompts(client):
    whole = client.completions.create(model="tiny", prompt=["Hello", "Bonjour"], max_tokens=3, temperature=0)
    assert [c.index for c in whole.choices] == [0, 1]
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(model="tiny", prompt=["Hello", "Bonjour"], max_tokens=3, temperature=0,
                                           stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert [texts[0], texts[1]] == [c.text for c in whole.choices], f"seed {SEED}"


def test_a_forced_tool_call_and_its_result(client):
    first = client.chat.completions.create(
        model="tiny", messages=ASK, tools=[CLOCK], tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False, reasoning_effort="none", max_tokens=60, seed=SEED)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", f"seed {SEED}"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_time" and json.loads(call.function.arguments) == {}
    history = [*ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
    second = client.chat.completions.create(model="tiny", messages=history, tools=[CLOCK], tool_choice="none",
                                            reasoning_effort="none", max_tokens=3, seed=SEED)
    assert second.choices[0].message.tool_calls is None
    assert second.usage.prompt_tokens_details.cached_tokens > 0  # the first turn's prompt was resident


def test_a_multi_turn_thinking_chat(client):
    messages = list(ASK)
    for turn in range(2):
        answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, seed=SEED + turn)
        message = answer.choices[0].message
        assert answer.usage.prompt_tokens_details.cached_tokens <= answer.usage.prompt_tokens
        messages += [{"role": "assistant", "content": message.content or "",
                      "reasoning_content": message.model_extra.get("reasoning_content") or ""},
                     {"role": "user", "content": [{"type": "text", "text": f"And now ({turn})?"}]}]


def test_errors_are_typed_sdk_exceptions(client, base_url):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=True)
    assert bad.value.status_code == 400 and bad.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=ASK, tools=[{"type": "function", "function": {
            "name": "f", "parameters": "not a schema"}}])
    assert bad.value.param == "tools.0.function.parameters"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=1)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    with openai.OpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as denied:
            wrong.models.list()
    assert denied.value.status_code == 401 and denied.value.code == "invalid_api_key"


def test_a_stream_that_fails_raises_in_the_sdk(client, base_url, monkeypatch):
    from agent.server.app import Server

    real = Server.run

    async def failing(self, gen):
        async for token in real(self, gen):
            yield token
            raise RuntimeError("out of cheese")

    monkeypatch.setattr(Server, "run", failing)
    stream = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, stream=True)
    with pytest.raises(openai.APIError, match="out of cheese"):
        for _ in stream:
            pass


def test_logprobs_and_a_json_schema_answer(client):
    answer = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, temperature=0,
                                            reasoning_effort="none", logprobs=True, top_logprobs=3)
    entries = answer.choices[0].logprobs.content
    assert len(entries) == answer.usage.completion_tokens
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 3 and e.logprob == pytest.approx(e.top_logprobs[0].logprob)
               for e in entries)
    schema = {"type": "object", "properties": {"hour": {"enum": [11, 12]}, "pm": {"type": "boolean"}},
              "required": ["hour", "pm"], "additionalProperties": False}
    answer = client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=30, seed=SEED, reasoning_effort="none",
        response_format={"type": "json_schema", "json_schema": {"name": "time", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)
