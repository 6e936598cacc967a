"""generate / generate_batch on a tiny random model: seeds, batching, stops, the event loop."""
from __future__ import annotations

import anyio
import pytest
import torch

from dsv4 import Engine, ModelConfig, SamplingParams

# the random model comes from dsv4.loading.testing (branch model-ckpt); the model itself from model-net
random_model = pytest.importorskip("dsv4.loading.testing").random_model
CFG = ModelConfig.tiny()


@pytest.fixture(scope="module")
def engine():
    return Engine(random_model(CFG, seed=0), prefill_chunk=128, snapshot_every=128)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, CFG.vocab_size, (70,), generator=torch.Generator().manual_seed(2)).tolist()


async def collect(session, **kw):
    return [t async for t in session.generate(**kw)]


def test_seeded_generation_is_reproducible_and_joins_the_session(engine, prompt):
    a, b, c = (engine.new_session(prompt) for _ in range(3))
    ta = anyio.run(lambda: collect(a, max_tokens=10, seed=3, ignore_eos=True))
    tb = anyio.run(lambda: collect(b, max_tokens=10, seed=3, ignore_eos=True))
    tc = anyio.run(lambda: collect(c, max_tokens=10, seed=4, ignore_eos=True))
    assert ta == tb and ta != tc and len(ta) == 10
    assert list(a.tokens) == prompt + ta and a.finish_reason == "length"


def test_greedy_equals_argmax_of_appended_logits(engine, prompt):
    s = engine.new_session(prompt)
    got = anyio.run(lambda: collect(s, max_tokens=5, temperature=0, ignore_eos=True))
    ref = engine.new_session()
    logits = ref.append(prompt)
    for t in got:
        assert t == int(logits.argmax())
        logits = ref.append([t])


def test_batched_decode_equals_one_session_at_a_time(engine, prompt):
    prompts = [prompt[:n] for n in (5, 33, 70)]
    params = [SamplingParams(max_tokens=8, seed=i, ignore_eos=True, top_k=50, top_p=0.9)
              for i in range(3)]
    sessions = [engine.new_session(p) for p in prompts]

    async def batched():
        out = [[] for _ in sessions]
        async for i, t in engine.generate_batch(sessions, params):
            out[i].append(t)
        return out

    together = anyio.run(batched)
    alone = []
    for p, sp in zip(prompts, params):
        s = engine.new_session(p)
        alone.append(anyio.run(lambda: collect(s, max_tokens=8, seed=sp.seed, ignore_eos=True,
                                               top_k=50, top_p=0.9)))
    assert together == alone


def test_stop_token_ids_and_eos(engine, prompt):
    s = engine.new_session(prompt)
    free = anyio.run(lambda: collect(s, max_tokens=6, temperature=0, ignore_eos=True))
    stop_at = free[2]
    s = engine.new_session(prompt)
    got = anyio.run(lambda: collect(s, max_tokens=6, temperature=0, ignore_eos=True, stop=[stop_at]))
    assert got == free[:free.index(stop_at) + 1] and s.finish_reason == "stop"
    eos_engine = Engine(engine.model, eos_token_ids=[stop_at])
    s = eos_engine.new_session(prompt)
    assert anyio.run(lambda: collect(s, max_tokens=6, temperature=0)) == got


class CharTokenizer:
    """Each id decodes to one letter: enough to place stop strings across token boundaries."""

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_string_across_token_boundaries(engine, prompt):
    eng = Engine(engine.model, tokenizer=CharTokenizer())
    s = eng.new_session(prompt)
    free = anyio.run(lambda: collect(s, max_tokens=8, temperature=0, ignore_eos=True))
    text = CharTokenizer().decode(free)
    stop = text[3:6]  # spans tokens 3..5
    s = eng.new_session(prompt)
    got = anyio.run(lambda: collect(s, max_tokens=8, temperature=0, ignore_eos=True, stop=[stop]))
    assert got == free[:text.index(stop) + 3] and s.finish_reason == "stop"


