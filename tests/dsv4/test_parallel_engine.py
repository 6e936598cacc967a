"""`dsv4.Engine(path, tp=2)` (its dsv4/runtime/spmd.py group): this process is rank 0, one spawned CPU
rank follows over gloo. Every session operation gives the single-process engine's tokens and logits
(fp32, atol below); the follower stays in step through refusals, forks, roll-backs, saves and spills."""
from __future__ import annotations

import asyncio

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsv4
from dsv4 import CheckpointError, ContextLengthExceeded, ModelConfig, SessionStateError
from dsv4.loading.testing import write_random_checkpoint
from dsv4.runtime.errors import EngineError
from dsv4.runtime.spmd import TensorParallelGroup

CFG = ModelConfig.tiny().replace(head_dim=128, rope_head_dim=64, o_groups=4, o_lora_rank=128,
                                 index_head_dim=128, max_seq_len=1024)
ATOL = 2e-5
pytestmark = pytest.mark.timeout(180, method="thread")   # a hang dumps the stacks and fails
SETTINGS = {"device": "cpu", "dtype": torch.float32, "prefill_chunk": 96, "snapshot_every": 128}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("tp-engine") / "ckpt", CFG, seed=5)


@pytest.mark.timeout(120, method="thread")
def test_start_up_failure_is_reported_and_cleaned_up(tmp_path):
    # first in the file: runs before the module's engines hold this process's group
    misaligned = write_random_checkpoint(tmp_path / "tiny", ModelConfig.tiny())      # wq_b 192 rows/rank
    with pytest.raises(CheckpointError, match="not a multiple of the 128-wide FP8 scale block"):
        dsv4.Engine(misaligned, tp=2, device="cpu", timeout_s=60)
    assert not dist.is_initialized()



@pytest.fixture(scope="module")
def engines(ckpt):
    single = dsv4.Engine(ckpt, **SETTINGS)
    with dsv4.Engine(ckpt, tp=2, timeout_s=120, **SETTINGS) as tp:
        yield single, tp
    assert not dist.is_initialized()                       # the group was left on shutdown


