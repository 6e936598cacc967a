"""dsv4.network.linear.Linear in its three storage formats: on-the-fly dequantised compute against a float64
reference, block-wise (chunked) compute, in-place dequantisation, dtype casts, checkpoint names."""
from __future__ import annotations

import secrets

import pytest
import torch

from dsv4.formats import quant
from dsv4.network import linear as linear_mod
from dsv4.network.linear import Linear

torch.set_num_threads(1)


@pytest.fixture
def gen():
    seed = secrets.randbits(32)
    print(f"seed={seed}")
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def reference_weight(layer: Linear) -> torch.Tensor:
    """The float64 weight a layer stands for, from quant's float64 dequantisation."""
    if layer.format == "fp8":
        return quant.dequantize_fp8(layer.weight, layer.scale, torch.float64)
    if layer.format == "fp4":
        return quant.dequantize_fp4(layer.weight, layer.scale, torch.float64)
    return layer.weight.double()


@pytest.mark.parametrize("fmt", ["float", "fp8", "fp4"])
def test_forward_matches_float64_reference(gen, fmt):
    layer = Linear(192, 300)
    if fmt != "float":
        layer.quantize_(fmt)
    assert layer.format == fmt
    x = torch.randn(3, 5, 192, generator=gen)
    ref = x.double() @ reference_weight(layer).T
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (3, 5, 300)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    yb = layer(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.double(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_blockwise_forward_equals_whole_weight(gen, fmt, monkeypatch):
    layer = Linear(128, 700).quantize_(fmt)
    x = torch.randn(4, 128, generator=gen)
    whole = x @ layer.dequantized_weight(torch.float32).T
    monkeypatch.setattr(linear_mod, "_CHUNK_ELEMENTS", 128 * 256)   # 256 rows a step: 3 steps
    torch.testing.assert_close(layer(x), whole, rtol=1e-6, atol=1e-6)


def test_dequantized_weight_is_exact_at_each_dtype(gen):
    layer = Linear(256, 260).quantize_("fp8")
    ref = reference_weight(layer)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(layer.dequantized_weight(dtype), ref.to(dtype))
    assert torch.equal(layer.dequantized_weight(torch.float32, slice(128, 260)),
                       ref[128:260].float())
    with pytest.raises(ValueError, match="multiple of 128"):
        layer.dequantized_weight(torch.float32, slice(5, 10))


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_dequantize_in_place(gen, fmt):
    layer = Linear(64, 96).quantize_(fmt)
    x = torch.randn(7, 64, generator=gen)
    before = layer(x)
    ref = reference_weight(layer)
    layer.dequantize_(torch.bfloat16)
    assert layer.format == "float" and layer.scale is None
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, ref.bfloat16())
    assert list(layer.state_dict()) == ["weight"]
    layer.dequantize_(torch.float32)          # a float layer just changes dtype
    # e4m3 and e2m1 values times a power of two are exact in bf16: nothing was lost on the way
    assert torch.equal(layer(x), before)


def test_checkpoint_names_dtypes_and_shapes():
    fp8 = Linear(4096, 1024).quantize_("fp8")
    sd = fp8.state_dict()
    assert list(sd) == ["weight", "scale"]
    assert sd["weight"].dtype == torch.float8_e4m3fn and sd["weight"].shape == (1024, 4096)
    assert sd["scale"].dtype == torch.float8_e8m0fnu and sd["scale"].shape == (8, 32)
    fp4 = Linear(4096, 2048).quantize_("fp4")      # Flash expert w1: [2048, 2048] I8, [2048, 128]
    assert fp4.weight.dtype == torch.int8 and fp4.weight.shape == (2048, 2048)
    assert fp4.scale.shape == (2048, 128)
    assert not fp4.weight.requires_grad and not fp4.scale.requires_grad
    assert "format=fp4" in repr(fp4)


def test_meta_layers_switch_format_without_data():
    with torch.device("meta"):
        layer = Linear(64, 40)
    layer.quantize_("fp4")
    assert layer.weight.is_meta and layer.weight.shape == (40, 32) and layer.scale.shape == (40, 2)
    layer.dequantize_(torch.bfloat16)
    assert layer.weight.is_meta and layer.weight.dtype == torch.bfloat16 and layer.scale is None


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_module_dtype_cast_dequantises_instead_of_reinterpreting(gen, fmt):
    model = torch.nn.Sequential(Linear(64, 128).quantize_(fmt))
    ref = reference_weight(model[0])
    model.to(torch.bfloat16)
    assert model[0].format == "float" and torch.equal(model[0].weight, ref.bfloat16())
    model2 = torch.nn.Sequential(Linear(64, 128).quantize_(fmt))
    ref2 = reference_weight(model2[0])
    model2.to("cpu")                                  # a device move keeps the format
    assert model2[0].format == fmt
    model2.float()
    assert model2[0].weight.dtype == torch.float32 and torch.equal(model2[0].weight, ref2.float())


def test_bad_formats_are_refused():
    with pytest.raises(ValueError, match="in_features % 32"):
        Linear(48, 16).quantize_("fp4")
    with pytest.raises(ValueError, match="unknown weight format"):
        Linear(64, 16).quantize_("int4")


def test_quant_sim_rounds_the_input_of_quantised_layers_only(gen):
    from dsv4.formats.fakequant import fp8_fake_quant
    x = torch.randn(3, 200, generator=gen)
    fp8 = Linear(200, 64).quantize_("fp8")
    plain = fp8(x)
    fp8.quant_sim = True
    padded = torch.nn.functional.pad(x, (0, 56))                   # 200 -> two 128-blocks
    rounded = fp8_fake_quant(padded, 128)[:, :200]
    assert not torch.equal(rounded, x)
    assert torch.equal(fp8(x), rounded @ fp8.dequantized_weight(torch.float32).T)
    assert not torch.equal(fp8(x), plain)
    dense = Linear(200, 64)
    dense.quant_sim = True                              # float in the release: no rounding
    assert torch.equal(dense(x), x @ dense.weight.T)
    fp8.dequantize_(torch.float32)                      # dequantised since: still an FP8 GEMM
    assert torch.equal(fp8(x), rounded @ fp8.weight.T)
