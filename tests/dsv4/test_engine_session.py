"""Sessions on a tiny random DSV4 model: chunked prefill + batched decode against one full
forward (every residue mod 4 and mod 128), save/load, truncate, fork, spill, limits."""
from __future__ import annotations

import json

import anyio
import pytest
import torch

from dsv4 import (
    ContextLengthExceeded,
    Engine,
    KVBudgetExceeded,
    ModelConfig,
    SamplingParams,
)
from dsv4.runtime.errors import SessionFormatError, SessionMismatch, SessionStateError

# the random model comes from dsv4.loading.testing (branch model-ckpt); the model itself from model-net
random_model = pytest.importorskip("dsv4.loading.testing").random_model
CFG = ModelConfig.tiny()
N = 272  # longest sequence compared against the full forward
ATOL = RTOL = 2e-4  # fp32 on CPU; chunked vs full only reorder sums


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=0)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, CFG.vocab_size, (N,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.fixture(scope="module")
def full_logits(model, tokens):
    """Logits at every position of one uncached forward: [N, V]."""
    return model(torch.tensor([tokens]))[0]


def make_engine(model, **kw):
    kw.setdefault("prefill_chunk", 128)
    kw.setdefault("snapshot_every", 128)
    return Engine(model, **kw)


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def forcing(target: list[int], start: int, seen: list[torch.Tensor]):
    """A logits processor that records the logits it is given and forces target[start + step]."""

    def proc(generated, logits):
        seen.append(logits.clone())
        forced = torch.full_like(logits, float("-inf"))
        forced[target[start + len(generated)]] = 0.0
        return forced

    return proc


def decode_forced(engine, sessions, starts, tokens, steps):
    """Batched greedy decode forced along `tokens`; returns the logits seen by each row."""
    seen = [[] for _ in sessions]
    params = [SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True,
                             logits_processors=[forcing(tokens, p, seen[i])])
              for i, p in enumerate(starts)]

    async def run():
        async for _ in engine.generate_batch(sessions, params):
            pass

    anyio.run(run)
    return seen


def test_chunked_prefill_and_batched_decode_match_the_full_forward(model, tokens, full_logits):
    engine = make_engine(model)
    # every prompt length up to 256: every residue mod 4 and mod 128, and every position 0..271
    # is checked (the prompt's last position by the prefill, the next 16 by batched decode)
    lengths = list(range(1, 257))
    sessions = []
    for p in lengths:
        s = engine.new_session()
        close(s.append(tokens[:p]), full_logits[p - 1])
        sessions.append(s)
    steps = N - 256
    seen = decode_forced(engine, sessions, lengths, tokens, steps)
    for p, s, rows in zip(lengths, sessions, seen):
        assert len(rows) == steps
        for j, row in enumerate(rows):
            close(row, full_logits[p - 1 + j])
        assert list(s.tokens) == tokens[:p + steps]
        assert s.cached_length == p + steps - 1  # the last drawn token is pending, not yet fed


def test_prefill_in_pieces_of_any_size_equals_one_prefill(model, tokens, full_logits):
    engine = make_engine(model, prefill_chunk=256)
    s = engine.new_session()
    pos = 0
    for piece in (3, 1, 61, 127, 5, 75):
        logits = s.append(tokens[pos:pos + piece])
        pos += piece
        close(logits, full_logits[pos - 1])


def test_truncate_then_reextend_equals_straight_run(model, tokens, full_logits):
    engine = make_engine(model)
    s = engine.new_session()
    s.append(tokens[:260])
    for n in (259, 200, 128, 77, 0):  # inside the pending tail, past snapshots, to empty
        s.truncate(n)
        assert len(s) == n and list(s.tokens) == tokens[:n]
        assert s.cached_length <= n
        close(s.append(tokens[n:n + 9]), full_logits[n + 8])
        s.truncate(n)
    with pytest.raises(ValueError, match="truncate"):
        s.truncate(len(s) + 1)


def test_fork_branches_are_independent(model, tokens, full_logits):
    engine = make_engine(model)
    other = torch.randint(0, CFG.vocab_size, (40,), generator=torch.Generator().manual_seed(9)).tolist()
    parent = engine.new_session()
    parent.append(tokens[:150])
    child = parent.fork()
    assert child.memory().shared and parent.memory().shared
    # one copy of the cache (and of its snapshots) while shared
    assert engine.memory().resident_bytes == parent.kv_bytes() + parent.snapshot_bytes()
    child_logits = child.append(other)
    parent_logits = parent.append(tokens[150:190])
    assert not child.memory().shared
    close(parent_logits, full_logits[189])
    ref = engine.new_session()
    close(child_logits, ref.append(tokens[:150] + other))
    assert list(child.tokens) == tokens[:150] + other
    # decoding on a fresh fork writes to its own copy too
    twin = parent.fork()
    drawn = decode_forced(engine, [twin], [len(parent)], [0] * len(parent) + other, 3)
    assert len(drawn[0]) == 3 and not twin.memory().shared
    close(parent.append(tokens[190:200]), full_logits[199])


