"""FP8 storage of main-attention KV entries in the 584-byte layout of FlashMLA / vLLM ("fp8_ds_mla").

One entry (a sliding-window token or a compressed entry, 512 dims: 448 NoPE then 64 RoPE) is
stored as 584 bytes:

    bytes [0, 448)    NoPE dims as float8 e4m3, in 7 tiles of 64 dims
    bytes [448, 576)  RoPE dims as bf16 (64 x 2 bytes), kept exact
    bytes [576, 583)  one UE8M0 scale per NoPE tile (the byte is the power-of-two exponent + 127)
    byte  583         padding

against 1024 bytes in bf16. The tile scale is 2^ceil(log2(max(amax, 1e-4) / 448)), the rule the
model's own KV quantisation-aware simulation uses (official kernel.py `act_quant`, block 64,
`scale_fmt="ue8m0"`). The model already rounds these dims to exactly such FP8 values, so packing
its KV is lossless: unpack(pack(kv)) == kv bit for bit.
"""
from __future__ import annotations

import torch

HEAD_DIM, NOPE_DIM, ROPE_DIM, TILE = 512, 448, 64, 64
N_TILES = NOPE_DIM // TILE  # 7
ENTRY_BYTES = NOPE_DIM + 2 * ROPE_DIM + N_TILES + 1  # 584
BF16_ENTRY_BYTES = 2 * HEAD_DIM  # 1024
FP8_MAX = 448.0
_SCALE_AT, _PAD_AT = NOPE_DIM + 2 * ROPE_DIM, NOPE_DIM + 2 * ROPE_DIM + N_TILES


def tile_scales(nope: torch.Tensor) -> torch.Tensor:
    """Power-of-two scale of each 64-dim tile. nope: [..., 448] -> [..., 7] float32."""
    amax = nope.float().unflatten(-1, (N_TILES, TILE)).abs().amax(-1)
    return torch.exp2(torch.ceil(torch.log2(amax.clamp_min(1e-4) / FP8_MAX)))


def pack(kv: torch.Tensor) -> torch.Tensor:
    """kv: [..., 512] (bf16 or float) -> packed uint8 [..., 584]."""
    if kv.shape[-1] != HEAD_DIM:
        raise ValueError(f"FP8 KV packing needs entries of {HEAD_DIM} dims, got shape {tuple(kv.shape)}")
    lead = kv.shape[:-1]
    nope, rope = kv[..., :NOPE_DIM].float(), kv[..., NOPE_DIM:].to(torch.bfloat16)
    scale = tile_scales(nope)  # [..., 7]
    q = (nope.unflatten(-1, (N_TILES, TILE)) / scale[..., None]).clamp(-FP8_MAX, FP8_MAX)
    out = torch.empty(*lead, ENTRY_BYTES, dtype=torch.uint8, device=kv.device)
    out[..., :NOPE_DIM] = q.flatten(-2).to(torch.float8_e4m3fn).view(torch.uint8)
    out[..., NOPE_DIM:_SCALE_AT] = rope.contiguous().view(torch.uint8)
    out[..., _SCALE_AT:_PAD_AT] = scale.to(torch.float8_e8m0fnu).view(torch.uint8)
    out[..., _PAD_AT] = 0
    return out


def unpack(packed: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """packed uint8 [..., 584] -> kv [..., 512] in `dtype`."""
    if packed.dtype != torch.uint8 or packed.shape[-1] != ENTRY_BYTES:
        raise ValueError(f"expected uint8 [..., {ENTRY_BYTES}], got {packed.dtype} {tuple(packed.shape)}")
    q = packed[..., :NOPE_DIM].contiguous().view(torch.float8_e4m3fn).float()
    scale = packed[..., _SCALE_AT:_PAD_AT].contiguous().view(torch.float8_e8m0fnu).float()
    nope = (q.unflatten(-1, (N_TILES, TILE)) * scale[..., None]).flatten(-2)
    rope = packed[..., NOPE_DIM:_SCALE_AT].contiguous().view(torch.bfloat16)
    return torch.cat([nope.to(dtype), rope.to(dtype)], dim=-1)
