"""dsv4_kernels.fp8_gemm (Triton; the interpreter on CPU) against its torch references, and
dsv4.network.linear's dispatch to it. Small sizes on CPU; Flash projection shapes compiled on a GPU."""
from __future__ import annotations

import zlib

import pytest
import torch

import dsv4_kernels
from dsv4.formats import quant
from dsv4_kernels.fp8_gemm import act_quant, act_quant_reference, fp8_linear, fp8_linear_reference

pytestmark = pytest.mark.skipif(not dsv4_kernels.triton_available(), reason="Triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# ||y - ref|| / ||ref|| with ref in float64 from the same rounded operands: the products are exact,
# the sums fp32, the output bf16 (rounded on a GPU, truncated by the interpreter)
TOL = 1e-2 if DEVICE == "cpu" else 4e-3


def seeded(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def fp8_weight(g, N, K, scale_dtype=torch.float8_e8m0fnu):
    w, s = quant.quantize_fp8(torch.randn(N, K, generator=g).to(DEVICE) * K ** -0.5)
    return w, s.to(scale_dtype)


def rel_err(y, ref):
    assert torch.isfinite(y).all()
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("K", [256, 200])
def test_act_quant_equals_reference_bit_for_bit(K):
    g = seeded("aq", K)
    x = torch.randn(7, K, generator=g) * torch.logspace(-6, 3, 7)[:, None]   # scales far apart
    x[3] = 0                                                                    # amax floor 1e-4
    x[4, :5] = torch.tensor([448.0, -449.0, 1e-9, -0.0, 2.0 ** -9 * 1.5])
    x = x.bfloat16().to(DEVICE)
    q, s = act_quant(x)
    q_ref, s_ref = act_quant_reference(x)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    assert torch.equal(act_quant(x, fake=True), act_quant_reference(x, fake=True))
    if K % 128 == 0:
        assert torch.equal(act_quant(x, fake=True, permute=True), act_quant_reference(x, fake=True, permute=True))
    else:
        with pytest.raises(ValueError, match="whole 128-column groups"):
            act_quant(x, permute=True)


@pytest.mark.parametrize("fp8_activations", [True, False])
@pytest.mark.parametrize("path", ["small", "large"])
@pytest.mark.parametrize("M,N,K", [(1, 192, 256), (5, 130, 384), (33, 256, 200)])
def test_fp8_linear_matches_float64_reference(M, N, K, path, fp8_activations):
    g = seeded("gemm", M, N, K, path, fp8_activations)
    w, s = fp8_weight(g, N, K, torch.float8_e8m0fnu if K != 384 else torch.float32)
    x = torch.randn(M, K, generator=g).bfloat16().to(DEVICE)
    y = fp8_linear(x, w, s, fp8_activations=fp8_activations, config={"path": path})
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    err = rel_err(y, fp8_linear_reference(x, w, s, fp8_activations=fp8_activations))
    assert err < TOL, f"relative error {err:.2e}"


def test_split_k_and_leading_dims():
    """The decode kernel's K range split over programs, and [B, S, K] inputs."""
    g = seeded("split")
    w, s = fp8_weight(g, 128, 640)
    x = torch.randn(2, 3, 640, generator=g).bfloat16().to(DEVICE)
    ref = fp8_linear_reference(x, w, s, fp8_activations=True)
    for split in (1, 2, 5):
        y = fp8_linear(x, w, s, fp8_activations=True, config={"path": "small", "split": split})
        assert y.shape == (2, 3, 128) and rel_err(y, ref) < TOL


def test_activation_rounding_changes_the_result():
    """Guards against a kernel ignoring fp8_activations: the two numerics differ."""
    g = seeded("numerics")
    w, s = fp8_weight(g, 128, 256)
    x = torch.randn(4, 256, generator=g).bfloat16().to(DEVICE)
    a = fp8_linear(x, w, s, fp8_activations=True).float()
    b = fp8_linear(x, w, s, fp8_activations=False).float()
    assert (a - b).norm() > 1e-2 * b.norm()


@pytest.mark.parametrize("change, message", [
    (dict(x=torch.randn(2, 256)), "bf16 or fp16"),
    (dict(scale=torch.ones(1, 1)), "scale for weight"),
    (dict(weight=torch.zeros(128, 256, dtype=torch.bfloat16)), "float8_e4m3fn"),
    (dict(x=torch.randn(2, 100).bfloat16()), "features"),
])
def test_bad_input_is_named(change, message):
    w, s = quant.quantize_fp8(torch.randn(128, 256))
    args = dict(x=torch.randn(2, 256).bfloat16(), weight=w, scale=s)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        fp8_linear(args["x"], args["weight"], args["scale"], fp8_activations=True)


@pytest.mark.parametrize("quant_sim", [True, False])
def test_linear_dispatch_equals_dequantising_forward(monkeypatch, quant_sim):
    """dsv4's Linear: an FP8 layer through the kernel equals its dequantising forward (which
    rounds the input itself under quant_sim); float and fp32-input calls keep the torch path."""
    import dsv4.network.linear as linear
    from dsv4.network.options import ForwardOptions

    torch.manual_seed(0)
    layer = linear.Linear(256, 192).quantize_("fp8").to(DEVICE)
    layer.quant_sim = quant_sim
    x = torch.randn(3, 5, 256).bfloat16().to(DEVICE)
    calls = []
    real = dsv4_kernels.fp8_linear
    monkeypatch.setattr(dsv4_kernels, "fp8_linear", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    with ForwardOptions(quant_kernels="off").applied():
        want = layer(x)
    assert not calls
    with ForwardOptions(quant_kernels="always").applied():
        got = layer(x)
        assert calls == [{"fp8_activations": quant_sim}]
        assert rel_err(got, want.double()) < TOL
        layer(x.float())                               # fp32 input: the dequantising path
    assert len(calls) == 1
    with pytest.raises(ValueError, match="quant_kernels"):
        ForwardOptions(quant_kernels="sometimes")


# ---- GPU: Flash projection shapes, compiled -------------------------------------------------------
FLASH_SHAPES = {"wq_a": (1024, 4096), "wq_b": (32768, 1024), "wkv": (512, 4096), "wo_b": (4096, 8192),
                "shared w1": (2048, 4096), "shared w2": (4096, 2048), "indexer wq_b": (8192, 1024)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(FLASH_SHAPES))
def test_flash_shapes_on_gpu(name):
    from dsv4_kernels.fp8_gemm import scaled_mm_available

    N, K = FLASH_SHAPES[name]
    g = seeded("flash", name)
    w, s = fp8_weight(g, N, K)
    for M in (1, 7, 16, 100, 2048):
        x = torch.randn(M, K, generator=g).bfloat16().cuda()
        for fp8_activations in (True, False):
            paths = [None, "large"] + (["small"] if M <= 64 else []) \
                + (["scaled_mm"] if fp8_activations and scaled_mm_available(x.device) else [])
            ref = fp8_linear_reference(x, w, s, fp8_activations=fp8_activations)
            for path in paths:            # None: the path fp8_linear picks for the shape
                y = fp8_linear(x, w, s, fp8_activations=fp8_activations, config={"path": path})
                err = rel_err(y, ref)
                assert err < TOL, f"{name} M={M} {path} fp8_activations={fp8_activations}: {err:.2e}"
