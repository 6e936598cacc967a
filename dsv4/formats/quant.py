"""The two weight formats of the DeepSeek-V4 release, quantised and dequantised exactly.

FP8 (every quantised linear except the routed experts):
    weight  float8_e4m3fn [out, in]
    scale   float8_e8m0fnu [ceil(out/128), ceil(in/128)]   one power of two per 128x128 block
    W[i, j] = weight[i, j] * scale[i // 128, j // 128]

FP4 (routed experts, MXFP4-style):
    weight  int8 [out, in/2]    two e2m1 codes a byte, the even column in the low nibble
    scale   float8_e8m0fnu [out, in/32]                    one power of two per 1x32 block along `in`
    W[i, j] = E2M1[code(i, j)] * scale[i, j // 32]

UE8M0 scales are bare exponents: byte e means 2^(e - 127) (e = 255 is NaN). Every stored value is a
few-bit significand times a power of two, so dequantising in float32 is exact (down to 2^-136,
well inside float32's subnormals) and one cast to the compute dtype rounds once, as if from float64.
Quantising picks the smallest power-of-two scale that fits the block's largest magnitude
(`2^ceil(log2(amax / qmax))`), then rounds to nearest, ties to even. Re-quantising a dequantised
weight is lossless: its values are on the grid of a scale at least as fine, so they come back
exactly (the codes may differ: when rounding lowered a block's largest value below qmax/2 the new
scale is halved and the codes doubled). Hence save -> load -> dequantise reproduces the weights.
"""
from __future__ import annotations

import torch

from dsv4.formats.fakequant import round_to_e2m1

FP8_BLOCK = 128          # FP8 weight scale block: 128 x 128
FP4_BLOCK = 32           # FP4 weight scale block: 1 x 32 along the input dim
FP8_MAX = 448.0          # largest finite float8_e4m3fn
FP4_MAX = 6.0            # largest e2m1 magnitude
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127   # finite UE8M0 exponents (byte 0..254)

# e2m1 code -> value; bit 3 is the sign: 0, 0.5, 1, 1.5, 2, 3, 4, 6, then the negatives.
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = torch.tensor(_E2M1_MAGNITUDES + tuple(-v for v in _E2M1_MAGNITUDES))
# magnitude code of an e2m1 value, indexed by twice the magnitude (0, 1, 2, 3, 4, 6, 8, 12)
_E2M1_CODE_OF_TWICE = torch.tensor([0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7], dtype=torch.uint8)