def generate(session, **sampling) -> list[int]:
    async def run():
        return [t async for t in session.generate(**sampling)]
    return asyncio.run(run())


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(2, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_engine_tp_is_the_same_api(engines):
    single, tp = engines
    assert type(tp) is dsv4.Engine and isinstance(tp.group, TensorParallelGroup) and tp.tp == 2
    assert tp.model.layers[0].attn.n_heads == CFG.n_heads // 2          # rank 0 holds half the heads
    assert sum(e is not None for e in tp.model.layers[0].ffn.experts) == CFG.n_routed_experts // 2
    assert tp.kv_bytes_per_token == single.kv_bytes_per_token         # the KV cache is replicated


def test_sessions_match_single_process(engines):
    out = []
    for engine in engines:
        s = engine.new_session(prompt(300, 1))                      # chunked prefill (96-token chunks)
        tokens = generate(s, max_tokens=6, temperature=0, ignore_eos=True)
        logits = s.append(prompt(40, 2))
        child = s.fork()                                            # copy-on-write fork
        child.truncate(200)                                         # roll back to the 128 snapshot
        branch = generate(child, max_tokens=5, temperature=0, ignore_eos=True)
        sampled = generate(s, max_tokens=6, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
        out.append((tokens, branch, sampled, s.tokens, child.tokens, logits, child.append([3])))
        child.close()
    (t1, b1, x1, s1, c1, l1, m1), (t2, b2, x2, s2, c2, l2, m2) = out
    assert (t2, b2, x2, s2, c2) == (t1, b1, x1, s1, c1)
    torch.testing.assert_close(l2, l1, rtol=0, atol=ATOL)
    torch.testing.assert_close(m2, m1, rtol=0, atol=ATOL)


def test_batched_generation_matches(engines):
    results = []
    for engine in engines:
        sessions = [engine.new_session(prompt(150, 3)), engine.new_session(prompt(77, 4))]

        async def run(engine, sessions):
            got = {0: [], 1: []}
            async for i, t in engine.generate_batch(sessions, max_tokens=7, temperature=0, ignore_eos=True):
                got[i].append(t)
            return got
        results.append(asyncio.run(run(engine, sessions)))
    assert results[0] == results[1] and len(results[0][0]) == 7


def test_save_load_and_spill_stay_in_step(engines, tmp_path):
    single, tp = engines
    ref = single.new_session(prompt(180, 5))
    want = generate(ref, max_tokens=4, temperature=0, ignore_eos=True) + \
        generate(ref, max_tokens=4, temperature=0, ignore_eos=True)

    s = tp.new_session(prompt(180, 5))
    first = generate(s, max_tokens=4, temperature=0, ignore_eos=True)
    s.save(tmp_path / "saved")
    loaded = tp.load_session(tmp_path / "saved")                 # every rank reads rank 0's file
    s.spill(tmp_path / "spilled")                                 # followers drop theirs, re-read later
    loaded.spill("host")
    assert first + generate(loaded, max_tokens=4, temperature=0, ignore_eos=True) == want
    assert first + generate(s, max_tokens=4, temperature=0, ignore_eos=True) == want


def test_refusals_keep_the_ranks_in_step(engines):
    single, tp = engines
    s = tp.new_session(prompt(20, 6))
    with pytest.raises(ValueError, match="token id 9999"):
        s.append([5, 9999])                                       # refused before anything is sent
    with pytest.raises(ValueError, match="truncate"):
        s.truncate(99)                                            # sent; every rank refuses alike
    with pytest.raises(ContextLengthExceeded):
        s.append([1] * CFG.max_seq_len)
    async def busy():                                             # during another call on it
        tokens = s.generate(max_tokens=2, temperature=0, ignore_eos=True)
        await tokens.__anext__()
        with pytest.raises(SessionStateError, match="busy"):
            s.append([4])                                         # not sent to the follower
        await tokens.aclose()                                     # keeps the token it yielded
    asyncio.run(busy())
    s.close()
    with pytest.raises(SessionStateError, match="closed"):
        s.append([4])
    ref = single.new_session(prompt(20, 6))
    again = tp.new_session(prompt(20, 6))
    torch.testing.assert_close(again.append([4, 5]), ref.append([4, 5]), rtol=0, atol=ATOL)
    del again                                                     # dropped on the follower too
    assert generate(tp.new_session(prompt(30, 8)), max_tokens=3, temperature=0, ignore_eos=True) == \
        generate(single.new_session(prompt(30, 8)), max_tokens=3, temperature=0, ignore_eos=True)


def test_bad_tp_arguments(ckpt, tmp_path):
    with pytest.raises(ValueError, match="tp must be an int >= 1"):
        dsv4.Engine(ckpt, tp=0)
    with pytest.raises(TypeError, match="needs a checkpoint path"):
        dsv4.Engine(object(), tp=2)


OPS = st.lists(st.one_of(
    st.tuples(st.just("append"), st.integers(1, 150)), st.tuples(st.just("generate"), st.integers(1, 4)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.sampled_from(["fork", "spill_host", "spill_disk", "save_load", "close_fork"]), st.just(0)),
), min_size=1, max_size=8)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, seed=st.integers(0, 2**16))
def test_any_sequence_of_operations_stays_in_step(engines, tmp_path, ops, seed):
    """The same random operations on both engines: same tokens, then the same next logits."""
    gen = torch.Generator().manual_seed(seed)
    first = prompt(5, seed)
    sessions = [engine.new_session(first) for engine in engines]
    for step, (op, arg) in enumerate(ops):
        ids = torch.randint(2, CFG.vocab_size, (arg,), generator=gen).tolist() if op == "append" else []
        outcomes = []
        for i, (engine, s) in enumerate(zip(engines, sessions)):
            where = tmp_path / f"{seed}-{step}-{i}"
            try:
                if op == "append" and len(s) + arg < 600:
                    s.append(ids)
                elif op == "generate" and len(s) + arg < 600:
                    generate(s, max_tokens=arg, temperature=0.8, seed=seed, ignore_eos=True)
                elif op == "truncate":
                    s.truncate(max(1, int(arg * len(s))))
                elif op == "fork":
                    sessions[i] = s.fork()
                elif op == "close_fork":
                    s.fork().close()
                elif op == "spill_host":
                    s.spill("host")
                elif op == "spill_disk":
                    s.spill(where)
                elif op == "save_load":
                    sessions[i] = engine.load_session(s.save(where))
                outcomes.append("ok")
            except SessionStateError as e:          # e.g. spilling a spilled session: both refuse
                outcomes.append(type(e).__name__)
        assert outcomes[0] == outcomes[1] and sessions[0].tokens == sessions[1].tokens, (step, op, outcomes)
    torch.testing.assert_close(sessions[1].append([3]), sessions[0].append([3]), rtol=0, atol=ATOL)


def test_shutdown_stops_the_followers(engines):        # last: the module's tp engine goes
    _, tp = engines
    procs = list(tp.group.procs)
    tp.shutdown()
    assert not any(p.is_alive() for p in procs) and not dist.is_initialized()
    with pytest.raises(EngineError, match="shut down"):
        tp.new_session([1, 2])
