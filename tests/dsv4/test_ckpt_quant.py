"""FP8 / FP4 weight formats: dequantisation exact against float64 references decoded from the bits,
quantisation equal to a brute-force nearest-value search, ties, scale edge cases, round trips."""
from __future__ import annotations

import secrets

import pytest
import torch

from dsv4.formats import quant

torch.set_num_threads(1)


@pytest.fixture
def gen():
    seed = secrets.randbits(32)
    print(f"seed={seed}")   # shown on failure
    return torch.Generator().manual_seed(seed)


# ---- float64 references, decoded from the bit patterns alone ------------------------------------
def e4m3_value(code: int) -> float:
    sign = -1.0 if code & 0x80 else 1.0
    exp, man = (code >> 3) & 0xF, code & 0x7
    if exp == 0xF and man == 0x7:
        return float("nan")
    if exp == 0:
        return sign * man / 8 * 2.0**-6
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


def e2m1_value(code: int) -> float:
    sign = -1.0 if code & 0x8 else 1.0
    exp, man = (code >> 1) & 0x3, code & 0x1
    return sign * (man * 0.5 if exp == 0 else (1 + man / 2) * 2.0 ** (exp - 1))


E4M3_TABLE = torch.tensor([e4m3_value(c) for c in range(256)], dtype=torch.float64)
E2M1_TABLE = torch.tensor([e2m1_value(c) for c in range(16)], dtype=torch.float64)


def e8m0_value(byte: int) -> float:
    return float("nan") if byte == 255 else 2.0 ** (byte - 127)


def ref_dequant_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    vals = E4M3_TABLE[weight.view(torch.uint8).long()]
    s = torch.tensor([[e8m0_value(b) for b in row] for row in scale.view(torch.uint8).tolist()],
                     dtype=torch.float64)
    s = s.repeat_interleave(128, 0)[: weight.shape[0]].repeat_interleave(128, 1)[:, : weight.shape[1]]
    return vals * s


def ref_dequant_fp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    b = packed.view(torch.uint8).long()
    codes = torch.empty(b.shape[0], b.shape[1] * 2, dtype=torch.long)
    codes[:, 0::2], codes[:, 1::2] = b % 16, b // 16      # even index = low nibble
    s = torch.tensor([[e8m0_value(x) for x in row] for row in scale.view(torch.uint8).tolist()],
                     dtype=torch.float64)
    return E2M1_TABLE[codes] * s.repeat_interleave(32, 1)


