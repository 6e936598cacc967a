"""`dsv4-agent serve` over the engine's scheduler, on a tiny random DSV4 checkpoint (full tokenizer
vocabulary): a thinking-mode chat's second turn reuses the prompt it shares with the first, a client
that disconnects (streaming or not) frees its sequence within one scheduler step, a request's deadline
is a 504, a request that would have to wait for KV memory with no room to wait is a 429, and a chat
request naming no limit decodes at most the server's default."""

from __future__ import annotations

import random
import time

import httpx2
import pytest
import torch

from agent.server import create_app
from dsv4 import Engine, ModelConfig, RuntimeOptions
from dsv4.loading.testing import write_random_checkpoint
from encoding import Tokenizer

pytestmark = pytest.mark.timeout(120)

RNG = random.Random()  # fresh data each run; the seed is in every failure message below
SEED = RNG.randrange(1 << 30)
LONG = 20_000  # tokens a request asks for: far more than it runs before its client leaves


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.default()


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer):
    cfg = ModelConfig.tiny().model_copy(update={"vocab_size": tokenizer.vocab_size})
    path = write_random_checkpoint(tmp_path_factory.mktemp("ckpt"), cfg, seed=SEED)
    return Engine(path, device="cpu", dtype=torch.float32).model


@pytest.fixture(scope="module")
def endless(model):
    """An engine without an end-of-sequence token: a request runs until it is stopped."""
    return Engine(model, eos_token_ids=())


@pytest.fixture(scope="module")
def server(endless, tokenizer, live_server):
    app = create_app(endless, tokenizer, model_name="tiny", default_max_tokens=5)
    return live_server(app), app.state.server


def random_ids(n: int, tokenizer) -> list[int]:
    return [RNG.randrange(3, tokenizer.vocab_size) for _ in range(n)]


def wait_idle(server, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while server.pool.busy:
        assert time.monotonic() < deadline, "the request did not end"
        time.sleep(0.01)
    server.engine.scheduler.call(lambda: None)  # the step that ended it has written its record


def freed_within_a_step(server, prompt: list[int]) -> None:
    (session,) = [s for s in server.pool.sessions if s.tokens[: len(prompt)] == tuple(prompt)]
    assert len(prompt) < len(session) < len(prompt) + LONG, f"seed {SEED}"
    records = list(server.engine.scheduler.records)
    ((end, asked),) = [(r, asked) for r in records for sid, asked in r.cancelled if sid == session.sid]
    assert end.index <= asked + 1 and (session.sid, "cancelled") in end.finished
    assert not [r for r in records if session.sid in r.decode and r.index > asked]


def test_turn_two_of_a_thinking_chat_reuses_the_prompt_it_shares_with_turn_one(model, tokenizer, live_server):
    url = live_server(create_app(Engine(model), tokenizer, model_name="tiny"))
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}]
    with httpx2.Client(base_url=url, timeout=60) as c:
        body = {"messages": messages, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
        first = c.post("/v1/chat/completions", json=body).json()
        answer = first["choices"][0]["message"]
        assert first["choices"][0]["prompt_token_ids"][-1] == tokenizer.think_start_id   # thinking mode
        history = messages + [{"role": "assistant", "content": answer["content"] or "",
                               "reasoning_content": answer["reasoning_content"] or ""},
                              {"role": "user", "content": "Another one."}]
        second = c.post("/v1/chat/completions", json={**body, "messages": history}).json()
    one, two = first["choices"][0]["prompt_token_ids"], second["choices"][0]["prompt_token_ids"]
    shared = next(i for i, (a, b) in enumerate(zip(one, two)) if a != b)
    assert shared == len(one) - 1  # the re-rendered history drops the reasoning: <think> becomes </think>
    assert second["usage"]["prompt_tokens_reused"] >= 0.9 * shared, f"seed {SEED}"


def test_a_disconnected_stream_frees_its_sequence_within_a_step(server, tokenizer):
    prompt = random_ids(40, tokenizer)
    with httpx2.Client(base_url=server[0], timeout=60) as c, c.stream(
            "POST", "/v1/completions", json={"prompt": prompt, "max_tokens": LONG, "stream": True}) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith("data:"))   # decoding: then hang up
    wait_idle(server[1])
    freed_within_a_step(server[1], prompt)


def test_a_client_that_gives_up_frees_its_sequence_within_a_step(server, tokenizer):
    prompt = random_ids(40, tokenizer)
    with pytest.raises(httpx2.TimeoutException):
        httpx2.post(f"{server[0]}/v1/completions", json={"prompt": prompt, "max_tokens": LONG}, timeout=1.0)
    wait_idle(server[1])
    freed_within_a_step(server[1], prompt)


def test_a_request_past_its_deadline_is_a_504(endless, tokenizer, live_server):
    url = live_server(create_app(endless, tokenizer, model_name="tiny", request_timeout_s=0.3))
    r = httpx2.post(f"{url}/v1/completions", json={"prompt": random_ids(20, tokenizer), "max_tokens": LONG},
                    timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"


def test_a_request_that_cannot_wait_for_kv_memory_is_a_429(model, tokenizer, live_server):
    def resident(prompt: list[int], turn: int) -> int:
        """What a session holds after a request decoding `turn` tokens of `prompt`."""
        probe = Engine(model, eos_token_ids=())
        with httpx2.Client(base_url=live_server(create_app(probe, tokenizer, model_name="tiny")), timeout=60) as c:
            assert c.post("/v1/completions", json={"prompt": prompt, "max_tokens": turn}).status_code == 200
        return probe.memory().resident_bytes

    running, other = random_ids(1000, tokenizer), random_ids(1000, tokenizer)
    held = resident(running, 8)      # its buffers have grown for its next 1000 tokens by then
    # room beside the running request for half of what the other one needs: it would have to wait
    busy = Engine(model, eos_token_ids=(), kv_budget_bytes=held + resident(other, 1) // 2,
                  options=RuntimeOptions(max_waiting=0))
    url = live_server(create_app(busy, tokenizer, model_name="tiny"))
    with httpx2.Client(base_url=url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": running, "max_tokens": 900, "stream": True}) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data:"))
            for _ in range(8):
                next(lines)
            refused = c.post("/v1/completions", json={"prompt": other, "max_tokens": 1})
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "engine_busy", refused.text
        # the running one gone (its client hung up), the same request is served
        assert c.post("/v1/completions", json={"prompt": other, "max_tokens": 1}).status_code == 200


def test_chat_without_a_limit_decodes_the_default_at_most(server):
    r = httpx2.post(f"{server[0]}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                    timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    assert r.json()["choices"][0]["finish_reason"] == "length"
