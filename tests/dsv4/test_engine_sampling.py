"""Sampling: masks against a direct float64 reference, seeded determinism, the draw's
distribution, processors, and stop rules (stop strings split across token boundaries)."""
from __future__ import annotations

import math

import pytest
import torch

from dsv4.runtime.sampling import (
    IncrementalDetokenizer,
    SamplingParams,
    StopChecker,
    make_generator,
    sample_next,
    top_k_mask,
    top_p_mask,
)

torch.set_num_threads(1)


def _ref_top_k(row: list[float], k: int) -> list[bool]:
    if k <= 0 or k >= len(row):
        return [True] * len(row)
    kth = sorted(row, reverse=True)[k - 1]
    return [x >= kth for x in row]


def _ref_top_p(row: list[float], p: float) -> list[bool]:
    m = max(row)
    e = [math.exp(x - m) for x in row]
    z = sum(e)
    probs = [x / z for x in e]
    keep = [False] * len(row)
    mass = 0.0
    for i in sorted(range(len(row)), key=lambda i: -probs[i]):
        if mass < p:
            keep[i] = True
        mass += probs[i]
    return keep


@pytest.mark.parametrize("seed", range(5))
def test_top_k_mask_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 50, generator=g, dtype=torch.float64) * 3
    k = torch.tensor([0, 1, 3, 17, 50, 80])
    out = top_k_mask(logits, k)
    for b in range(6):
        want = _ref_top_k(logits[b].tolist(), int(k[b]))
        got = torch.isfinite(out[b]).tolist()
        assert got == want
        assert torch.equal(out[b][torch.isfinite(out[b])], logits[b][torch.tensor(want)])


@pytest.mark.parametrize("seed", range(5))
def test_top_p_mask_matches_reference(seed):
    g = torch.Generator().manual_seed(100 + seed)
    logits = torch.randn(5, 64, generator=g, dtype=torch.float64) * 2
    p = torch.tensor([1.0, 0.9, 0.5, 0.05, 0.999], dtype=torch.float64)
    out = top_p_mask(logits, p)
    for b in range(5):
        assert torch.isfinite(out[b]).tolist() == _ref_top_p(logits[b].tolist(), float(p[b]))


def test_top_p_keeps_the_most_likely_token_even_for_tiny_p():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    assert torch.isfinite(top_p_mask(logits, torch.tensor([1e-9]))).tolist() == [[False, True, False]]


def _draw(logits, params, n):
    gens = [make_generator(p.seed, "cpu") for p in params]
    return [sample_next(logits, params, gens, [[] for _ in params]) for _ in range(n)]


def test_seeded_sampling_is_deterministic_and_seed_dependent():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    a = _draw(logits, [SamplingParams(seed=s) for s in (1, 2, 3)], 30)
    b = _draw(logits, [SamplingParams(seed=s) for s in (1, 2, 3)], 30)
    c = _draw(logits, [SamplingParams(seed=s) for s in (4, 5, 6)], 30)
    assert a == b
    assert a != c


def test_draws_follow_softmax_of_logits_over_temperature():
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5])
    temperature, rows = 0.7, 4000
    params = [SamplingParams(temperature=temperature, seed=i) for i in range(rows)]
    drawn = sample_next(logits.expand(rows, -1), params, [make_generator(i, "cpu") for i in range(rows)],
                        [[]] * rows)
    freq = torch.bincount(torch.tensor(drawn), minlength=5).double() / rows
    want = torch.softmax(logits.double() / temperature, -1)
    # 4 standard errors of a binomial proportion
    assert torch.all((freq - want).abs() < 4 * (want * (1 - want) / rows).sqrt() + 1e-9), (freq, want)


def test_greedy_and_top_k_one_pick_the_argmax():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(3))
    want = logits.argmax(-1).tolist()
    for params in ([SamplingParams(temperature=0.0, seed=i) for i in range(4)],
                   [SamplingParams(top_k=1, seed=i) for i in range(4)]):
        assert _draw(logits, params, 1)[0] == want


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(4)) * 2
    allowed_k = set(torch.topk(logits[0], 5).indices.tolist())
    allowed_p = {i for i, keep in enumerate(_ref_top_p(logits[0].tolist(), 0.6)) if keep}
    for step in _draw(logits, [SamplingParams(top_k=5, seed=7)], 200):
        assert step[0] in allowed_k
    for step in _draw(logits, [SamplingParams(top_p=0.6, seed=8)], 200):
        assert step[0] in allowed_p


def test_logits_processor_sees_generated_ids_and_can_ban_tokens():
    logits = torch.zeros(1, 10)
    logits[0, 3] = 10.0  # overwhelmingly likely unless banned
    seen = []

    def ban_three(generated, row):
        seen.append(list(generated))
        row = row.clone()
        row[3] = float("-inf")
        return row

    params = [SamplingParams(seed=0, logits_processors=[ban_three])]
    out = sample_next(logits, params, [make_generator(0, "cpu")], [[5, 6]])
    assert out[0] != 3 and seen == [[5, 6]]
    greedy = [SamplingParams(temperature=0, logits_processors=[ban_three])]
    assert sample_next(logits, greedy, [make_generator(0, "cpu")], [[]])[0] != 3


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(top_k=-2), dict(stop=[""]),
                                 dict(stop=[1.5]), dict(logits_processors=[3])])
def test_invalid_sampling_params_are_rejected_with_a_message(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


# A byte-level toy tokenizer: id -> bytes; multi-byte characters may be split across ids.
PIECES = {0: b"Hello", 1: b" wor", 2: b"ld", 3: b"</to", 4: b"ol>", 5: b"\xc3", 6: b"\xa9", 7: b"!",
          8: b"x", 9: b"<eos>"}


def toy_decode(ids):
    return b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")


def test_incremental_detokenizer_holds_back_split_characters():
    detok = IncrementalDetokenizer(toy_decode)
    deltas = [detok.push(i) for i in (0, 5, 6, 7)]
    assert deltas == ["Hello", "", "é", "!"]


def _run(params, ids, eos=(9,)):
    checker = StopChecker(params, eos, toy_decode)
    for n, t in enumerate(ids, 1):
        reason = checker.push(t)
        if reason:
            return n, reason, checker.matched
    return len(ids), None, None


def test_stop_string_split_across_tokens_stops_on_the_completing_token():
    assert _run(SamplingParams(stop=["</tool>"]), [0, 3, 4, 8, 8]) == (3, "stop", "</tool>")
    assert _run(SamplingParams(stop=["world"]), [0, 1, 2, 8]) == (3, "stop", "world")
    assert _run(SamplingParams(stop=["é!"]), [0, 5, 6, 7, 8]) == (4, "stop", "é!")


def test_stop_string_not_present_does_not_stop():
    assert _run(SamplingParams(stop=["</tool>"], max_tokens=100), [0, 3, 8, 4]) == (4, None, None)


def test_eos_stop_ids_and_max_tokens():
    assert _run(SamplingParams(), [0, 9, 8]) == (2, "stop", 9)
    assert _run(SamplingParams(ignore_eos=True, max_tokens=3), [0, 9, 8, 8]) == (3, "length", None)
    assert _run(SamplingParams(stop=[8]), [0, 1, 8]) == (3, "stop", 8)
    assert _run(SamplingParams(max_tokens=2), [0, 1, 2]) == (2, "length", None)


def test_stop_strings_without_a_tokenizer_are_an_error():
    with pytest.raises(ValueError, match="tokenizer"):
        StopChecker(SamplingParams(stop=["x"]), (1,), None)
