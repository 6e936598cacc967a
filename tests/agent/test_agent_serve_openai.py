"""The server's OpenAI compatibility over raw HTTP, on a tiny random DSV4 checkpoint (full tokenizer
vocabulary) served in-process: strict types and every refusal as a JSON error with the right status,
`/v1/models/{id}`, text-part content, the `reasoning_effort` levels, lists of prompts, the
`include_usage` chunk, a failing stream's error event and `[DONE]`, `tool_choice` and JSON
`response_format` enforced by the grammars, `logprobs` equal to the engine's own distribution,
`cache_salt`, and the API key; and any body, fuzzed, gets a JSON answer and never a 500."""

from __future__ import annotations

import json
import random

import anyio
import httpx2
import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.server import create_app
from agent.server.access import exposure_warning
from dsv4 import Engine, ModelConfig
from dsv4.loading.testing import write_random_checkpoint
from encoding import Tokenizer, encode_messages

pytestmark = pytest.mark.timeout(120)

RNG = random.Random()  # fresh data each run; the seed is in every failure message below
SEED = RNG.randrange(1 << 30)
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time.",
                                          "parameters": {"type": "object", "properties": {}}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}}
ASK = [{"role": "user", "content": "What time is it?"}]
KEY = "sk-test-" + "".join(RNG.choice("abcdef0123456789") for _ in range(24))


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.default()


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tokenizer):
    cfg = ModelConfig.tiny().model_copy(update={"vocab_size": tokenizer.vocab_size})
    return Engine(write_random_checkpoint(tmp_path_factory.mktemp("ckpt"), cfg, seed=SEED), device="cpu",
                  dtype=torch.float32)


@pytest.fixture(scope="module")
def server(engine, tokenizer, live_server):
    app = create_app(engine, tokenizer, model_name="tiny")
    return live_server(app), app.state.server


@pytest.fixture(scope="module")
def fuzz_client(engine, tokenizer):
    """In process (no sockets): hypothesis calls it many times."""
    from starlette.testclient import TestClient

    with TestClient(create_app(engine, tokenizer, model_name="tiny"), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def client(server):
    with httpx2.Client(base_url=server[0], timeout=60) as c:
        yield c


def post(client, path: str, body: dict, status: int = 200) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == status, f"seed {SEED}: {r.status_code} {r.text}"
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


def events(client, path: str, body: dict) -> list[dict]:
    """The data events of a stream (parsed), which must end with [DONE]."""
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        data = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
    assert data[-1] == "[DONE]" and "[DONE]" not in data[:-1]
    return [json.loads(d) for d in data[:-1]]


def first_logits(engine, prompt: list[int]) -> torch.Tensor:
    async def run():
        session = engine.new_session()
        try:
            return await session.aappend(prompt)
        finally:
            session.close()

    return anyio.run(run)


# ---- strictness and errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": [1, 2], "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": [1, 2], "temperature": "1"}, "temperature"),
    ("/v1/completions", {"prompt": [1, 2], "n": 1.0}, "n"),
    ("/v1/completions", {"prompt": [1, True]}, "prompt.1"),
    ("/v1/completions", {"prompt": [1, 2], "seed": 2**64}, "seed"),
    ("/v1/completions", {"prompt": [1, 2], "seed": -(2**63) - 1}, "seed"),
    ("/v1/completions", {"prompt": [1, 2], "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": [1, 2], "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"messages": ASK, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": "a string"}}]}, "tools.0.function.parameters"),
    ("/v1/chat/completions", {"messages": ASK, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": ["a"]}}}]}, "tools.0.function.parameters"),
    ("/v1/chat/completions", {"messages": ASK, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "array"}}}]}, "tools.0.function.parameters"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://x/y.png"}}]}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
     "messages.0.content.0.text"),
    ("/v1/chat/completions", {"messages": ASK, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": ASK, "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": ASK, "tools": [CLOCK], "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ("/v1/chat/completions", {"messages": ASK, "tools": [CLOCK], "tool_choice": "required",
                              "dsml_constraint": False}, "tool_choice"),
    ("/v1/chat/completions", {"messages": ASK, "tools": [CLOCK], "response_format": {"type": "json_object"}},
     "response_format"),
    ("/v1/chat/completions", {"messages": ASK, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "^a"}}}}}},
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"messages": ASK, "response_format": {"type": "yaml"}}, "response_format"),
])
def test_wrong_types_and_values_are_400s_naming_the_field(client, path, body, param):
    error = post(client, path, {"max_tokens": 1, **body}, status=400)["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    if param.startswith("response_format.json_schema"):
        assert "'pattern'" in error["message"] and error["code"] == "unsupported_schema"


def test_malformed_bodies_unknown_routes_and_models_are_json_errors(client):
    for raw, fragment in ((b'{"prompt": "\\ud800", "max_tokens": 1}', "surrogate"), (b"{not json", "not valid JSON"),
                          (b"[1, 2]", "JSON object"), (b"", "empty")):
        r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = client.get("/v1/completions")
    assert r.status_code == 405 and "GET" in r.json()["error"]["message"]
    assert client.get("/v1/models/tiny").json() == client.get("/v1/models").json()["data"][0]
    r = client.get("/v1/models/gpt-4o")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_an_engine_failure_is_a_json_500_and_a_failing_stream_ends_with_an_error_then_done(client, server, monkeypatch):
    real = server[1].run

    async def failing(gen):
        async for token in real(gen):
            yield token
            raise RuntimeError("the GPU caught fire")

    monkeypatch.setattr(server[1], "run", failing)
    r = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4})
    assert r.status_code == 500 and "GPU caught fire" in r.json()["error"]["message"]
    for path, body in (("/v1/completions", {"prompt": [1, 2, 3]}), ("/v1/chat/completions", {"messages": ASK})):
        data = events(client, path, {**body, "max_tokens": 4})
        assert data[-1]["error"]["type"] == "server_error" and "GPU caught fire" in data[-1]["error"]["message"]
        assert all("choices" in d for d in data[:-1])


