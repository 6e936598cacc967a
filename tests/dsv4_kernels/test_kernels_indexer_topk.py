"""dsv4_kernels.indexer_topk (Triton; the interpreter on CPU) against its torch reference, dsv4's
Indexer dispatch, and the whole release-format model with every kernel against the torch paths."""
from __future__ import annotations

import zlib

import pytest
import torch

import dsv4_kernels
from dsv4_kernels.indexer_topk import indexer_topk, indexer_topk_reference

pytestmark = pytest.mark.skipif(not dsv4_kernels.triton_available(), reason="Triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def seeded(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_picks_equal_reference_with_exact_ties(dtype):
    """Small integers: every score is exact in either summation order, and ReLU makes many exact
    ties (0 among them), which both must break towards the smaller index."""
    g = seeded("ties", dtype)
    B, S, H, d, N, k = 2, 37, 4, 64, 90, 16
    q = torch.randint(-3, 4, (B, S, H, d), generator=g).to(dtype).to(DEVICE)
    keys = torch.randint(-2, 3, (B, N, d), generator=g).to(dtype).to(DEVICE)
    w = torch.randint(-2, 3, (B, S, H), generator=g).float().to(DEVICE)
    visible = torch.randint(0, N + 1, (B, S), generator=g).to(DEVICE)
    visible[0, 0], visible[1, 3] = 0, N
    got = indexer_topk(q, w, keys, visible, k)
    want = indexer_topk_reference(q, w, keys, visible, k)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert (got[0, 0] == -1).all()
    assert (indexer_topk(q, w, keys, visible, 0).shape == (B, S, 0))


def test_bad_input_is_named():
    q, w, keys, vis = torch.zeros(1, 2, 4, 64), torch.zeros(1, 2, 4), torch.zeros(1, 5, 64), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="weights must be"):
        indexer_topk(q, w[:, :1], keys, vis, 2)
    with pytest.raises(ValueError, match="k must be"):
        indexer_topk(q, w, keys, vis, 6)
    with pytest.raises(ValueError, match="visible must be"):
        indexer_topk(q, w, keys, vis.float(), 2)


def test_release_model_with_kernels_equals_torch_paths(monkeypatch):
    """The tiny schedule (sliding, CSA, HCA; hash and biased MoE) in release formats, experts FP8
    here (FP4 experts: test_kernels_fused_moe.py; their FP8 rounding of h can flip an element
    against the expert loop's, and a random 4-layer model amplifies that), quant_sim on, bf16,
    top-4 so a short prompt already selects: a chunked prefill then one decode step, once through
    the torch paths and once through the FP8 GEMMs and the fused indexer (the interpreter on
    CPU). FP8 products are exact and the picks tie-break alike, so the logits agree to fp32 order."""
    from dsv4.loading.testing import random_release_model
    from dsv4.network.config import ModelConfig
    from dsv4.network.options import ForwardOptions

    cfg = ModelConfig.tiny().replace(n_mtp_layers=0, compress_ratios=(0, 4, 128, 4), index_topk=4,
                                     expert_dtype=None)
    model = random_release_model(cfg, DEVICE, seed=3, quant_sim=True)
    ids = torch.randint(0, cfg.vocab_size, (1, 30), generator=seeded("ids")).to(DEVICE)
    calls = []
    real_gemm, real_topk = dsv4_kernels.fp8_linear, dsv4_kernels.indexer_topk
    monkeypatch.setattr(dsv4_kernels, "fp8_linear", lambda *a, **kw: calls.append("gemm") or real_gemm(*a, **kw))
    monkeypatch.setattr(dsv4_kernels, "indexer_topk", lambda *a, **kw: calls.append("topk") or real_topk(*a, **kw))

    def run(mode):
        options = ForwardOptions(quant_kernels=mode, indexer_kernel=mode)
        cache = model.new_cache()
        with torch.no_grad():
            return torch.cat([model(ids[:, a:b], caches=[cache], options=options)
                              for a, b in ((0, 16), (16, 29), (29, 30))], 1).float()

    torch_path = run("off")
    assert not calls
    kernel_path = run("always")
    assert calls.count("topk") == 6           # 3 forwards x 2 CSA layers
    assert calls.count("gemm") > 3 * 4 * 6    # every FP8 projection of every layer
    err = ((kernel_path - torch_path).norm() / torch_path.norm()).item()
    assert err < 1e-3, f"kernel path differs from the torch path by {err:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flash_indexer_dims_on_gpu():
    """64 heads x 128, 8K-token prompt block of 512 queries over 2,048 entries, top-512: the
    picks' total score equals the reference's up to fp32 summation noise (near-ties may swap)."""
    g = seeded("flash-ix")
    B, S, H, d, N, k = 1, 512, 64, 128, 2048, 512
    q = torch.randn(B, S, H, d, generator=g).bfloat16().cuda()
    keys = torch.randn(B, N, d, generator=g).bfloat16().cuda()
    w = (torch.randn(B, S, H, generator=g) * (d * H) ** -0.5).cuda()
    visible = torch.arange(N - S, N).view(1, S).cuda()
    got = indexer_topk(q, w, keys, visible, k)
    want = indexer_topk_reference(q, w, keys, visible, k)
    scores = torch.einsum("bthd,bnd->bthn", q.float(), keys.float()).relu_()
    scores = torch.einsum("bthn,bth->btn", scores, w)

    def total(p):
        return scores.gather(-1, p.clamp(min=0)).masked_fill(p < 0, 0).sum(-1)

    assert torch.equal((got >= 0).sum(-1), (want >= 0).sum(-1))
    gap = (total(want) - total(got)).abs() / total(want).abs()
    assert gap.max() < 1e-5
    assert (got == want).float().mean() > 0.99
