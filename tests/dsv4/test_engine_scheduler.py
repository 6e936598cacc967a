"""The engine's scheduler on a tiny random model: every step decodes all running sequences together,
a long prefill runs in chunks between those steps, a caller that stops frees its sequence at the next
step, deadlines, admission by KV bytes (idle sessions spilled to host first, waiting, refusals) and
the roll-back points kept at message boundaries. Steps are asserted on the scheduler's records, never
on wall time."""
from __future__ import annotations

import threading
import time
from contextlib import aclosing, contextmanager

import anyio
import pytest
import torch

from dsv4 import (
    DeadlineExceeded,
    Engine,
    EngineBusy,
    KVBudgetExceeded,
    ModelConfig,
    RuntimeOptions,
    SamplingParams,
)

random_model = pytest.importorskip("dsv4.loading.testing").random_model
CFG = ModelConfig.tiny()
pytestmark = pytest.mark.timeout(300, method="thread")


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=0)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(2, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@contextmanager
def held(engine):
    """The scheduler's thread held between two steps: whatever is submitted meanwhile starts in
    the same step once the block ends."""
    started, gate = threading.Event(), threading.Event()

    def hold():
        started.set()
        gate.wait(60)

    thread = threading.Thread(target=engine.scheduler.call, args=(hold,))
    thread.start()
    assert started.wait(60)
    try:
        yield
    finally:
        gate.set()
        thread.join(60)


async def until(condition) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await anyio.sleep(0.001)


async def draw(session, n: int, seed: int, out: list[int] | None = None) -> list[int]:
    out = [] if out is None else out
    async for t in session.generate(max_tokens=n, seed=seed, ignore_eos=True):
        out.append(t)
    return out


def records_of(engine, since: int):
    """The records of the steps after `since`, once the step running now has ended (a caller hears
    of its result during the step, the record is written at its end)."""
    engine.scheduler.call(lambda: None)
    return [r for r in engine.scheduler.records if r.index > since]


def test_a_long_prefill_delays_running_decodes_by_one_chunk_at_most(model):
    options = RuntimeOptions(prefill_chunk=64, step_tokens=48, snapshot_every=4096)
    engine = Engine(model, options=options)
    a, b = engine.new_session(ids(40, 1)), engine.new_session(ids(70, 2))
    long = engine.new_session()
    alone = [anyio.run(draw, s.fork(), 12, i) for i, s in enumerate((a, b))]
    start = engine.scheduler.step_index

    async def main():
        got: list[list[int]] = [[], []]
        async with anyio.create_task_group() as tg:
            with held(engine):
                tg.start_soon(draw, a, 12, 0, got[0])
                tg.start_soon(draw, b, 12, 1, got[1])
                tg.start_soon(long.aappend, ids(500, 3))
                await until(lambda: a.busy and b.busy and long.busy)
        return got

    assert anyio.run(main) == alone                       # batched with others, the same tokens
    records = records_of(engine, start)
    decoding = [r for r in records if a.sid in r.decode]
    assert len(decoding) == 12 and [r.index for r in decoding] == list(range(decoding[0].index, decoding[0].index + 12))
    assert all(b.sid in r.decode for r in decoding)       # one batched step for both, every step
    chunks = [(r, n) for r in records for sid, n in r.prefill if sid == long.sid]
    assert sum(n for _, n in chunks) == 500 and len(chunks) > 5
    for r, n in chunks:                                   # never more than one chunk's budget a step
        assert n <= max(options.step_tokens - len(r.decode), options.prefill_chunk)
    assert sum(1 for r, _ in chunks if a.sid in r.decode) >= 5   # the prefill ran between their tokens


def test_sessions_generating_at_once_share_every_step(model):
    engine = Engine(model)
    sessions = [engine.new_session(ids(20 + 9 * i, 10 + i)) for i in range(3)]
    alone = [anyio.run(draw, s.fork(), 6, 7) for s in sessions]
    start = engine.scheduler.step_index

    async def main():
        got = [[] for _ in sessions]
        async with anyio.create_task_group() as tg:
            with held(engine):
                for s, out in zip(sessions, got):
                    tg.start_soon(draw, s, 6, 7, out)
                await until(lambda: all(s.busy for s in sessions))
        return got

    assert anyio.run(main) == alone
    steps = [r for r in records_of(engine, start) if r.decode]
    assert len(steps) == 6 and all(set(r.decode) == {s.sid for s in sessions} for r in steps)


def test_a_closed_generator_frees_its_sequence_at_the_next_step(model):
    engine = Engine(model)
    prompt = ids(50, 4)
    s = engine.new_session(prompt)

    async def main():
        tokens = s.generate(max_tokens=10_000, seed=1, ignore_eos=True)
        got = [await tokens.__anext__() for _ in range(3)]
        await tokens.aclose()
        await until(lambda: not s.busy)
        return got

    got = anyio.run(main)
    assert list(s.tokens) == prompt + got                  # the tokens received, no more
    records = records_of(engine, 0)
    ((end, asked),) = [(r, asked) for r in records for sid, asked in r.cancelled if sid == s.sid]
    assert end.index <= asked + 1 and (s.sid, "cancelled") in end.finished
    assert not [r for r in records if s.sid in r.decode and r.index > asked]
    ref = engine.new_session(prompt + got)                 # and the session goes on from there
    torch.testing.assert_close(s.append([5]), ref.append([5]), atol=2e-4, rtol=2e-4)


def test_a_cancelled_task_frees_its_sequence(model):
    engine = Engine(model)
    s = engine.new_session(ids(30, 5))
    got: list[int] = []

    async def main():
        async def consume():
            async for t in s.generate(max_tokens=10_000, ignore_eos=True, seed=0):
                got.append(t)

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await until(lambda: len(got) >= 4)
            tg.cancel_scope.cancel()                          # the consumer waits for a token
        await until(lambda: not s.busy)

    anyio.run(main)
    assert len(got) >= 4 and len(s) == 30 + len(got)          # exactly the tokens it received


def test_a_deadline_ends_the_request_and_keeps_what_it_drew(model):
    engine = Engine(model)
    s = engine.new_session(ids(30, 6))
    got: list[int] = []

    async def main():
        async for t in s.generate(max_tokens=10_000, ignore_eos=True, deadline=time.monotonic() + 0.2):
            got.append(t)

    with pytest.raises(DeadlineExceeded, match="deadline"):
        anyio.run(main)
    assert len(got) < 10_000 and len(s) == 30 + len(got) and not s.busy
    with pytest.raises(DeadlineExceeded):
        s.append(ids(5, 7), deadline=time.monotonic() - 1)
    assert len(s) == 30 + len(got)                          # refused before anything was appended


def session_bytes(model, n: int, turn: bool = False) -> int:
    """What one session of n prompt tokens keeps resident (after a generate: with its roll-back
    snapshot)."""
    probe = Engine(model)
    s = probe.new_session(ids(n, 0))
    if turn:
        anyio.run(draw, s, 1, 0)
    return probe.memory().resident_bytes


def test_idle_sessions_spill_to_host_before_anything_is_refused(model):
    engine = Engine(model, kv_budget_bytes=int(session_bytes(model, 200) * 1.5))   # one session, not two
    a = engine.new_session(ids(200, 1))
    b = engine.new_session(ids(200, 2))                      # a made room
    assert (a.location, b.location) == ("host", "device")
    logits = a.append([3])                                   # a comes back, b makes room
    assert (a.location, b.location) == ("device", "host")
    ref = Engine(model).new_session(ids(200, 1))
    torch.testing.assert_close(logits, ref.append([3]), atol=2e-4, rtol=2e-4)
    c = engine.new_session()
    where = [s.location for s in (a, b, c)]
    with pytest.raises(KVBudgetExceeded, match="budget"):    # can never fit: refused, nothing moved
        c.append(ids(3000, 3))
    assert [s.location for s in (a, b, c)] == where and len(c) == 0
    assert engine.memory().resident_bytes <= engine.kv_budget_bytes


def test_a_prompt_waits_for_memory_held_by_running_decodes_or_is_refused(model):
    budget = int(session_bytes(model, 200, turn=True) * 1.2)   # a decoding session, not one more
    for max_waiting in (1, 0):
        engine = Engine(model, kv_budget_bytes=budget, options=RuntimeOptions(max_waiting=max_waiting))
        a = engine.new_session(ids(200, 1))
        b = engine.new_session()
        start = engine.scheduler.step_index

        async def main(a=a, b=b, engine=engine):
            outcome = {}

            async def prefill():
                try:
                    await b.aappend(ids(200, 2))
                    outcome["b"] = "appended"
                except EngineBusy:
                    outcome["b"] = "busy"

            async with anyio.create_task_group() as tg:
                with held(engine):
                    tg.start_soon(draw, a, 8, 0)              # a runs: its memory cannot be spilled
                    tg.start_soon(prefill)
                    await until(lambda: a.busy and b.busy)
            return outcome["b"]

        outcome = anyio.run(main)
        records = records_of(engine, start)
        a_done = next(r.index for r in records if (a.sid, "length") in r.finished)
        if max_waiting:                                       # b waited for a to end, then a went to host
            assert outcome == "appended" and (a.location, b.location) == ("host", "device")
            assert min(r.index for r in records for sid, _ in r.prefill if sid == b.sid) > a_done
        else:
            assert outcome == "busy" and len(b) == 0 and a.location == "device"
            assert any((b.sid, "refused") in r.finished for r in records)


def test_a_roll_back_point_follows_the_last_message_boundary(model):
    user, assistant = 7, 9
    engine = Engine(model, options=RuntimeOptions(restore_after=(user, assistant), prefill_chunk=64,
                                                  snapshot_every=4096))
    turn = [t if t not in (user, assistant) else 2 for t in ids(80, 8)]
    turn[20], turn[77] = user, assistant                     # ... <User> ... <Assistant> <think>
    s = engine.new_session(turn)
    assert s.reusable(78) == 78 and s.reusable(77) == 0 and s.reusable(80) == 80
    anyio.run(draw, s, 5, 0)
    s.truncate(78)                                           # the re-rendered history leaves here
    assert s.cached_length == 78 and not s.pending           # nothing to recompute
    ref = Engine(model).new_session(turn[:78])
    torch.testing.assert_close(s.append([4, 5]), ref.append([4, 5]), atol=2e-4, rtol=2e-4)


def test_generate_batch_stops_every_row_when_closed(model):
    engine = Engine(model)
    sessions = [engine.new_session(ids(25, 20 + i)) for i in range(2)]
    params = [SamplingParams(max_tokens=1000, ignore_eos=True, seed=i) for i in range(2)]

    async def main():
        got = [[], []]
        async with aclosing(engine.generate_batch(sessions, params)) as items:
            async for i, t in items:
                got[i].append(t)
                if len(got[0]) + len(got[1]) == 6:
                    break
        await until(lambda: not any(s.busy for s in sessions))
        return got

    got = anyio.run(main)
    assert [len(s) for s in sessions] == [25 + len(g) for g in got] and sum(map(len, got)) == 6