# ---- request features -----------------------------------------------------------------------------------------
def test_text_parts_and_reasoning_effort_levels_render_as_documented(client, tokenizer):
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be terse."},
                                            {"type": "text", "text": "Really."}]},
             {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    plain = [{"role": "system", "content": "Be terse.\nReally."}, {"role": "user", "content": "hi"}]
    levels = {None: ("thinking", "max"), "none": ("chat", None), "minimal": ("chat", None),
              "low": ("thinking", "high"), "medium": ("thinking", "high"), "high": ("thinking", "high"),
              "xhigh": ("thinking", "max"), "max": ("thinking", "max")}
    for effort, (mode, rendered) in levels.items():
        body = {"messages": parts, "max_tokens": 1, "return_token_ids": True}
        if effort is not None:
            body["reasoning_effort"] = effort
        answer = post(client, "/v1/chat/completions", body)
        expected = tokenizer.encode(encode_messages(plain, mode, reasoning_effort=rendered))
        assert answer["choices"][0]["prompt_token_ids"] == expected, effort


def test_a_list_of_prompts_gives_one_choice_each_whole_or_streamed(client, tokenizer):
    prompts = [[RNG.randrange(tokenizer.vocab_size) for _ in range(12)] for _ in range(2)]
    whole = post(client, "/v1/completions", {"prompt": prompts, "max_tokens": 3, "temperature": 0,
                                             "return_token_ids": True})
    assert [c["index"] for c in whole["choices"]] == [0, 1]
    assert [c["prompt_token_ids"] for c in whole["choices"]] == prompts
    assert whole["usage"]["prompt_tokens"] == 24
    assert whole["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in whole["choices"])
    data = events(client, "/v1/completions", {"prompt": prompts, "max_tokens": 3, "temperature": 0,
                                              "return_token_ids": True, "stream_options": {"include_usage": True}})
    *chunks, usage = data
    for choice in whole["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == choice["index"]]
        assert [t for c in mine for t in c["token_ids"]] == choice["token_ids"], f"seed {SEED}"
        assert mine[-1]["finish_reason"] == choice["finish_reason"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
    text = post(client, "/v1/completions", {"prompt": ["Hello", "World"], "max_tokens": 1})
    assert len(text["choices"]) == 2


def test_usage_comes_as_its_own_last_chunk_only_when_asked(client):
    body = {"messages": ASK, "max_tokens": 3, "reasoning_effort": "none"}
    plain = events(client, "/v1/chat/completions", body)
    assert all("usage" not in c for c in plain) and plain[-1]["choices"][0]["finish_reason"] is not None
    counted = events(client, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert counted[-1]["choices"] == [] and counted[-1]["usage"]["completion_tokens"] <= 3
    assert counted[-2]["choices"][0]["finish_reason"] is not None and "usage" not in counted[-2]


def test_named_and_required_tool_choice_force_a_call_of_the_allowed_tool(client):
    for choice in ({"type": "function", "function": {"name": "get_time"}}, "required"):
        answer = post(client, "/v1/chat/completions", {
            "messages": ASK, "tools": [CLOCK] if choice == "required" else [CLOCK, WEATHER], "tool_choice": choice,
            "parallel_tool_calls": False, "reasoning_effort": "none", "max_tokens": 60, "seed": SEED})
        choice0 = answer["choices"][0]
        assert choice0["finish_reason"] == "tool_calls", f"seed {SEED}: {answer}"
        [call] = choice0["message"]["tool_calls"]
        assert call["function"] == {"name": "get_time", "arguments": "{}"}
    # none: the tools are shown, no call can be made (the DSML token is banned in the content)
    answer = post(client, "/v1/chat/completions", {"messages": ASK, "tools": [CLOCK], "tool_choice": "none",
                                                    "reasoning_effort": "none", "max_tokens": 4, "seed": SEED})
    assert "tool_calls" not in answer["choices"][0]["message"] and answer["usage"]["constrained_steps"] == 0


def test_json_schema_and_json_object_answers_parse(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "mode": {"enum": ["fast", "slow", 3]},
                                               "note": {"type": "null"}},
              "required": ["ok", "mode"]}
    for seed in RNG.sample(range(1 << 30), 3):
        answer = post(client, "/v1/chat/completions", {
            "messages": ASK, "reasoning_effort": "none", "max_tokens": 40, "seed": seed,
            "response_format": {"type": "json_schema", "json_schema": {"name": "status", "schema": schema}}})
        message = answer["choices"][0]["message"]
        jsonschema.validate(json.loads(message["content"]), schema)
        assert answer["choices"][0]["finish_reason"] == "stop", f"seed {seed}"
    answer = post(client, "/v1/completions", {"prompt": "Answer in JSON:", "max_tokens": 6, "seed": SEED,
                                              "response_format": {"type": "json_object"}})
    choice, usage = answer["choices"][0], answer["usage"]
    assert choice["text"].startswith("{") and usage["constrained_steps"] == usage["completion_tokens"]
    if choice["finish_reason"] == "stop":  # completions keep the EOS text
        assert isinstance(json.loads(choice["text"].removesuffix("<｜end▁of▁sentence｜>")), dict), f"seed {SEED}"


def test_logprobs_are_the_engine_distribution_whole_and_streamed(client, engine, tokenizer):
    prompt = [RNG.randrange(tokenizer.vocab_size) for _ in range(20)]
    expected = torch.log_softmax(first_logits(engine, prompt).float(), dim=-1)
    answer = post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 3,
                                              "return_token_ids": True})
    choice = answer["choices"][0]
    ids, logprobs = choice["token_ids"], choice["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(ids) == len(logprobs["tokens"]) == len(logprobs["text_offset"])
    assert logprobs["token_logprobs"][0] == pytest.approx(float(expected[ids[0]]), abs=1e-4)
    for lp, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
        assert len(top) <= 3 and lp == pytest.approx(max(top.values()), abs=1e-5)  # greedy: the best one
    assert logprobs["text_offset"][0] == 0
    chat = {"messages": ASK, "reasoning_effort": "none", "max_tokens": 4, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}
    whole = post(client, "/v1/chat/completions", chat)["choices"][0]["logprobs"]["content"]
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] == pytest.approx(e["top_logprobs"][0]["logprob"])
               for e in whole)
    assert all(bytes(e["bytes"]).decode(errors="replace") == e["token"] or "\ufffd" in e["token"] for e in whole)
    streamed = [e for c in events(client, "/v1/chat/completions", chat)
                if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == whole


def test_cache_salt_keeps_prefixes_apart(client, tokenizer):
    prompt = [RNG.randrange(tokenizer.vocab_size) for _ in range(30)]
    body = {"prompt": prompt, "max_tokens": 1}
    post(client, "/v1/completions", {**body, "cache_salt": "alice"})
    assert post(client, "/v1/completions", {**body, "cache_salt": "alice"})["usage"]["prompt_tokens_reused"] == 30
    assert post(client, "/v1/completions", {**body, "cache_salt": "bob"})["usage"]["prompt_tokens_reused"] == 0
    assert post(client, "/v1/completions", body)["usage"]["prompt_tokens_reused"] == 0
    reused = post(client, "/v1/completions", {**body, "cache_salt": "bob"})["usage"]
    assert reused["prompt_tokens_reused"] == reused["prompt_tokens_details"]["cached_tokens"] == 30


def test_an_api_key_is_required_on_every_route(engine, tokenizer, live_server):
    url = live_server(create_app(engine, tokenizer, model_name="tiny", api_key=KEY))
    with httpx2.Client(base_url=url, timeout=60) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/v1/nothing")):
                r = c.request(method, path, headers=headers, json={"prompt": [1], "max_tokens": 1})
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, path)
                assert r.headers["www-authenticate"] == "Bearer"
        r = c.post("/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, json={"prompt": [1], "max_tokens": 1})
        assert r.status_code == 200, r.text
    assert exposure_warning("0.0.0.0", None) and exposure_warning("10.1.2.3", None)
    assert exposure_warning("example.org", None) and not exposure_warning("0.0.0.0", KEY)
    assert not any(exposure_warning(h, None) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"))


# ---- fuzz: whatever the body, a JSON answer and never a 500 ---------------------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
FIELDS = ["prompt", "messages", "tools", "tool_choice", "response_format", "reasoning_effort", "temperature", "top_p",
          "seed", "stop", "stream", "stream_options", "logprobs", "top_logprobs", "n", "cache_salt", "model",
          "parallel_tool_calls", "return_token_ids", "dsml_constraint"]
GOOD = {"prompt": [1, 2, 3], "messages": ASK, "tools": [CLOCK], "tool_choice": "auto", "reasoning_effort": "none",
        "response_format": {"type": "json_object"}, "logprobs": True, "stream": True, "seed": 7}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       fields=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES | st.sampled_from(list(GOOD.values())),
                              max_size=5),
       keep=st.sets(st.sampled_from(list(GOOD)), max_size=4))
def test_any_body_gets_a_json_answer_never_a_500(fuzz_client, path, fields, keep):
    body = {**{k: GOOD[k] for k in keep}, **fields, "max_tokens": 1}
    r = fuzz_client.post(path, json=body)
    assert r.status_code in (200, 400, 404), (body, r.status_code, r.text)
    if r.headers["content-type"].startswith("text/event-stream"):
        data = [line[5:].strip() for line in r.text.splitlines() if line.startswith("data:")]
        assert data[-1] == "[DONE]" and all("internal error" not in d for d in data), (body, r.text)
    else:
        answer = r.json()
        assert ("error" in answer) == (r.status_code != 200), (body, answer)
