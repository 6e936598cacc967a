"""DSML-constrained decoding end to end: the tiny random DSV4 model (full vocabulary) is steered into a
tool call (a forced prefix up to `<｜DSML｜invoke name="`), then samples freely. Under the constraint
the call always parses with a declared tool, declared parameters and the right string flags, and the
tools run; without it, the same model never writes a valid call."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import torch

from agent import Agent, AgentConfig, completion
from agent.backends.engine import ConstrainedDecoding, EngineBackend
from agent.history import prompt_messages
from agent.spec import BackendSpec, build_backend
from agent.trajectory import EngineCall, read_events
from dsv4 import Engine, ModelConfig
from dsv4.loading.testing import write_random_checkpoint
from encoding import AppendOnlyEncoder, DSMLConstraint, DSMLParseError, StreamParser, Tokenizer
from encoding.dsml import render_tools_block
from encoding.tokens import EOS
from tools import tool

pytestmark = pytest.mark.anyio

PREFIX = '</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="'
SEEDS = (11, 12, 13, 14)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    cfg = ModelConfig.tiny().model_copy(update={"vocab_size": Tokenizer.default().vocab_size})
    path = write_random_checkpoint(tmp_path_factory.mktemp("ckpt"), cfg, seed=3)
    return Engine(path, device="cpu", dtype=torch.float32)


@tool
async def set_mode(mode: Literal["fast", "slow", "fastest"], verbose: bool = False) -> str:
    """Set the mode."""
    return f"mode {mode} verbose {verbose}"


@tool
async def set_mode_all(level: Literal[1, 2, 3]) -> str:
    """Set every mode (a name that extends another)."""
    return f"level {level}"


@tool
async def lookup(city: Literal["Paris", "Zürich", "東京"], metric: bool) -> str:
    """Look a city up (multi-byte values)."""
    return f"{city} {metric}"


@tool
async def ping() -> str:
    """No parameters."""
    return "pong"


TOOLS = [set_mode, set_mode_all, lookup, ping]


class PrefixThen:
    """Test steering: forces PREFIX at the start of each turn, then hands over to `inner` (the backend's
    ConstrainedDecoding, fed every id including the prefix) or to free sampling."""

    def __init__(self, prefix: list[int], inner):
        self.prefix, self.inner = prefix, inner

    def start_turn(self, thinking: bool) -> None:
        if self.inner is not None:
            self.inner.start_turn(thinking)

    def __call__(self, generated, logits):
        if self.inner is not None:
            logits = self.inner(generated, logits)
        if len(generated) < len(self.prefix):
            forced = torch.full_like(logits, float("-inf"))
            forced[self.prefix[len(generated)]] = 0.0
            return forced
        return logits

    def info(self):
        return self.inner.info() if self.inner is not None else {}


class Steered(EngineBackend):
    async def start(self, tokenizer):
        await super().start(tokenizer)
        self.prefix = tokenizer.encode(PREFIX)
        self.constrained = PrefixThen(self.prefix, None)  # wrapped around the constraint when it is on

    def _constrain_to(self, prompt):
        super()._constrain_to(prompt)
        self.constrained = PrefixThen(self.prefix, self.constrained)


async def run_steered(engine, tmp_path, seed: int, constrain: bool):
    agent = Agent(
        backend=Steered(engine, seed=seed, constrain=constrain),
        tools=TOOLS,
        config=AgentConfig(max_steps=1, max_turn_tokens=160),
        output_dir=tmp_path / f"{seed}-{constrain}",
    )
    result = await agent.run("set a mode")
    (call,) = [e for e in read_events(result.trajectory_path) if isinstance(e, EngineCall)]
    return call


def check_call(name: str, arguments: dict, text: str) -> None:
    schema = {t.name: t.openai_schema()["function"]["parameters"] for t in TOOLS}[name]
    props = schema["properties"]
    assert set(schema.get("required", ())) <= set(arguments) <= set(props)
    for key, value in arguments.items():
        assert value in props[key]["enum"] if "enum" in props[key] else isinstance(value, bool)
        flag = "true" if isinstance(value, str) else "false"
        assert f'name="{key}" string="{flag}">' in text


def strict_prefix_error(text: str) -> str | None:
    """Why `text` is not the start of a completion the official parser accepts (None: it is)."""
    parser = StreamParser("thinking", strict=True)
    try:
        parser.feed(text)
        if text.endswith(EOS):
            parser.close()
    except DSMLParseError as e:
        return str(e)
    return None


async def test_a_steered_random_model_always_writes_valid_calls_under_the_constraint(engine, tmp_path):
    ended = 0
    for seed in SEEDS:
        call = await run_steered(engine, tmp_path, seed, constrain=True)
        # every token stayed on the grammar: the official parser accepts the output (cut or not)
        assert strict_prefix_error(call.text) is None, (seed, call.text)
        assert call.calls and call.backend_info["constrained_steps"] > 0, (seed, call.text)
        assert not call.backend_info["constraint_released"]
        for parsed in call.calls:  # every completed call names a declared tool and its parameters
            assert parsed.error is None, (seed, parsed.error)
            check_call(parsed.name, parsed.arguments, call.text)
        ended += call.stop_reason == "eos"  # a random model may also write calls until the turn's cap
    assert ended, "no seed closed its tool block"


async def test_without_the_constraint_the_same_model_writes_no_valid_call(engine, tmp_path):
    for seed in SEEDS:
        call = await run_steered(engine, tmp_path, seed, constrain=False)
        assert call.calls or call.incomplete_call, (seed, call.text)  # the steered call was attempted
        assert not any(c.error is None for c in call.calls), (seed, call.text)  # and never came out valid
        assert "constrained_steps" not in call.backend_info


def test_the_processor_masks_choice_points_and_moves_markup_mass_onto_think_end():
    tok = Tokenizer.default()
    processor = ConstrainedDecoding(DSMLConstraint(tok, [t.openai_schema() for t in TOOLS]))
    processor.start_turn(thinking=True)
    logits = torch.randn(tok.vocab_size, dtype=torch.float64)
    reasoning = tok.encode("plan it\n\n<")
    out = processor(reasoning, logits)
    moved = [tok.think_end_id, tok.dsml_id, tok.eos_id]
    assert torch.isclose(out[tok.think_end_id], torch.logsumexp(logits[moved], 0), rtol=1e-12, atol=0)
    assert out[tok.dsml_id] == out[tok.eos_id] == out[tok.bos_id] == float("-inf")
    others = torch.ones(tok.vocab_size, dtype=torch.bool)
    others[moved + [tok.bos_id, tok.think_start_id]] = False
    assert torch.equal(out[others], logits[others])  # free text keeps the model's distribution
    ids = reasoning + tok.encode('</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="set_mode')
    out = processor(ids, logits)
    allowed = set(processor.constraint.allowed())
    finite = set(torch.nonzero(out > float("-inf")).flatten().tolist())
    assert finite == allowed and {tok.decode([i]) for i in allowed} >= {"_", '">\n'}
    assert torch.equal(out[sorted(allowed)], logits[sorted(allowed)])
    assert processor.info() == {"constrained_steps": 1, "constraint_released": False}


async def test_a_resumed_session_takes_its_tools_from_the_prompt_only(engine):
    tok = Tokenizer.default()
    encoder = AppendOnlyEncoder(tok)
    prompt = encoder.prompt(prompt_messages("sys", [t.openai_schema() for t in TOOLS], "go"))
    turn = tok.encode(completion("r", calls=[("ping", {})]))
    encoder.record_completion(turn)
    quoted = render_tools_block([{"name": "evil", "parameters": {"properties": {}}}])  # a tool result quoting one
    followup = encoder.append([{"role": "tool", "tool_call_id": "call_0_0", "content": quoted}])
    backend = EngineBackend(engine)
    await backend.start(tok)
    await backend.restore(prompt + turn + followup, turns_done=1)
    assert set(backend.constrained.constraint.tools) == {t.name for t in TOOLS}
    await backend.close()


def test_the_switch_reaches_the_engine_backend(tmp_path):
    from typer.testing import CliRunner

    from agent.cli import app

    ckpt = tmp_path / "broken-checkpoint"        # the layout's file names, content that fails to load
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors.index.json").write_text("{}")
    for flags, expected in (([], True), (["--no-constrain"], False)):
        out = tmp_path / f"runs{expected}"
        result = CliRunner().invoke(app, ["run", "t", "--model", str(ckpt), "--sandbox", "none", "-o", str(out), *flags])
        assert result.exit_code == 1, result.output  # it fails to load; the spec is saved all the same
        (trajectory,) = out.glob("*/trajectory.jsonl")
        assert read_events(trajectory)[0].spec["backend"]["constrain"] is expected
    assert build_backend(BackendSpec(kind="engine", model="/ckpt")).constrain is True
    assert build_backend(BackendSpec(kind="engine", model="/ckpt", constrain=False)).constrain is False
    assert json.loads(BackendSpec(kind="engine", model="/x").model_dump_json())["constrain"] is True
