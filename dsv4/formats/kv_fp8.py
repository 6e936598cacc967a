"""Quantised KV storage: FP8 main-attention entries in the layout of FlashMLA / vLLM ("fp8_ds_mla"),
and MXFP4 Lightning-Indexer keys.

One entry (a sliding-window token or a compressed entry; head_dim dims, NoPE first, RoPE last) is
stored as bytes. For DeepSeek-V4 (head_dim 512 = 448 NoPE + 64 RoPE) that is 584 bytes:

    bytes [0, 448)    NoPE dims as float8 e4m3, in 7 tiles of 64 dims
    bytes [448, 576)  RoPE dims as bf16 (64 x 2 bytes), kept exact
    bytes [576, 583)  one UE8M0 scale per NoPE tile (the byte is the power-of-two exponent + 127)
    byte  583         padding (the scale section is padded to a multiple of 8 bytes)

against 1024 bytes in bf16. The tile scale is 2^ceil(log2(max(amax, 1e-4) / 448)) (`fakequant.pow2_scale`), the rule the
model's own KV quantisation-aware simulation uses (official kernel.py `act_quant`, block 64,
`scale_fmt="ue8m0"`). The model already rounds these dims to exactly such FP8 values, so packing
its KV is lossless: unpack(pack(kv)) == kv bit for bit. Smaller test models use the same layout
with their own NoPE/RoPE split.

Indexer keys (index_head_dim = 128) are stored as MXFP4: 64 bytes of e2m1 codes (two a byte) and
one UE8M0 scale per 32 values, 68 bytes against 256 in bf16 (vLLM's FP4 indexer cache size). With
the quantisation simulation on, the model already rounds the keys to exactly such values
(Hadamard, then FP4 with the same scale rule), so this is lossless too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4.formats import quant
from dsv4.formats.fakequant import FP8_MAX, pow2_scale
from dsv4.formats.rows import GrowingRows

TILE = 64


@dataclass(frozen=True)
class Fp8KVLayout:
    head_dim: int = 512
    rope_dim: int = 64

    def __post_init__(self):
        if self.nope_dim <= 0 or self.nope_dim % TILE or self.rope_dim <= 0:
            raise ValueError(f"FP8 KV needs NoPE dims (head_dim - rope_dim) as a positive multiple of "
                             f"{TILE} and rope_dim > 0, got head_dim={self.head_dim} rope_dim={self.rope_dim}")

    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    @property
    def n_tiles(self) -> int:
        return self.nope_dim // TILE

    @property
    def _scales_at(self) -> int:
        return self.nope_dim + 2 * self.rope_dim

    @property
    def entry_bytes(self) -> int:
        """584 for DeepSeek-V4."""
        return self._scales_at + -(-self.n_tiles // 8) * 8

    def tile_scales(self, nope: torch.Tensor) -> torch.Tensor:
        """Power-of-two scale of each 64-dim tile. nope: [..., nope_dim] -> [..., n_tiles] float32."""
        amax = nope.float().unflatten(-1, (self.n_tiles, TILE)).abs().amax(-1)
        return pow2_scale(amax.clamp_min(1e-4), FP8_MAX)  # exactly the rounding the quant_sim KV saw

    def pack(self, kv: torch.Tensor) -> torch.Tensor:
        """kv: [..., head_dim] (bf16 or float) -> packed uint8 [..., entry_bytes]."""
        if kv.shape[-1] != self.head_dim:
            raise ValueError(f"FP8 KV packing needs entries of {self.head_dim} dims, got shape {tuple(kv.shape)}")
        n = self.nope_dim
        nope, rope = kv[..., :n].float(), kv[..., n:].to(torch.bfloat16)
        scale = self.tile_scales(nope)  # [..., n_tiles]
        q = (nope.unflatten(-1, (self.n_tiles, TILE)) / scale[..., None]).clamp(-FP8_MAX, FP8_MAX)
        out = torch.zeros(*kv.shape[:-1], self.entry_bytes, dtype=torch.uint8, device=kv.device)
        out[..., :n] = q.flatten(-2).to(torch.float8_e4m3fn).view(torch.uint8)
        out[..., n:self._scales_at] = rope.contiguous().view(torch.uint8)
        out[..., self._scales_at:self._scales_at + self.n_tiles] = \
            scale.to(torch.float8_e8m0fnu).view(torch.uint8)
        return out

    def unpack(self, packed: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """packed uint8 [..., entry_bytes] -> kv [..., head_dim] in `dtype`."""
        if packed.dtype != torch.uint8 or packed.shape[-1] != self.entry_bytes:
            raise ValueError(f"expected uint8 [..., {self.entry_bytes}], got {packed.dtype} {tuple(packed.shape)}")
        n, s = self.nope_dim, self._scales_at
        q = packed[..., :n].contiguous().view(torch.float8_e4m3fn).float()
        scale = packed[..., s:s + self.n_tiles].contiguous().view(torch.float8_e8m0fnu).float()
        nope = (q.unflatten(-1, (self.n_tiles, TILE)) * scale[..., None]).flatten(-2)
        rope = packed[..., n:s].contiguous().view(torch.bfloat16)
        return torch.cat([nope.to(dtype), rope.to(dtype)], dim=-1)


DSV4_LAYOUT = Fp8KVLayout(512, 64)


class Fp8Rows(GrowingRows):
    """A cache's growing buffer of compressed entries stored in the FP8 layout: `append` packs
    [n, head_dim] rows (or takes packed uint8 rows as saved), `view()` returns them dequantised
    to the cache dtype, `stored()` the packed bytes [n, entry_bytes]."""

    def __init__(self, layout: Fp8KVLayout, max_rows: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__(layout.entry_bytes, max_rows, torch.uint8, device)
        self.layout, self.out_dtype = layout, dtype

    def view(self) -> torch.Tensor:
        return self.layout.unpack(self.stored(), self.out_dtype)

    def append(self, rows: torch.Tensor) -> None:
        super().append(rows if rows.dtype == torch.uint8 else self.layout.pack(rows))

    def copy(self, device: torch.device | str | None = None) -> Fp8Rows:
        out = Fp8Rows(self.layout, self.max_rows, self.out_dtype, device or self.data.device)
        out.append(self.stored())
        return out


class Fp4Rows(GrowingRows):
    """A growing buffer of indexer keys stored as MXFP4: rows of width//2 code bytes then
    width//32 UE8M0 scale bytes (68 bytes for 128-dim keys); `view()` dequantises."""

    def __init__(self, width: int, max_rows: int, dtype: torch.dtype, device: torch.device | str):
        if width % quant.FP4_BLOCK:
            raise ValueError(f"MXFP4 keys need a width divisible by {quant.FP4_BLOCK}, got {width}")
        self.dim, self.out_dtype = width, dtype
        super().__init__(width // 2 + width // quant.FP4_BLOCK, max_rows, torch.uint8, device)

    def view(self) -> torch.Tensor:
        rows = self.stored()
        codes, scales = rows[:, : self.dim // 2], rows[:, self.dim // 2:]
        return quant.dequantize_fp4(codes.view(torch.int8), scales.view(torch.float8_e8m0fnu),
                                    self.out_dtype)

    def append(self, rows: torch.Tensor) -> None:
        if rows.dtype != torch.uint8:
            codes, scales = quant.quantize_fp4(rows)
            rows = torch.cat([codes.view(torch.uint8), scales.view(torch.uint8)], dim=1)
        super().append(rows)

    def copy(self, device: torch.device | str | None = None) -> Fp4Rows:
        out = Fp4Rows(self.dim, self.max_rows, self.out_dtype, device or self.data.device)
        out.append(self.stored())
        return out