def test_save_load_continue_equals_continue(model, tokens, tmp_path):
    engine = make_engine(model)
    a = engine.new_session()
    a.append(tokens[:200])
    b_path = a.save(tmp_path / "s")
    manifest = json.loads((b_path / "manifest.json").read_text())
    assert manifest["token_ids"] == tokens[:200] and manifest["model_fingerprint"] == engine.fingerprint
    b = engine.load_session(b_path)
    assert list(b.tokens) == tokens[:200] and b.kv_bytes() > 0

    async def draw(s):
        return [t async for t in s.generate(max_tokens=12, seed=5, ignore_eos=True)]

    assert anyio.run(draw, a) == anyio.run(draw, b)
    # the last drawn token is pending in both; a session saved that way resumes it
    c = engine.load_session(a.save(tmp_path / "p"))
    assert c.pending == a.pending == b.pending and len(c.pending) == 1
    logits = a.append(tokens[200:210])
    close(b.append(tokens[200:210]), logits)
    close(c.append(tokens[200:210]), logits)


def test_loading_into_a_different_model_is_a_clear_error(model, tokens, tmp_path):
    engine = make_engine(model)
    s = engine.new_session()
    s.append(tokens[:20])
    s.save(tmp_path / "s")
    other = make_engine(random_model(CFG, seed=1))
    with pytest.raises(SessionMismatch, match="different model"):
        other.load_session(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(SessionFormatError, match="manifest"):
        engine.load_session(tmp_path / "s")
    with pytest.raises(SessionFormatError, match="missing"):
        engine.load_session(tmp_path / "nowhere")


@pytest.mark.parametrize("where", ["host", "disk"])
def test_spill_and_bring_back(model, tokens, full_logits, tmp_path, where):
    engine = make_engine(model)
    s = engine.new_session()
    s.append(tokens[:140])
    other = engine.new_session()
    other.append(tokens[:30])
    others = other.kv_bytes() + other.snapshot_bytes()
    assert engine.memory().resident_bytes == others + s.kv_bytes() + s.snapshot_bytes()
    s.spill("host" if where == "host" else tmp_path / "spill")
    assert s.location == where and len(s) == 140
    assert engine.memory().resident_bytes == others
    close(s.append(tokens[140:150]), full_logits[149])  # brought back on use
    assert s.location == "device"
    assert engine.memory().resident_bytes == others + s.kv_bytes() + s.snapshot_bytes()


def test_kv_budget_error_changes_nothing(model, tokens, full_logits):
    probe = make_engine(model)
    s = probe.new_session()
    s.append(tokens[:64])
    budget = probe.memory().resident_bytes + 1000
    engine = make_engine(model, kv_budget_bytes=budget)
    s = engine.new_session()
    s.append(tokens[:64])
    with pytest.raises(KVBudgetExceeded, match="budget"):
        s.append(tokens[64:260])
    assert len(s) == 64 and s.cached_length == 64
    close(s.append(tokens[64:66]), full_logits[65])
    with pytest.raises(KVBudgetExceeded):
        engine.new_session().append(tokens[:260])


def test_context_length_error_and_bad_ids(model, tokens):
    engine = make_engine(model, max_context=100)
    s = engine.new_session()
    s.append(tokens[:90])
    with pytest.raises(ContextLengthExceeded, match="maximum context length of 100"):
        s.append(tokens[90:111])
    assert len(s) == 90
    with pytest.raises(ValueError, match="not an int"):
        s.append([CFG.vocab_size])
    with pytest.raises(ValueError, match="empty"):
        s.append([])
    with pytest.raises(ValueError, match="max_context"):
        make_engine(model, max_context=CFG.max_seq_len + 1)


def test_memory_accounting(model, tokens):
    engine = make_engine(model)
    a, b = engine.new_session(), engine.new_session()
    a.append(tokens[:200])
    b.append(tokens[:50])
    m = engine.memory()
    assert m.sessions == 2 and m.tokens == 250
    assert m.resident_bytes == a.kv_bytes() + b.kv_bytes() + a.snapshot_bytes() + b.snapshot_bytes()
    assert a.memory().cached_tokens == 200 and a.memory().location == "device"
    b.close()
    assert engine.memory().sessions == 1
    with pytest.raises(SessionStateError, match="closed"):
        b.append([1])
