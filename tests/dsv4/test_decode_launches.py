"""Decode issues few ops: the Sinkhorn projection in its eps frame equals the textbook loop (float64
reference), so does the opt-in compiled one, and a batched decode step's ops from mHC, the
compressor and the indexer do not grow with the batch, with no host sync from them (counted by
bench/bench_decode.py's OpCounter)."""
from __future__ import annotations

import pytest
import torch

from bench.bench_decode import OpCounter
from dsv4.network import mhc
from dsv4.network.config import ModelConfig
from dsv4.network.mhc import sinkhorn_reference, sinkhorn_split
from dsv4.network.options import ForwardOptions

CFG = ModelConfig.tiny()
OWN = ("mhc", "compressor", "indexer", "rope", "norm")


def test_sinkhorn_frame_matches_float64_reference():
    g = torch.Generator().manual_seed(17)
    hc = CFG.hc_mult
    mixes = 3 * torch.randn(5, 7, (2 + hc) * hc, generator=g)
    scale, base = 0.5 + torch.rand(3, generator=g), torch.randn((2 + hc) * hc, generator=g)
    for iters in (1, 2, 20):
        got = sinkhorn_split(mixes, scale, base, hc, iters, 1e-6)
        want = sinkhorn_reference(mixes.double(), scale, base, hc, iters, 1e-6)
        for g_, w in zip(got, want):
            assert g_.dtype == torch.float32
            torch.testing.assert_close(g_.double(), w, atol=2e-6, rtol=0)
    torch.testing.assert_close(got[2].sum(-2), torch.ones(5, 7, hc), atol=1e-5, rtol=0)   # columns sum to 1


@pytest.mark.slow
def test_compiled_sinkhorn_matches_eager_hc_pre():
    """The opt-in torch.compile path (one compile, ~15 s on CPU) gives hc_pre's results."""
    g = torch.Generator().manual_seed(23)
    h = torch.randn(3, 1, CFG.hc_mult, 64, generator=g).bfloat16()
    fn = torch.randn((2 + CFG.hc_mult) * CFG.hc_mult, CFG.hc_mult * 64, generator=g) * 0.06
    scale, base = 0.5 + torch.rand(3, generator=g), torch.randn(fn.shape[0], generator=g)
    kw = dict(iters=CFG.hc_sinkhorn_iters, norm_eps=CFG.norm_eps, hc_eps=CFG.hc_eps)
    eager = mhc.hc_pre(h, fn, scale, base, **kw)
    with ForwardOptions(compile_sinkhorn=True).applied(), torch.inference_mode():
        compiled = mhc.hc_pre(h, fn, scale, base, **kw)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c.float(), e.float(), atol=2e-6, rtol=0)


def _step_counts(model, starts: list[int]) -> OpCounter:
    caches = []
    g = torch.Generator().manual_seed(len(starts))
    for n in starts:
        c = model.new_cache()
        model(torch.randint(0, CFG.vocab_size, (1, n), generator=g), caches=[c])
        caches.append(c)
    nxt = torch.randint(0, CFG.vocab_size, (len(starts), 1), generator=g)
    with torch.inference_mode(), OpCounter() as counter:
        model(nxt, caches=caches, last_only=True)
    return counter


def test_decode_ops_of_mhc_compressor_indexer_do_not_grow_with_batch(make_model):
    model = make_model(CFG, seed=2)
    # both batches hold rows that complete a block of 4 (start % 4 == 3) and rows that do not
    small = _step_counts(model, [3, 6])
    large = _step_counts(model, [3, 6, 7, 9, 11, 12, 130, 61])
    for name in ("mhc", "indexer"):
        assert large.ops[name] == small.ops[name] > 0, name
    # the compressor's per-step ops do not depend on B: only its multi-tensor copies take lists
    assert large.ops["compressor"] == small.ops["compressor"] > 0
    syncs = [s for s in list(small.syncs) + list(large.syncs) if s.split(":")[0] in OWN]
    assert not syncs, syncs
