"""EngineBackend on a tiny random DSV4 checkpoint: each turn prefills only its new tokens, the session
holds exactly the conversation, resume rebuilds the same session, seeded sampling is reproducible."""

from __future__ import annotations

import anyio
import pytest
import torch

from agent import Agent, AgentConfig, ExitStatus, completion
from agent.backends.engine import EngineBackend
from agent.history import History
from agent.trajectory import EngineCall, RunResumed, read_events
from dsv4 import Engine, ModelConfig
from dsv4.loading.testing import write_random_checkpoint
from encoding import AppendOnlyEncoder, Tokenizer
from tools import tool

pytestmark = pytest.mark.anyio

TURNS = [
    completion("Note it.", calls=[("note", {"text": "alpha"})]),
    completion("Two at once.", calls=[("note", {"text": "beta"}), ("note", {"text": "gamma"})]),
    completion("Done.", content="noted three"),
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    cfg = ModelConfig.tiny().model_copy(update={"vocab_size": Tokenizer.default().vocab_size})
    path = write_random_checkpoint(tmp_path_factory.mktemp("ckpt"), cfg, seed=1)
    return Engine(path, device="cpu", dtype=torch.float32)


def note_tool(delay_s: float = 0.0):
    @tool
    async def note(text: str) -> str:
        """Write a note down."""
        await anyio.sleep(delay_s)
        return f"noted {text}"

    return note


def forced_agent(engine, tmp_path, delay_s=0.0):
    return Agent(backend=EngineBackend(engine, forced=TURNS), tools=[note_tool(delay_s)], output_dir=tmp_path)


async def test_each_turn_prefills_only_its_new_tokens(engine, tmp_path):
    agent = forced_agent(engine, tmp_path)
    result = await agent.run("note alpha, beta and gamma")
    assert result.status is ExitStatus.completed and result.final_answer == "noted three"
    events = read_events(result.trajectory_path)
    prompt = events[0].prompt_tokens
    calls = [e for e in events if isinstance(e, EngineCall)]
    assert calls[0].usage.prefill_new == prompt and calls[0].usage.prefill_reused == 0
    for before, call in zip(calls, calls[1:]):
        # reused = everything the session held except the previous turn's last drawn token (not yet fed)
        assert call.usage.prefill_reused == before.backend_info["session_tokens"] - 1
        appended = call.backend_info["session_tokens"] - len(call.token_ids) - before.backend_info["session_tokens"]
        assert call.usage.prefill_new == appended + 1  # the tool results, and that one pending token
        assert call.usage.prefill_new < 80 < prompt
    assert all(c.backend_info["forced_tokens"] == len(c.token_ids) for c in calls)
    # the session holds exactly the conversation as the encoder rebuilds it from the trajectory
    rebuilt = History.from_events(events).replay_into(AppendOnlyEncoder(Tokenizer.default()))
    assert calls[-1].backend_info["session_tokens"] == len(rebuilt)


async def test_resume_rebuilds_the_same_session(engine, tmp_path):
    straight = await forced_agent(engine, tmp_path / "a").run("note alpha, beta and gamma")
    agent = forced_agent(engine, tmp_path / "b", delay_s=0.5)
    box = {}
    async with anyio.create_task_group() as group:

        async def run():
            box["result"] = await agent.run("note alpha, beta and gamma")

        group.start_soon(run)
        with anyio.fail_after(60):
            while not list((tmp_path / "b").glob("*/trajectory.jsonl")) or not any(
                getattr(e, "event", "") == "tool_call" and e.step == 2
                for e in read_events(next((tmp_path / "b").glob("*/trajectory.jsonl")))
            ):
                await anyio.sleep(0.05)
        agent.cancel()
    assert box["result"].status is ExitStatus.interrupted
    resumed = await forced_agent(engine, tmp_path / "b").resume("last")
    assert resumed.status is ExitStatus.completed
    a = [e for e in read_events(straight.trajectory_path) if isinstance(e, EngineCall)]
    b_events = read_events(resumed.trajectory_path)
    b = [e for e in b_events if isinstance(e, EngineCall)]
    (resume_event,) = [e for e in b_events if isinstance(e, RunResumed)]
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    # the session holds the resumed conversation as the encoder rebuilds it from the trajectory (the
    # call cut off by the cancel ran again, its result noting so: more tokens than the straight run)
    rebuilt = History.from_events(b_events).replay_into(AppendOnlyEncoder(Tokenizer.default()))
    assert b[-1].backend_info["session_tokens"] == len(rebuilt) > a[-1].backend_info["session_tokens"]
    # one full prefill rebuilt the session; the next turn reused all of it
    assert b[-1].usage.prefill_reused == resume_event.reprefill_tokens


async def test_unforced_sampling_is_reproducible_with_a_seed(engine, tmp_path):
    def agent(sub):
        return Agent(
            backend=EngineBackend(engine, seed=7),
            tools=[note_tool()],
            config=AgentConfig(max_turn_tokens=12, max_steps=2),
            output_dir=tmp_path / sub,
        )

    one, two = await agent("one").run("say anything"), await agent("two").run("say anything")
    ids_one = [e.token_ids for e in read_events(one.trajectory_path) if isinstance(e, EngineCall)]
    ids_two = [e.token_ids for e in read_events(two.trajectory_path) if isinstance(e, EngineCall)]
    assert ids_one == ids_two and all(ids_one)
    # random weights write no valid turn: the run ends on a stop rule, never by crashing
    assert one.status in (ExitStatus.max_steps, ExitStatus.format_error, ExitStatus.completed)


async def test_a_checkpoint_with_a_small_vocabulary_is_refused(tmp_path):
    path = write_random_checkpoint(tmp_path / "small", ModelConfig.tiny(), seed=0)
    agent = Agent(backend=EngineBackend(str(path)), tools=[], output_dir=tmp_path / "runs")
    result = await agent.run("hi")
    assert result.status is ExitStatus.error and "vocabulary" in result.message


async def test_a_full_context_ends_the_run_with_its_own_status(tmp_path):
    cfg = ModelConfig.tiny().model_copy(update={"vocab_size": Tokenizer.default().vocab_size})
    path = write_random_checkpoint(tmp_path / "ckpt", cfg, seed=2)
    first = await forced_agent(Engine(path, device="cpu", dtype=torch.float32), tmp_path / "a").run("note")
    calls = [e for e in read_events(first.trajectory_path) if isinstance(e, EngineCall)]
    room = calls[0].backend_info["session_tokens"] + 10  # the prompt and the first turn fit, the second never does
    small = Engine(path, device="cpu", dtype=torch.float32, max_context=room)
    result = await forced_agent(small, tmp_path / "b").run("note")
    assert result.status is ExitStatus.context_full and result.exit_code == 8
    assert str(room) in result.message
    events = read_events(result.trajectory_path)
    assert events[-1].event == "exit" and events[-1].status == "context_full"
    assert sum(isinstance(e, EngineCall) for e in events) >= 1


async def test_agents_in_one_process_decode_together(engine, tmp_path):
    """Two Agent.run on one engine go through its one scheduler: their turns share decode steps."""
    thinking = " ".join(f"step {i}." for i in range(12))  # long turns: the runs overlap for many steps
    turns = [completion(thinking, calls=[("note", {"text": "alpha"})]), completion(thinking, content="noted")]

    def agent(sub):
        return Agent(backend=EngineBackend(engine, forced=turns), tools=[note_tool()], output_dir=tmp_path / sub)

    alone = await agent("alone").run("note alpha")
    results = {}
    start = engine.scheduler.step_index
    async with anyio.create_task_group() as group:
        for name in ("a", "b"):
            async def run(name=name):
                results[name] = await agent(name).run("note alpha")

            group.start_soon(run)
    expected = [e.token_ids for e in read_events(alone.trajectory_path) if isinstance(e, EngineCall)]
    for result in results.values():
        assert result.status is ExitStatus.completed
        assert [e.token_ids for e in read_events(result.trajectory_path) if isinstance(e, EngineCall)] == expected
    engine.scheduler.call(lambda: None)  # the step running now has written its record
    steps = [r for r in engine.scheduler.records if r.index > start and r.decode]
    both = [r for r in steps if len(r.decode) == 2]
    assert len(both) >= len(steps) // 2  # most decode steps served both runs at once
