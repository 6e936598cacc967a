"""Random sequences of session operations (append, generate, truncate, fork, spill, save/load)
end where a straight run of the same tokens ends: the next logits match one full forward."""
from __future__ import annotations

import anyio
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dsv4 import Engine, ModelConfig

random_model = pytest.importorskip("dsv4.loading.testing").random_model
CFG = ModelConfig.tiny()
MAX_LEN = 520

append_op = st.tuples(st.just("append"), st.integers(1, 150))
generate_op = st.tuples(st.just("generate"), st.integers(1, 4))
truncate_op = st.tuples(st.just("truncate"), st.floats(0, 1))
other_op = st.tuples(st.sampled_from(["fork", "spill", "save_load", "rollback"]), st.just(0))
ops = st.lists(st.one_of(append_op, generate_op, truncate_op, other_op), min_size=1, max_size=8)


async def _first(session):
    async for t in session.generate(max_tokens=1, temperature=0, ignore_eos=True):
        return t


@pytest.fixture(scope="module")
def engine():
    # small chunks and snapshot spacing, two snapshots kept: roll-backs hit every case
    return Engine(random_model(CFG, seed=0), prefill_chunk=64, snapshot_every=128, max_snapshots=2)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, seed=st.integers(0, 2**16))
@example(ops=[("generate", 1), ("save_load", 0)], seed=0)  # saved with a pending token, then rolled back
def test_any_sequence_of_operations_ends_like_a_straight_run(engine, tmp_path, ops, seed):
    gen = torch.Generator().manual_seed(seed)
    s = engine.new_session(torch.randint(0, CFG.vocab_size, (5,), generator=gen).tolist())
    turn_start = None  # length before the last generate: where an agent rolls a completion back
    for op, arg in ops:
        if op == "append" and len(s) + arg < MAX_LEN:
            s.append(torch.randint(0, CFG.vocab_size, (arg,), generator=gen).tolist())
        elif op == "generate" and len(s) + arg < MAX_LEN:
            turn_start = len(s)

            async def draw():
                return [t async for t in s.generate(max_tokens=arg, seed=seed, ignore_eos=True)]
            anyio.run(draw)
        elif op == "truncate":
            s.truncate(max(1, int(arg * len(s))))
        elif op == "rollback" and turn_start is not None and turn_start <= len(s):
            s.truncate(turn_start)
        elif op == "fork":
            s = s.fork()
        elif op == "spill":
            s.spill("host")
        elif op == "save_load":
            s = engine.load_session(s.save(tmp_path / f"s{seed}"))
    if turn_start is not None and turn_start <= len(s):  # and generate straight from there
        s.truncate(turn_start)
        anyio.run(lambda: _first(s))
    tokens = list(s.tokens) + [3]
    want = engine.model(torch.tensor([tokens]), last_only=True)[0, -1]
    torch.testing.assert_close(s.append([3]), want, atol=2e-4, rtol=2e-4)