def ref_round(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Nearest finite table entry (ties: even code), by brute force over all codes."""
    finite = torch.isfinite(table)
    dist = (values.double()[..., None] - table).abs()
    dist[..., ~finite] = float("inf")
    best = dist.min(-1, keepdim=True).values
    tied = dist == best
    codes = torch.arange(table.numel())
    # among tied codes prefer the even one (mantissa lsb 0), and +0 over -0
    rank = torch.where(tied, (codes % 2) * 2 + (codes >= table.numel() // 2), 99)
    return rank.argmin(-1)


def random_fp8(gen, shape):
    codes = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x38          # replace NaN codes by 1.0
    return codes.view(torch.float8_e4m3fn)


def random_scales(gen, shape, low=100, high=150):
    return torch.randint(low, high, shape, generator=gen, dtype=torch.uint8).view(torch.float8_e8m0fnu)


# ---- dequantisation ----------------------------------------------------------------------------
def test_all_16_fp4_codes_decode_to_the_e2m1_table():
    assert quant.E2M1_VALUES.tolist() == E2M1_TABLE.tolist()
    assert E2M1_TABLE[:8].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    codes = torch.arange(16, dtype=torch.uint8).repeat(1, 2)          # [1, 32]: every code twice
    packed = quant.pack_fp4(codes)
    one = quant.e8m0_from_exponent(torch.zeros(1, 1, dtype=torch.int32))
    out = quant.dequantize_fp4(packed, one, torch.float64)
    assert out[0].tolist() == E2M1_TABLE.repeat(2).tolist()
    assert torch.signbit(out[0, 8])                                   # code 8 is -0.0


def test_fp4_packing_puts_the_even_index_in_the_low_nibble(gen):
    assert quant.pack_fp4(torch.tensor([[0x3, 0xA]])).view(torch.uint8).item() == 0xA3
    codes = torch.randint(0, 16, (7, 64), generator=gen, dtype=torch.uint8)
    packed = quant.pack_fp4(codes)
    assert packed.dtype == torch.int8 and packed.shape == (7, 32)
    assert torch.equal(quant.unpack_fp4(packed), codes)


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (5, 130)])
def test_fp8_dequant_is_exact_against_float64(gen, shape):
    weight = random_fp8(gen, shape)
    scale = random_scales(gen, quant.fp8_scale_shape(*shape))
    ref = ref_dequant_fp8(weight, scale)
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        got = quant.dequantize_fp8(weight, scale, dtype)
        assert got.dtype == dtype and got.shape == shape
        assert torch.equal(got, ref.to(dtype)), dtype


def test_fp4_dequant_is_exact_against_float64(gen):
    packed = torch.randint(-128, 128, (96, 80), generator=gen, dtype=torch.int8)
    scale = random_scales(gen, (96, 5))
    ref = ref_dequant_fp4(packed, scale)
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(quant.dequantize_fp4(packed, scale, dtype), ref.to(dtype)), dtype


@pytest.mark.parametrize("byte", [0, 1, 126, 127, 128, 200, 254])
def test_scale_edge_cases_match_float64(gen, byte):
    """Smallest (2^-127, a float32 subnormal) and largest (2^127) UE8M0 scales: the result is the
    exact product rounded once to the dtype (so 448 * 2^127 overflows float32 to inf, as the
    float64 product cast to float32 does; e4m3 subnormals times 2^-127 stay exact)."""
    scale_fp8 = torch.full((1, 1), byte, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    weight = torch.arange(256, dtype=torch.uint8)
    weight[(weight & 0x7F) == 0x7F] = 0
    weight = weight.view(torch.float8_e4m3fn).view(2, 128)
    ref = ref_dequant_fp8(weight, scale_fp8)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        assert torch.equal(quant.dequantize_fp8(weight, scale_fp8, dtype), ref.to(dtype))
    packed = quant.pack_fp4(torch.arange(16, dtype=torch.uint8).repeat(1, 2))
    ref4 = ref_dequant_fp4(packed, scale_fp8)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        assert torch.equal(quant.dequantize_fp4(packed, scale_fp8, dtype), ref4.to(dtype))


def test_nan_scale_propagates():
    nan_scale = torch.full((1, 1), 255, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    w = torch.ones(1, 8, dtype=torch.float8_e4m3fn)
    assert torch.isnan(quant.dequantize_fp8(w, nan_scale)).all()


# ---- quantisation ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(256, 256), (130, 300)])
def test_fp8_quantise_matches_brute_force_nearest(gen, shape):
    # blocks of very different magnitudes, some values far below the block max (e4m3 subnormals)
    w = torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-30, 30, (1,), generator=gen))
    w[:5, :7] *= 1e-4
    q, scale = quant.quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float8_e8m0fnu
    assert scale.shape == quant.fp8_scale_shape(*shape)
    s = ref_dequant_fp8(torch.ones(shape, dtype=torch.float8_e4m3fn), scale)
    # the scale is the smallest power of two with amax / s <= 448, per 128x128 block
    blocks = quant._block_amax(w.double(), 128, 128)
    s_blk = scale.to(torch.float64)
    assert (blocks <= 448 * s_blk).all() and (blocks > 224 * s_blk).all()
    expect = E4M3_TABLE[ref_round(w.double() / s, E4M3_TABLE)]
    assert torch.equal(E4M3_TABLE[q.view(torch.uint8).long()], expect)


def test_fp4_quantise_matches_brute_force_nearest(gen):
    w = torch.randn(40, 128, generator=gen) * torch.exp2(torch.randint(-20, 20, (40, 1), generator=gen).float())
    packed, scale = quant.quantize_fp4(w)
    assert packed.shape == (40, 64) and scale.shape == (40, 4)
    s = scale.to(torch.float64).repeat_interleave(32, 1)
    amax = w.abs().view(40, 4, 32).amax(-1).double()
    assert (amax <= 6 * scale.double()).all() and (amax > 3 * scale.double()).all()
    expect = E2M1_TABLE[ref_round(w.double() / s, E2M1_TABLE)]
    assert torch.equal(ref_dequant_fp4(packed, scale) / s, expect)


def test_fp4_ties_go_to_the_even_code():
    # block max 6 pins the scale to 1; then each midpoint between neighbours
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    expect = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    row = torch.tensor([6.0] + mids + [-m for m in mids] + [0.0] * 17).view(1, 32)
    packed, scale = quant.quantize_fp4(row)
    assert scale.float().item() == 1.0
    got = quant.dequantize_fp4(packed, scale)[0]
    assert got[1:8].tolist() == expect and got[8:15].tolist() == [-v for v in expect]


def test_scale_is_minimal_at_exact_powers_of_two():
    w = torch.zeros(128, 128)
    w[0, 0] = 448 * 2.0**-10                   # exactly representable with scale 2^-10
    _, s = quant.quantize_fp8(w)
    assert s.float().item() == 2.0**-10
    w[0, 0] = torch.nextafter(torch.tensor(448 * 2.0**-10), torch.tensor(1.0))
    _, s = quant.quantize_fp8(w)
    assert s.float().item() == 2.0**-9
    _, s = quant.quantize_fp4(torch.full((1, 32), 6.0 * 2**40))
    assert s.float().item() == 2.0**40


def test_zero_and_tiny_blocks_quantise_without_error():
    w = torch.zeros(128, 256)
    w[:, 128:] = 1e-38
    q, s = quant.quantize_fp8(w)
    d = quant.dequantize_fp8(q, s)
    assert torch.equal(d[:, :128], w[:, :128])
    assert torch.isfinite(d).all() and (d[:, 128:] - 1e-38).abs().max() < 1e-39


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_requantising_dequantised_weights_is_lossless(gen, fmt):
    qf, df = (quant.quantize_fp8, quant.dequantize_fp8) if fmt == "fp8" else \
        (quant.quantize_fp4, quant.dequantize_fp4)
    w = torch.randn(200, 256, generator=gen) * 0.02
    once = df(*qf(w))
    twice = df(*qf(once))
    assert torch.equal(once, twice)
    rel = ((once - w).abs().max() / w.abs().max()).item()
    assert 0 < rel < (2**-4 if fmt == "fp8" else 2**-2)   # half an ulp of the block max, at most


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="in_features % 32"):
        quant.quantize_fp4(torch.randn(4, 48))
    with pytest.raises(ValueError, match="inf/NaN"):
        quant.quantize_fp8(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"must have shape \(2, 1\)"):
        quant.dequantize_fp8(torch.zeros(200, 100, dtype=torch.float8_e4m3fn),
                             torch.ones(1, 1, dtype=torch.float8_e8m0fnu))
    with pytest.raises(TypeError, match="int8"):
        quant.dequantize_fp4(torch.zeros(4, 16), torch.ones(4, 1, dtype=torch.float8_e8m0fnu))
    with pytest.raises(ValueError, match="UE8M0 exponents"):
        quant.e8m0_from_exponent(torch.tensor([128]))