def test_stop_strings_need_a_tokenizer(engine, prompt):
    s = engine.new_session(prompt)
    with pytest.raises(ValueError, match="tokenizer"):
        anyio.run(lambda: collect(s, max_tokens=3, stop=["x"]))


def test_generate_on_an_empty_session_is_an_error(engine):
    from dsv4.runtime.errors import SessionStateError

    with pytest.raises(SessionStateError, match="empty"):
        anyio.run(lambda: collect(engine.new_session(), max_tokens=3))


def test_event_loop_runs_between_steps(engine, prompt):
    s = engine.new_session(prompt)
    ticks, at_token = [0], []

    async def main():
        async def ticker():
            while True:
                ticks[0] += 1
                await anyio.sleep(0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            async for _ in s.generate(max_tokens=6, ignore_eos=True, seed=1):
                at_token.append(ticks[0])
            tg.cancel_scope.cancel()

    anyio.run(main)
    assert all(b > a for a, b in zip(at_token, at_token[1:]))  # the ticker ran between tokens


def test_one_session_cannot_generate_twice_at_once(engine, prompt):
    from dsv4.runtime.errors import SessionStateError

    s = engine.new_session(prompt)

    async def main():
        gen = s.generate(max_tokens=5, ignore_eos=True, seed=0)
        await gen.__anext__()
        with pytest.raises(SessionStateError, match="busy"):
            await collect(s, max_tokens=2)
        await gen.aclose()

    anyio.run(main)


def test_generation_stops_with_a_clear_error_at_the_context_limit(engine, prompt):
    from dsv4 import ContextLengthExceeded

    small = Engine(engine.model, max_context=len(prompt) + 3)
    s = small.new_session(prompt)
    got = []

    async def main():
        async for t in s.generate(max_tokens=10, ignore_eos=True, seed=0):
            got.append(t)

    with pytest.raises(ContextLengthExceeded, match="maximum context length"):
        anyio.run(main)
    assert len(got) == 3 and list(s.tokens) == prompt + got  # nothing lost


def test_rolling_back_a_completion_restores_the_turn_snapshot_without_recompute(engine, prompt):
    s = engine.new_session(prompt)
    s.append([7])
    first = anyio.run(lambda: collect(s, max_tokens=20, ignore_eos=True, seed=2))
    s.truncate(len(prompt) + 1)
    assert s.cached_length == len(prompt) + 1 and not s.pending  # restored, nothing to recompute
    again = anyio.run(lambda: collect(s, max_tokens=20, ignore_eos=True, seed=2))
    assert again == first  # straight from the snapshot's logits
    s.truncate(len(prompt) + 1)
    ref = engine.new_session(prompt + [7])
    torch.testing.assert_close(s.append([9]), ref.append([9]), atol=2e-4, rtol=2e-4)


def test_engine_from_a_checkpoint_folder_with_its_tokenizer(tmp_path, prompt):
    testing = pytest.importorskip("dsv4.loading.testing")
    path = testing.write_random_checkpoint(tmp_path / "ckpt", CFG, seed=0)
    eng = Engine(path, device="cpu", prefill_chunk=128)
    assert eng.tokenizer is not None and eng.eos_token_ids == (eng.tokenizer.eos_id,)
    s = eng.new_session(prompt)
    free = anyio.run(lambda: collect(s, max_tokens=6, temperature=0, ignore_eos=True))
    text = eng.tokenizer.decode(free)
    s = eng.new_session(prompt)
    stop = text[-2:] if len(text) >= 2 else text
    got = anyio.run(lambda: collect(s, max_tokens=6, temperature=0, ignore_eos=True, stop=[stop]))
    assert eng.tokenizer.decode(got).find(stop) >= 0 and got == free[:len(got)]


def test_generate_batch_rejects_sessions_of_another_engine(engine, prompt):
    other = Engine(engine.model)
    sessions = [engine.new_session(prompt), other.new_session(prompt)]

    async def main():
        async for _ in engine.generate_batch(sessions, max_tokens=2):
            pass

    with pytest.raises(ValueError, match="another engine"):
        anyio.run(main)