# ---- UE8M0 scales -------------------------------------------------------------------------------
def e8m0_from_exponent(exponent: torch.Tensor) -> torch.Tensor:
    """Integer exponents in [-127, 127] -> float8_e8m0fnu scales 2^exponent."""
    if exponent.numel() and (exponent.min() < E8M0_MIN_EXP or exponent.max() > E8M0_MAX_EXP):
        raise ValueError(f"UE8M0 exponents must lie in [{E8M0_MIN_EXP}, {E8M0_MAX_EXP}], got "
                         f"[{int(exponent.min())}, {int(exponent.max())}]")
    return (exponent.to(torch.int32) + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def _power_of_two_exponent(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest e with amax / 2^e <= qmax (clamped to the UE8M0 range; an all-zero block gets
    the smallest scale, any scale being exact for it)."""
    amax = amax.double()   # amax / qmax must not round below the true ratio
    tiny = 2.0 ** (E8M0_MIN_EXP - 60)
    exponent = torch.ceil(torch.log2(torch.clamp(amax / qmax, min=tiny)))
    # log2 may be off by one ulp next to a power of two: settle the boundary exactly
    exponent = torch.where(amax > qmax * torch.exp2(exponent), exponent + 1, exponent)
    exponent = torch.where(amax <= qmax * torch.exp2(exponent - 1), exponent - 1, exponent)
    return exponent.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP).to(torch.int32)


def _check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out, in], got shape {tuple(t.shape)}")


def _expand_blocks(scale: torch.Tensor, rows: int, cols: int, block_rows: int,
                   block_cols: int) -> torch.Tensor:
    """[ceil(rows/br), ceil(cols/bc)] block scales -> one scale per element [rows, cols]."""
    return scale.repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_cols, 1)[:, :cols]


def _block_amax(w: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    """max |w| over each block_rows x block_cols block (the last blocks may be partial)."""
    rows, cols = w.shape
    pad_r, pad_c = -rows % block_rows, -cols % block_cols
    a = torch.nn.functional.pad(w.abs(), (0, pad_c, 0, pad_r))
    a = a.view(a.shape[0] // block_rows, block_rows, a.shape[1] // block_cols, block_cols)
    return a.amax(dim=(1, 3))


# ---- FP8 e4m3, 128x128 blocks -------------------------------------------------------------------
def fp8_scale_shape(out_features: int, in_features: int) -> tuple[int, int]:
    return (-(-out_features // FP8_BLOCK), -(-in_features // FP8_BLOCK))


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [out, in] -> (float8_e4m3fn [out, in], float8_e8m0fnu [ceil(out/128), ceil(in/128)])."""
    _check_2d("weight", w)
    w = w.float()
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantise a weight with inf/NaN entries to FP8")
    exponent = _power_of_two_exponent(_block_amax(w, FP8_BLOCK, FP8_BLOCK), FP8_MAX)
    inv = torch.exp2(-_expand_blocks(exponent, *w.shape, FP8_BLOCK, FP8_BLOCK).float())
    # w * 2^-e is exact in float32 wherever it can round to a nonzero e4m3 (|.| >= 2^-10), so
    # the cast rounds once; the clamp only guards |.| <= 448 against log2 ties
    q = (w * inv).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, e8m0_from_exponent(exponent)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(float8_e4m3fn [out, in], e8m0 [ceil(out/128), ceil(in/128)]) -> dtype [out, in], exact."""
    _check_2d("weight", weight)
    if weight.dtype != torch.float8_e4m3fn:
        raise TypeError(f"FP8 weight must be float8_e4m3fn, got {weight.dtype}")
    if tuple(scale.shape) != fp8_scale_shape(*weight.shape):
        raise ValueError(f"FP8 scale for weight {tuple(weight.shape)} must have shape "
                         f"{fp8_scale_shape(*weight.shape)}, got {tuple(scale.shape)}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    s = _expand_blocks(scale.to(work), *weight.shape, FP8_BLOCK, FP8_BLOCK)
    return (weight.to(work) * s).to(dtype)


# ---- FP4 e2m1, 1x32 blocks, two codes a byte ----------------------------------------------------
def fp4_scale_shape(out_features: int, in_features: int) -> tuple[int, int]:
    return (out_features, in_features // FP4_BLOCK)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [..., n] (n even) -> int8 [..., n/2], even index in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even last dim, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).view(torch.int8)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [..., n/2] -> uint8 codes [..., n] (inverse of pack_fp4)."""
    b = packed.view(torch.uint8)
    return torch.stack((b & 0x0F, b >> 4), dim=-1).flatten(-2)


def _e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Float values already in [-6, 6] -> nearest e2m1 code (ties to even, the rounding of the
    quantisation simulation); the sign bit kept, -0 included."""
    values = round_to_e2m1(x)
    magnitude = _E2M1_CODE_OF_TWICE.to(x.device)[(values.abs() * 2).long()]
    return magnitude | (torch.signbit(values).to(torch.uint8) << 3)


def quantize_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [out, in] (in % 32 == 0) -> (int8 packed [out, in/2], e8m0 [out, in/32])."""
    _check_2d("weight", w)
    out_features, in_features = w.shape
    if in_features % FP4_BLOCK:
        raise ValueError(f"FP4 weights need in_features % {FP4_BLOCK} == 0, got {in_features}")
    w = w.float()
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantise a weight with inf/NaN entries to FP4")
    exponent = _power_of_two_exponent(_block_amax(w, 1, FP4_BLOCK), FP4_MAX)
    inv = torch.exp2(-exponent.float()).repeat_interleave(FP4_BLOCK, 1)
    # exact in float32 wherever it matters: only results below 2^-126 lose bits, and those
    # round to 0 anyway
    codes = _e2m1_codes((w * inv).clamp(-FP4_MAX, FP4_MAX))
    return pack_fp4(codes), e8m0_from_exponent(exponent)


def dequantize_fp4(weight: torch.Tensor, scale: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(int8 packed [out, in/2], e8m0 [out, in/32]) -> dtype [out, in], exact."""
    _check_2d("weight", weight)
    if weight.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"packed FP4 weight must be int8 (two e2m1 codes a byte), got {weight.dtype}")
    out_features, in_features = weight.shape[0], weight.shape[1] * 2
    if tuple(scale.shape) != fp4_scale_shape(out_features, in_features):
        raise ValueError(f"FP4 scale for packed weight {tuple(weight.shape)} must have shape "
                         f"{fp4_scale_shape(out_features, in_features)}, got {tuple(scale.shape)}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    values = E2M1_VALUES.to(weight.device, work)[unpack_fp4(weight).long()]
    return (values * scale.to(work).repeat_interleave(FP4_BLOCK, 1)).to(dtype)
