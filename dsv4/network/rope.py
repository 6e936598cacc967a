"""Rotary position embedding on the trailing `rope_head_dim` dims of a head.

DeepSeek-V4 rotates *adjacent pairs* (x[2i], x[2i+1]) (GPT-J / interleaved style), only on the
last `rope_head_dim` (64) of the 512 dims. Two frequency sets:
- sliding-only layers: plain RoPE, theta = rope_theta (10000);
- compressed layers (CSA/HCA, their compressors and indexer): theta = compress_rope_theta (160000)
  with YaRN frequency interpolation (factor 16 over original_seq_len 65536); no mscale.
Angles are computed on the fly from absolute positions (fp32 `pos * inv_freq`, as the official
table), so no 1M-row table is kept in memory.
"""
from __future__ import annotations

import math

import torch

from dsv4.network.config import ModelConfig


def inv_frequencies(cfg: ModelConfig, compressed: bool) -> torch.Tensor:
    """[rope_head_dim // 2] fp32 inverse frequencies of one layer kind."""
    dim = cfg.rope_head_dim
    base = cfg.compress_rope_theta if compressed else cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if compressed and cfg.original_seq_len > 0:
        # YaRN: keep high frequencies (fast rotations), divide low ones by `rope_factor`,
        # with a linear ramp over the pair indices [low, high] in between.
        def pair_index(n_rotations: float) -> float:   # pair whose wavelength fits n rotations
            return dim * math.log(cfg.original_seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(pair_index(cfg.beta_fast)), 0)
        high = min(math.ceil(pair_index(cfg.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        freqs = freqs / cfg.rope_factor * ramp + freqs * (1 - ramp)
    return freqs


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [...] int -> (cos, sin) [..., rope_head_dim // 2] fp32."""
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the trailing 2*cos.shape[-1] dims of x in adjacent pairs; returns a new tensor.

    x: [..., S, (heads,) dim]; cos/sin: [..., S, rd/2] broadcast over the heads axis when x has one
    more dim than cos. `inverse` rotates by -angle (used on the attention output, since V = K
    carries the keys' rotation)."""
    rd = 2 * cos.shape[-1]
    if x.dim() == cos.dim() + 1:
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    # one complex product rotates every pair (a decode step is launch-bound: ~4 ops, not ~10)
    turn = torch.complex(cos, -sin if inverse else sin)
    pairs = torch.view_as_complex(x[..., -rd:].float().unflatten(-1, (-1, 2)))    # [..., rd/2]
    rotated = torch.view_as_real(pairs * turn).flatten(-2)
    return torch.cat((x[..., :-rd], rotated.to(x.dtype)), dim=-1)
