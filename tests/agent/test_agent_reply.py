"""Agent.reply: a finished run's conversation continues with a user turn. On a resident session the
turn prefills only the message's tokens; in a new process the session comes back from the saved KV
session (engine) or from the trajectory; an interrupted run is resumed first."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import torch

from agent import Agent, AgentConfig, ExitStatus, ScriptedBackend, completion
from agent.backends.engine import EngineBackend
from agent.history import History
from agent.trajectory import EngineCall, ExitEvent, RunResumed, UserMessage, read_events
from dsv4 import Engine, ModelConfig
from dsv4.loading.testing import write_random_checkpoint
from encoding import AppendOnlyEncoder, Tokenizer
from tools import tool

pytestmark = pytest.mark.anyio

TURNS = [
    completion("Easy.", content="first answer"),
    completion("Again.", content="second answer"),
    completion("Once more.", content="third answer"),
]


def message_ids(trajectory: Path, upto_step: int, message: str) -> list[int]:
    """The ids a reply after step `upto_step` appends, rendered independently of the loop: the recorded
    conversation through an AppendOnlyEncoder, then the message."""
    events = read_events(trajectory)
    history = History.from_events([e for e in events if not (isinstance(e, EngineCall) and e.step > upto_step)])
    history.messages = [m for m in history.messages if m.step < upto_step]
    encoder = AppendOnlyEncoder(Tokenizer.default())
    history.replay_into(encoder)
    return encoder.append([{"role": "user", "content": message}])


async def test_a_resident_reply_prefills_only_the_message(tmp_path):
    agent = Agent(ScriptedBackend(TURNS), output_dir=tmp_path, config=AgentConfig(max_steps=1), resident=True)
    first = await agent.run("say something")
    assert first.status is ExitStatus.completed and first.final_answer == "first answer"
    second = await agent.reply(first.run_id, "and again?")
    await agent.close()
    assert second.status is ExitStatus.completed and second.final_answer == "second answer"
    assert second.steps == 2  # max_steps=1 counts the reply's own steps

    events = read_events(second.trajectory_path)
    step1, step2 = [e for e in events if isinstance(e, EngineCall)]
    appended = message_ids(second.trajectory_path, 1, "and again?")
    assert step2.usage.prefill_new == len(appended) < 20
    assert step2.usage.prefill_reused == events[0].prompt_tokens + len(step1.token_ids)
    assert not [e for e in events if isinstance(e, RunResumed)]
    assert [(m.step, m.text) for m in events if isinstance(m, UserMessage)] == [(1, "and again?")]
    assert [e.status for e in events if isinstance(e, ExitEvent)] == ["completed", "completed"]


async def test_a_reply_in_a_new_agent_rebuilds_the_session_from_the_trajectory(tmp_path):
    first = await Agent(ScriptedBackend(TURNS), output_dir=tmp_path).run("say something")
    second = await Agent(ScriptedBackend(TURNS), output_dir=tmp_path).reply(first.run_id, "and again?")
    third = await Agent(ScriptedBackend(TURNS), output_dir=tmp_path).reply(first.run_id, "once more?")
    assert (second.final_answer, third.final_answer) == ("second answer", "third answer")

    events = read_events(third.trajectory_path)
    calls = [e for e in events if isinstance(e, EngineCall)]
    resumes = [e for e in events if isinstance(e, RunResumed)]
    # each new agent prefilled the recorded conversation once, then only the message
    assert [r.reprefill_tokens for r in resumes] == [
        events[0].prompt_tokens + len(calls[0].token_ids),
        calls[1].usage.prefill_reused + calls[1].usage.prefill_new + len(calls[1].token_ids),
    ]
    assert calls[2].usage.prefill_new == len(message_ids(third.trajectory_path, 2, "once more?"))


async def test_an_interrupted_run_is_resumed_before_the_message(tmp_path):
    done: list[str] = []

    @tool
    async def step(label: str, seconds: float = 0.0) -> str:
        """Record a label, after sleeping."""
        await anyio.sleep(seconds)
        done.append(label)
        return f"did {label}"

    turns = [
        completion("Slow step.", calls=[("step", {"label": "one", "seconds": 30})]),
        completion("Done.", content="one is done"),
        completion("Reply.", content="you asked about one"),
    ]
    first = Agent(ScriptedBackend(turns), tools=[step], output_dir=tmp_path)
    async with anyio.create_task_group() as group:
        box = {}

        async def run():
            box["result"] = await first.run("do one")

        group.start_soon(run)
        while not list(tmp_path.glob("*/trajectory.jsonl")) or not any(
            e.event == "tool_call" for e in read_events(next(tmp_path.glob("*/trajectory.jsonl")))
        ):
            await anyio.sleep(0.02)
        first.cancel()
    assert box["result"].status is ExitStatus.interrupted and done == []

    fast = [completion("Slow step.", calls=[("step", {"label": "one"})]), *turns[1:]]
    result = await Agent(ScriptedBackend(fast), tools=[step], output_dir=tmp_path).reply(box["result"].run_id,
                                                                                         "what about one?")
    assert result.status is ExitStatus.completed and result.final_answer == "you asked about one"
    assert done == ["one"]  # the resume ran the missing call, then the message was answered
    events = read_events(result.trajectory_path)
    assert [e.status for e in events if isinstance(e, ExitEvent)] == ["interrupted", "completed", "completed"]
    assert [m.step for m in events if isinstance(m, UserMessage)] == [2]


async def test_an_empty_message_is_refused(tmp_path):
    agent = Agent(ScriptedBackend(TURNS), output_dir=tmp_path)
    first = await agent.run("say something")
    with pytest.raises(ValueError, match="empty"):
        await agent.reply(first.run_id, "  ")


# ---- the engine: measured prefill counts, the KV session saved and loaded ------------------------
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    cfg = ModelConfig.tiny().model_copy(update={"vocab_size": Tokenizer.default().vocab_size})
    path = write_random_checkpoint(tmp_path_factory.mktemp("ckpt"), cfg, seed=3)
    return Engine(path, device="cpu", dtype=torch.float32)


async def test_engine_reply_prefills_the_message_and_a_new_process_loads_the_saved_session(engine, tmp_path):
    resident = Agent(EngineBackend(engine, forced=TURNS), output_dir=tmp_path, resident=True)
    first = await resident.run("say something")
    second = await resident.reply(first.run_id, "and again?")
    await resident.close()
    assert (first.final_answer, second.final_answer) == ("first answer", "second answer")
    events = read_events(second.trajectory_path)
    step1, step2 = [e for e in events if isinstance(e, EngineCall)]
    appended = message_ids(second.trajectory_path, 1, "and again?")
    # measured by the session: the message, plus turn 1's last drawn token (fed lazily)
    assert step2.usage.prefill_new == len(appended) + 1
    assert step2.usage.prefill_reused == step1.backend_info["session_tokens"] - 1
    saved = [e.kv_session for e in events if isinstance(e, ExitEvent)]
    assert saved == [str(tmp_path / first.run_id / "kv_session")] * 2

    # a new process: the saved session holds exactly the conversation, so nothing is prefilled again
    third = await Agent(EngineBackend(engine, forced=TURNS), output_dir=tmp_path).reply(first.run_id, "once more?")
    assert third.final_answer == "third answer"
    events = read_events(third.trajectory_path)
    (resumed,) = [e for e in events if isinstance(e, RunResumed)]
    assert resumed.reprefill_tokens == 0
    step3 = [e for e in events if isinstance(e, EngineCall)][-1]
    assert step3.usage.prefill_new == len(message_ids(third.trajectory_path, 2, "once more?")) + 1


async def test_engine_reply_without_a_saved_session_prefills_the_history_once(engine, tmp_path):
    config = AgentConfig(session_save_max_bytes=0)  # nothing is saved
    first = await Agent(EngineBackend(engine, forced=TURNS), output_dir=tmp_path, config=config).run("say something")
    assert not (tmp_path / first.run_id / "kv_session").exists()
    second = await Agent(EngineBackend(engine, forced=TURNS), output_dir=tmp_path).reply(first.run_id, "and again?")
    assert second.final_answer == "second answer"
    events = read_events(second.trajectory_path)
    (resumed,) = [e for e in events if isinstance(e, RunResumed)]
    step1 = [e for e in events if isinstance(e, EngineCall)][0]
    assert resumed.reprefill_tokens == step1.backend_info["session_tokens"]
