"""dsv4_kernels.fused_moe (Triton; the interpreter on CPU) against its float64 torch reference, and
dsv4.network.moe's dispatch to it (packing without copies, fallback when the experts are not FP4).
Small sizes on CPU; Flash expert dims compiled on a GPU."""
from __future__ import annotations

import zlib

import pytest
import torch

import dsv4_kernels
from dsv4.formats import quant
from dsv4_kernels.fused_moe import Fp4Experts, fused_moe, fused_moe_reference, routing_plan

pytestmark = pytest.mark.skipif(not dsv4_kernels.triton_available(), reason="Triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# against float64 sums of the same operands with h rounded where the kernel rounds it: what is
# left is fp32 summation order (and, with FP8 activations, the rare h that lands on the other
# side of an FP8 rounding boundary: one FP8 step on that element)
TOL = {False: 1e-4, True: 1e-2}


def seeded(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_experts(g, E, D, I, scale_dtype=torch.float8_e8m0fnu, first=0) -> Fp4Experts:
    def stack(out_f, in_f):
        pairs = [quant.quantize_fp4(torch.randn(out_f, in_f, generator=g).to(DEVICE) * in_f ** -0.5) for _ in range(E)]
        return (torch.stack([w for w, _ in pairs]).to(DEVICE),
                torch.stack([s for _, s in pairs]).to(scale_dtype).to(DEVICE))
    return Fp4Experts(*stack(I, D), *stack(I, D), *stack(D, I), first=first)


def routes(g, T, k, E):
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(DEVICE)
    return torch.rand(T, k, generator=g).to(DEVICE) + 0.1, ids


def rel_err(y, ref):
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("fp8_activations", [False, True])
@pytest.mark.parametrize("T,block_m", [(2, 16), (9, 64), (9, 128)])
def test_fused_moe_matches_reference(T, block_m, fp8_activations):
    g = seeded("moe", T, block_m, fp8_activations)
    E, D, I, k = 4, 256, 128, 2
    experts = make_experts(g, E, D, I, torch.float32 if T == 9 else torch.float8_e8m0fnu)
    w, ids = routes(g, T, k, E)
    x = torch.randn(T, D, generator=g).bfloat16().to(DEVICE)
    kw = dict(swiglu_limit=0.5, fp8_activations=fp8_activations)      # the clamp bites at this size
    y = fused_moe(x, w, ids, experts, n_routed_experts=E, block_m=block_m, **kw)
    err = rel_err(y, fused_moe_reference(x, w, ids, experts, **kw))
    assert err < TOL[fp8_activations], f"relative error {err:.2e}"


def test_expert_parallel_slice_leaves_other_slots_zero():
    g = seeded("ep")
    E, D, I, T, k = 4, 128, 128, 6, 2
    full = make_experts(g, E, D, I)
    part = Fp4Experts(*(t[2:].contiguous() for t in (full.w1, full.s1, full.w3, full.s3, full.w2, full.s2)),
                      first=2)
    w, ids = routes(g, T, k, E)
    x = torch.randn(T, D, generator=g).bfloat16().to(DEVICE)
    kw = dict(swiglu_limit=0.0, fp8_activations=False)
    y = fused_moe(x, w, ids, part, n_routed_experts=E, **kw)
    assert rel_err(y, fused_moe_reference(x, w, ids, part, **kw)) < TOL[False]
    untouched = ~((ids >= 2).any(1))
    assert (y[untouched] == 0).all()


def test_routing_plan_blocks_cover_each_assignment_once():
    g = seeded("plan")
    ids = torch.randint(0, 8, (37, 3), generator=g)
    plan = routing_plan(ids, first=0, n_experts=8, block_m=4, all_local=True)
    seen = []
    for e, r0, r1 in zip(plan.block_expert.tolist(), plan.block_row0.tolist(), plan.block_row1.tolist()):
        if e < 0:
            continue
        assert 0 < r1 - r0 <= 4
        rows = plan.order[r0:r1]
        assert (ids.flatten()[rows] == e).all()
        seen += rows.tolist()
    assert sorted(seen) == list(range(ids.numel()))


def test_bad_experts_are_named():
    g = seeded("bad")
    good = make_experts(g, 2, 128, 128)
    with pytest.raises(ValueError, match="w2 must be"):
        Fp4Experts(good.w1, good.s1, good.w3, good.s3, good.w2[:, :64].contiguous(), good.s2)
    with pytest.raises(ValueError, match="divisible by 128"):
        make_experts(g, 2, 96, 128)


@pytest.mark.parametrize("quant_sim", [False, True])
def test_moe_module_dispatch_equals_expert_loop(monkeypatch, quant_sim):
    """dsv4's MoE on FP4 experts: the fused path (quant_kernels="always") equals the per-expert
    loop; packing re-points the experts' weights at views of the stacks (no second copy)."""
    from dsv4.network.config import ModelConfig
    from dsv4.network.moe import MoE
    from dsv4.network.options import ForwardOptions

    torch.manual_seed(0)
    cfg = ModelConfig.tiny().replace(dim=128, moe_inter_dim=128, n_routed_experts=4, n_activated_experts=2)
    moe = MoE(cfg, layer_id=3)
    for e in moe.experts:
        for layer in (e.w1, e.w2, e.w3):
            layer.quantize_("fp4")
    moe = moe.to(DEVICE)
    for m in moe.modules():
        if hasattr(m, "quant_sim"):
            m.quant_sim = quant_sim
    x = torch.randn(1, 7, 128).bfloat16().to(DEVICE)
    ids = torch.randint(0, cfg.vocab_size, (1, 7)).to(DEVICE)
    with ForwardOptions(quant_kernels="off").applied():
        want = moe(x, ids)
    assert moe._packed is None
    with ForwardOptions(quant_kernels="always").applied():
        got = moe(x, ids)
    packed = moe._packed
    assert packed is not None
    assert moe.experts[1].w1.weight.data_ptr() == packed.w1[1].data_ptr()
    assert moe.experts[3].w2.scale.data_ptr() == packed.s2[3].data_ptr()
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert err < (3e-2 if quant_sim else 1e-2), f"{err:.2e}"
    assert moe.pack_experts() and moe._packed.w1.data_ptr() == packed.w1.data_ptr()   # no re-copy
    for e in moe.experts:                      # no longer FP4: the per-expert loop again
        e.w1.dequantize_(torch.bfloat16)
    with ForwardOptions(quant_kernels="always").applied():
        assert moe._fused_experts(x.view(-1, 128)) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [1, 32, 512])
def test_flash_expert_dims_on_gpu(T):
    g = seeded("flash-moe", T)
    E, D, I, k = 16, 4096, 2048, 6
    experts = make_experts(g, E, D, I)
    w, ids = routes(g, T, k, E)
    x = torch.randn(T, D, generator=g).bfloat16().cuda()
    for fp8_activations in (False, True):
        kw = dict(swiglu_limit=10.0, fp8_activations=fp8_activations)
        y = fused_moe(x, w, ids, experts, n_routed_experts=E, **kw)
        err = rel_err(y, fused_moe_reference(x, w, ids, experts, **kw))
        assert err < TOL[fp8_activations], f"T={T} fp8={fp8_activations}: {err:.2e}"
