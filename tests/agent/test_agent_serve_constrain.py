"""DSML-constrained decoding on the server's `/v1/chat/completions`, on a tiny random DSV4 checkpoint with
the full tokenizer vocabulary (served in-process as in test_agent_serve.py). A spy on `Session.generate`
sees the logits processors each request hands the engine: a chat request with tools gets one
`ConstrainedDecoding` built from exactly its tools, starting in the reasoning (thinking mode) or the
content (chat mode) as the rendered prompt says; `"dsml_constraint": false`, no tools, and
/v1/completions get none. A random model never tries a tool call by itself, so an adversary processor
placed before the constraint pushes the DSML token and EOS: constrained, that mass closes the reasoning
and no DSML token leaks; unconstrained, the DSML token comes first."""

from __future__ import annotations

import random

import httpx2
import pytest
import torch

from agent.backends.engine import ConstrainedDecoding
from agent.server import create_app
from dsv4 import Engine, ModelConfig
from dsv4.runtime.session import Session
from dsv4.loading.testing import write_random_checkpoint
from encoding import Tokenizer
from encoding.tokens import DSML

pytestmark = pytest.mark.timeout(60)

RNG = random.Random()  # fresh data each run; the seed is in every failure message below
SEED = RNG.randrange(1 << 30)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.default()


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, tokenizer, live_server):
    cfg = ModelConfig.tiny().model_copy(update={"vocab_size": tokenizer.vocab_size})
    engine = Engine(write_random_checkpoint(tmp_path_factory.mktemp("ckpt"), cfg, seed=SEED),
                    device="cpu", dtype=torch.float32)
    return live_server(create_app(engine, tokenizer, model_name="tiny"))


@pytest.fixture
def client(base_url):
    with httpx2.Client(base_url=base_url, timeout=30) as c:
        yield c


class Spy:
    """Wraps `Session.generate`: records each call's processors (and the constraint's phase once the
    server has started its turn); `push` puts an adversary before them that favours these ids."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[tuple, str | None]] = []
        self.push: tuple[int, ...] = ()
        real = Session.generate

        def generate(session, *args, logits_processors=(), **kwargs):
            constrained = [p for p in logits_processors if isinstance(p, ConstrainedDecoding)]
            self.calls.append((tuple(logits_processors), constrained[0].constraint.phase if constrained else None))
            if self.push:
                logits_processors = (self.adversary, *logits_processors)
            return real(session, *args, logits_processors=logits_processors, **kwargs)

        monkeypatch.setattr(Session, "generate", generate)

    def adversary(self, generated, logits):
        out = logits.clone()
        out[list(self.push)] += 1e4
        return out


def chat(client, **body):
    r = client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 3, "seed": SEED, **body})
    assert r.status_code == 200, f"seed {SEED}: {r.text}"
    return r.json()


@pytest.mark.parametrize(("effort", "phase"), [("max", "reasoning"), ("none", "content")])
def test_chat_with_tools_is_constrained_to_exactly_its_tools(client, monkeypatch, effort, phase):
    spy = Spy(monkeypatch)
    answer = chat(client, tools=[WEATHER, CLOCK], reasoning_effort=effort)
    [(processors, started_in)] = spy.calls
    [constrained] = processors
    assert isinstance(constrained, ConstrainedDecoding), f"seed {SEED}"
    assert set(constrained.constraint.tools) == {"get_weather", "get_time"}
    assert set(constrained.constraint.tools["get_weather"].required) == {"city"}
    assert started_in == phase  # thinking mode ends the prompt with <think>; chat mode does not
    assert answer["usage"]["constrained_steps"] == constrained.constrained_steps


def test_no_constraint_when_turned_off_without_tools_or_on_completions(client, monkeypatch, tokenizer):
    spy = Spy(monkeypatch)
    off = chat(client, tools=[WEATHER], dsml_constraint=False)
    plain = chat(client)
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "seed": SEED})
    assert r.status_code == 200, r.text
    assert [processors for processors, _ in spy.calls] == [(), (), ()]
    for usage in (off["usage"], plain["usage"], r.json()["usage"]):
        assert "constrained_steps" not in usage


def test_a_tool_name_dsml_cannot_write_is_a_400(client):
    bad = {"type": "function", "function": {"name": 'say"hi', "parameters": {}}}
    r = client.post("/v1/chat/completions", json={"messages": ASK, "tools": [bad], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text


def test_pushed_dsml_and_eos_close_the_reasoning_only_when_constrained(client, monkeypatch, tokenizer):
    spy = Spy(monkeypatch)
    dsml = tokenizer.special_ids[DSML]
    spy.push = (dsml, tokenizer.eos_id)
    for seed in RNG.sample(range(1 << 30), 3):
        on = chat(client, tools=[WEATHER], seed=seed, temperature=1.0, return_token_ids=True)
        ids = on["choices"][0]["token_ids"]
        # the adversary's mass moved onto </think>; in the content the DSML token is banned (no "\n\n<")
        assert ids[0] == tokenizer.think_end_id and dsml not in ids, f"seed {SEED}/{seed}: {ids}"
        off = chat(client, tools=[WEATHER], seed=seed, temperature=1.0, return_token_ids=True,
                   dsml_constraint=False)
        assert off["choices"][0]["token_ids"][0] in spy.push, f"seed {SEED}/{seed}"
