"""Batched decode (S = 1 per row, rows at different positions) == per-row decode == full forward,
and the decode paths of the compressor and indexer against their per-row forms, with fresh
random inputs. Rows sit at every residue mod 4 (CSA / indexer blocks) and straddle 128 (HCA)."""
from __future__ import annotations

import pytest
import torch

from dsv4.network.cache import CompressorState, LayerCache
from dsv4.network.compressor import Compressor
from dsv4.network.config import ModelConfig
from dsv4.network.indexer import Indexer
from dsv4.network.rope import inv_frequencies

CFG = ModelConfig.tiny()
ATOL = 5e-5          # fp32 logits of O(1): batched and per-row decode differ only by matmul shapes
PREFIXES = [1, 2, 3, 4, 125, 126, 127, 131, 60]   # decode crosses blocks of 4 and of 128 at different steps
STEPS = 4


@pytest.fixture(scope="module")
def model(make_model):
    return make_model(CFG, seed=11)


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


def _cache_tensors(cache) -> dict[str, torch.Tensor]:
    return {k: v for k, v in cache.state_tensors().items()}


def test_batched_decode_matches_per_row_and_full_forward(model):
    prompts = [_ids(n, seed=100 + i) for i, n in enumerate(PREFIXES)]
    steps = torch.randint(0, CFG.vocab_size, (len(PREFIXES), STEPS), generator=torch.Generator().manual_seed(5))
    batched, single = [], []
    for p in prompts:
        for caches in (batched, single):
            c = model.new_cache()
            model(p, caches=[c])
            caches.append(c)
    out_batched = torch.cat([model(steps[:, t:t + 1], caches=batched) for t in range(STEPS)], dim=1)
    for b, p in enumerate(prompts):
        out_single = torch.cat([model(steps[b:b + 1, t:t + 1], caches=[single[b]]) for t in range(STEPS)], dim=1)
        full = model(torch.cat((p, steps[b:b + 1]), dim=1))[:, -STEPS:]
        torch.testing.assert_close(out_batched[b:b + 1], out_single, atol=ATOL, rtol=0)
        torch.testing.assert_close(out_batched[b:b + 1], full, atol=ATOL, rtol=0)
        # the caches hold the same state too (compressor slots, entries, indexer keys, rings)
        got, want = _cache_tensors(batched[b]), _cache_tensors(single[b])
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("ratio,quant_sim", [(4, False), (4, True), (128, False)])
def test_compressor_decode_equals_per_row_pooling(ratio, quant_sim):
    """`_decode` (all rows, one token each) against `_pool` row by row, from random states."""
    torch.manual_seed(ratio + quant_sim)
    comp = Compressor(CFG, ratio, CFG.head_dim, rotate=False)
    with torch.no_grad():
        for p in comp.parameters():
            p.copy_(torch.randn(p.shape) * p.shape[-1] ** -0.5 if p.dim() == 2 else torch.randn(p.shape))
    comp.quant_sim = quant_sim
    inv_freq = inv_frequencies(CFG, compressed=True)
    starts = [3, 7, 0, 5, 127, 255, 130, 2, 11] if ratio == 4 else [127, 0, 255, 64, 126, 383]
    c = 2 if ratio == 4 else 1
    states = []
    for i, start in enumerate(starts):           # a random history: filled slots up to start % m
        st = CompressorState.empty(ratio, CFG.head_dim, "cpu")
        filled = (c - 1) * ratio + start % ratio
        st.kv[:filled] = torch.randn(filled, st.kv.shape[1])
        st.score[:filled] = torch.randn(filled, st.kv.shape[1])
        states.append(st)
    per_row_states = [s.copy() for s in states]
    x = torch.randn(len(starts), 1, CFG.dim)
    with torch.no_grad():
        got = comp(x, starts, states, inv_freq)                       # S == 1: the batched path
        want = []
        for b, (start, st) in enumerate(zip(starts, per_row_states)):      # the prefill path's pooling
            kv = comp.wkv(x[b]).float()
            pooled = comp._pool(kv, comp.wgate(x[b]).float() + comp.ape[start % ratio], start, st)
            first = torch.arange(pooled.shape[0]) + start // ratio
            want.append(comp._finish(pooled, first * ratio, inv_freq))
    assert [g.shape[0] for g in got] == [int(s % ratio == ratio - 1) for s in starts]
    for b in range(len(starts)):
        torch.testing.assert_close(got[b], want[b], atol=1e-5, rtol=0)        # entries are O(1)
        # wkv / wgate of B rows vs one row: the matmul shapes differ, not the values
        torch.testing.assert_close(states[b].kv, per_row_states[b].kv, atol=2e-6, rtol=0)
        torch.testing.assert_close(states[b].score, per_row_states[b].score, atol=2e-6, rtol=0)


def _indexer_caches(counts: list[int]) -> list[LayerCache]:
    caches = []
    for n in counts:
        cache = LayerCache.empty(CFG, 1, "cpu", torch.float32)
        cache.indexer_keys.append(torch.randn(n, CFG.index_head_dim))
        caches.append(cache)
    return caches


def test_indexer_top_entries_all_rows_equal_one_row_at_a_time():
    torch.manual_seed(3)
    idx = Indexer(CFG)
    starts = [0, 5, 63, 64, 67, 200, 3]                  # 0, 1, 15, 16, 16, 50, 0 visible entries
    caches = _indexer_caches([(s + 1) // 4 for s in starts])
    S = 1
    q = torch.randn(len(starts), S, CFG.index_n_heads, CFG.index_head_dim)
    q[1, 0, :, :] = -q[1, 0, :, :].abs()                # zeros after the ReLU: ties broken by age
    w = torch.randn(len(starts), S, CFG.index_n_heads)
    got = idx._top_entries(q, w, idx._keys(caches), starts)
    k = got.shape[-1]
    assert k == min(CFG.index_topk, max((s + 1) // 4 for s in starts))
    for b, start in enumerate(starts):
        one = idx._top_entries(q[b:b + 1], w[b:b + 1], idx._keys(caches[b:b + 1]), [start])
        padded = torch.nn.functional.pad(one, (0, k - one.shape[-1]), value=-1)
        assert torch.equal(got[b:b + 1], padded), b
        visible = (start + 1) // 4
        chosen = got[b, 0][got[b, 0] >= 0]
        assert chosen.numel() == min(CFG.index_topk, visible) and bool((chosen < visible).all())
    # against a float64 reference of the scores, on the row with the most entries
    b = 5
    keys = caches[b].indexer_keys.view().double()
    scores = torch.einsum("hd,nd->hn", q[b, 0].double(), keys).relu() .mul(w[b, 0, :, None].double()).sum(0)
    ref = scores.topk(CFG.index_topk).indices
    assert set(got[b, 0].tolist()) == set(ref.tolist())
