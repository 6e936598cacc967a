"""In-graph quantisation *simulations* (quantise, then de-quantise in place of the value).

DeepSeek-V4 was trained with quantisation-aware training; the official inference code reproduces
the rounding the model saw in training (reference §2.10), and `quant_sim=True` does the same:
- KV (sliding window and main compressed entries): the NoPE dims go through FP8 e4m3 with one
  power-of-two (UE8M0) scale per 64 values; the RoPE dims stay in the activation dtype.
- Lightning Indexer queries and keys: Hadamard rotation, then FP4 e2m1 with one power-of-two
  scale per 32 values.
- `fp8_fake_quant(x, 128)` is also the activation rounding of the official FP8/FP4 GEMMs (per-token
  1x128 blocks), for weight-storage code that simulates it.
Scales follow the official kernels: s = 2^ceil(log2(amax * (1 / qmax))) in fp32, the exponent
taken exactly (as their bit manipulation does), and the cast rounds to nearest, ties to even.
All functions return a new tensor in x's dtype; block sizes must divide the last dim.
"""
from __future__ import annotations

import functools

import torch

FP8_MAX = 448.0            # largest finite float8_e4m3fn
FP4_MAX = 6.0              # largest e2m1 value
FP4_MIN_AMAX = 6.0 * 2.0**-126


def pow2_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """UE8M0 scale 2^ceil(log2(amax * (1 / qmax))), amax fp32 > 0. frexp gives r = m * 2^e with
    m in [0.5, 1): ceil(log2 r) is e, or e - 1 when r is exactly 2^(e-1)."""
    mantissa, exponent = torch.frexp(amax * (1.0 / qmax))
    return torch.ldexp(torch.ones_like(amax), exponent - (mantissa == 0.5).to(exponent.dtype))


def fp8_fake_quant(x: torch.Tensor, block: int) -> torch.Tensor:
    """Round x to FP8 e4m3 with a power-of-two scale per `block` values of the last dim."""
    blocks = x.float().unflatten(-1, (-1, block))                          # [..., n, block]
    scale = pow2_scale(blocks.abs().amax(-1, keepdim=True).clamp_min(1e-4), FP8_MAX)
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return (q * scale).flatten(-2).to(x.dtype)


def round_to_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Round fp32 values in [-6, 6] to the nearest e2m1 value (0, .5, 1, 1.5, 2, 3, 4, 6), ties to
    even mantissa, as a hardware cast does. The grid step is 0.5 below 2, 1 in [2, 4), 2 above."""
    a = v.abs()
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    return torch.copysign(torch.round(a / step) * step, v)                 # round(): half to even


def fp4_fake_quant(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Round x to FP4 e2m1 with a power-of-two scale per `block` values of the last dim."""
    blocks = x.float().unflatten(-1, (-1, block))
    scale = pow2_scale(blocks.abs().amax(-1, keepdim=True).clamp_min(FP4_MIN_AMAX), FP4_MAX)
    q = round_to_e2m1((blocks / scale).clamp(-FP4_MAX, FP4_MAX))
    return (q * scale).flatten(-2).to(x.dtype)


@functools.lru_cache(maxsize=8)
def _hadamard_matrix(n: int, device: torch.device) -> torch.Tensor:
    """Sylvester Hadamard matrix [n, n] (+-1 entries), n a power of two, fp32."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    if h.shape[0] != n:
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    return h.to(device)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform of the last dim (scale n^-1/2), in fp32, back to
    x's dtype. Orthogonal, so it leaves dot products unchanged; it spreads outliers before FP4."""
    n = x.shape[-1]
    return (x.float() @ _hadamard_matrix(n, x.device) * n**-0.5).to(x.dtype)
