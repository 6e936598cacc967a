"""dsv4_kernels.mhc (Triton; the interpreter on CPU) against its torch references in float64, the
references against the model's own mHC (dsv4/network/mhc.py), and the model's dispatch to them."""
from __future__ import annotations

import random

import pytest
import torch

import dsv4_kernels
from dsv4.network import mhc as model_mhc
from dsv4_kernels import mhc

pytestmark = pytest.mark.skipif(not dsv4_kernels.triton_available(), reason="Triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SETTINGS = {"iters": 20, "norm_eps": 1e-6, "hc_eps": 1e-6}
# ||out - ref|| / ||ref|| against float64: the kernels compute in fp32 (x, new streams rounded to
# the stream dtype: bf16 keeps 8 bits)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture
def g():
    seed = random.randrange(2**31)
    print(f"seed {seed}")
    return torch.Generator().manual_seed(seed)


def inputs(g, T, hc, D, dtype, head=False):
    h = torch.randn(T, hc, D, generator=g).to(dtype)
    n_mix = hc if head else (2 + hc) * hc
    fn = torch.randn(n_mix, hc * D, generator=g) / (hc * D) ** 0.5 * 4   # mixes of order 1..4
    scale = torch.rand(1 if head else 3, generator=g) + 0.5
    base = torch.randn(n_mix, generator=g)
    return [t.to(DEVICE) for t in (h, fn, scale, base)]


def rel(out, ref):
    assert torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,D", [(1, 64), (5, 48), (3, 600), (2, 300)])   # past one block, ragged, uneven splits
def test_hc_pre_and_post_match_float64(g, dtype, T, D):
    h, fn, scale, base = inputs(g, T, 4, D, dtype)
    x, post, comb = mhc.hc_pre(h, fn, scale, base, **SETTINGS)
    rx, rpost, rcomb = mhc.hc_pre_reference(h.double(), fn.double(), scale.double(), base.double(),
                                            **SETTINGS)
    assert x.dtype == dtype and x.shape == (T, D)
    assert rel(x, rx) < TOL[dtype] and rel(post, rpost) < 1e-5 and rel(comb, rcomb) < 1e-5
    out = torch.randn(T, D, generator=g).to(dtype).to(DEVICE)
    new = mhc.hc_post(out, h, post, comb)
    ref = mhc.hc_post_reference(out.double(), h.double(), post.double(), comb.double())
    assert new.dtype == dtype and new.shape == h.shape and rel(new, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hc_head_matches_float64(g, dtype):
    h, fn, scale, base = inputs(g, 4, 4, 96, dtype, head=True)
    out = mhc.hc_head(h, fn, scale, base, norm_eps=1e-6, hc_eps=1e-6)
    ref = mhc.hc_head_reference(h.double(), fn.double(), scale.double(), base.double(),
                                norm_eps=1e-6, hc_eps=1e-6)
    assert rel(out, ref) < TOL[dtype]


def test_references_equal_the_model_mhc(g):
    """The per-token references compute what dsv4/network/mhc.py computes on [B, S, hc, D] (which
    computes in fp32 whatever the input: fp32 tolerances)."""
    h, fn, scale, base = (t.cpu().double() for t in inputs(g, 6, 4, 32, torch.float64))
    x, post, comb = model_mhc.hc_pre(h.view(2, 3, 4, 32), fn, scale, base, **SETTINGS)
    rx, rpost, rcomb = mhc.hc_pre_reference(h, fn, scale, base, **SETTINGS)
    torch.testing.assert_close(x.reshape(6, 32).double(), rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(comb.reshape(6, 4, 4).double(), rcomb, rtol=1e-5, atol=1e-5)
    out = torch.randn(6, 32, generator=g, dtype=torch.float64)
    new = model_mhc.hc_post(out.view(2, 3, 32), h.view(2, 3, 4, 32), post, comb)
    torch.testing.assert_close(new.reshape(6, 4, 32), mhc.hc_post_reference(out, h, rpost, rcomb),
                               rtol=1e-5, atol=1e-5)
    _, hfn, hscale, hbase = (t.cpu().double() for t in inputs(g, 6, 4, 32, torch.float64, head=True))
    torch.testing.assert_close(model_mhc.hc_head(h.view(2, 3, 4, 32), hfn, hscale, hbase, norm_eps=1e-6,
                                                 hc_eps=1e-6).reshape(6, 32),
                               mhc.hc_head_reference(h, hfn, hscale, hbase, norm_eps=1e-6, hc_eps=1e-6),
                               rtol=1e-5, atol=1e-5)


def test_model_dispatches_to_the_kernels_on_cuda(g, monkeypatch):
    """On CUDA tensors the model's mHC runs the fused kernels (one launch each); elsewhere the torch
    path. Checked by counting calls, on whichever device this machine has."""
    calls = []
    for name in ("hc_pre", "hc_post", "hc_head"):
        real = getattr(mhc, name)
        monkeypatch.setattr(mhc, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    h, fn, scale, base = inputs(g, 6, 4, 32, torch.float32)
    x, post, comb = model_mhc.hc_pre(h.view(2, 3, 4, 32), fn, scale, base, **SETTINGS)
    model_mhc.hc_post(x, h.view(2, 3, 4, 32), post, comb)
    assert calls == (["hc_pre", "hc_post"] if DEVICE == "cuda" else [])
