"""The one linear layer every projection of the model uses.

The model code only ever builds `Linear(in_features, out_features)` and calls it; how the weight is
stored is the loader's business (dsv4/checkpoint.py), so the layers stay readable. Three storage
formats, named as in the official checkpoint (`<name>.weight`, `<name>.scale`):

    "float"  weight float [out, in]                     scale: none
    "fp8"    weight float8_e4m3fn [out, in]             scale float8_e8m0fnu [ceil(out/128), ceil(in/128)]
    "fp4"    weight int8 [out, in/2] (two e2m1 a byte)  scale float8_e8m0fnu [out, in/32]

A quantised layer computes by dequantising its weight on the fly at the activation dtype, a block
of rows at a time, so a big FP8 / FP4 weight never exists in float all at once (dsv4/quant.py says
why the dequantised values are exact). `dequantize_` turns it into a float layer for good.
On CUDA (`ForwardOptions.quant_kernels`), an FP8 layer with bf16 / fp16 input instead runs the Triton FP8 GEMMs of
dsv4_kernels/fp8_gemm.py on the stored weight: FP8 x FP8 products when `quant_sim` rounds the input
(the kernel does that rounding itself), the FP8 weight widened in registers otherwise. The
dequantising forward stays their reference (same result up to fp32 summation order).
With `quant_sim` on (set through `Transformer.quant_sim`), a layer that is FP8 / FP4 in the release
also rounds its input as the official FP8 / FP4 GEMMs do (FP8 e4m3, a power-of-two scale per token
per 128 values), whether it still holds the quantised weight or was dequantised since.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.formats import quant
from dsv4.formats.fakequant import fp8_fake_quant
from dsv4.network.options import forward_options, kernel_enabled

WeightFormat = Literal["float", "fp8", "fp4"]

# Rows dequantised per step of the on-the-fly forward: a multiple of the FP8 block, sized so one
# step's float weight stays near 2^24 elements (64 MiB in float32).
_CHUNK_ELEMENTS = 1 << 24
ACT_BLOCK = 128          # activation quantisation block of the FP8 / FP4 GEMMs (1 x 128)


def quant_kernels_enabled(x: torch.Tensor) -> bool:
    """Whether quantised weights meeting `x` run the dsv4_kernels kernels
    (`ForwardOptions.quant_kernels` of the forward running now)."""
    return kernel_enabled(forward_options().quant_kernels, x)


class Linear(nn.Module):
    """y = x @ W^T (no bias anywhere in DSV4). W: [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.register_parameter("scale", None)
        self.quant_sim = False
        self.quantised_gemm = False    # FP8 / FP4 in the release: quant_sim rounds the input
        if not self.weight.is_meta:      # the loader builds on meta, where init is wasted work
            nn.init.normal_(self.weight, std=in_features**-0.5)

    # ---- storage format -------------------------------------------------------------------------
    @property
    def format(self) -> WeightFormat:
        if self.scale is None:
            return "float"
        return "fp8" if self.weight.dtype == torch.float8_e4m3fn else "fp4"

    def storage_shapes(self, fmt: WeightFormat) -> dict[str, tuple[int, ...]]:
        """Shapes of `weight` (and `scale`) in the given format, as in the checkpoint."""
        out_f, in_f = self.out_features, self.in_features
        if fmt == "float":
            return {"weight": (out_f, in_f)}
        if fmt == "fp8":
            return {"weight": (out_f, in_f), "scale": quant.fp8_scale_shape(out_f, in_f)}
        if fmt == "fp4":
            if in_f % quant.FP4_BLOCK:
                raise ValueError(f"FP4 needs in_features % {quant.FP4_BLOCK} == 0, got {in_f}")
            return {"weight": (out_f, in_f // 2), "scale": quant.fp4_scale_shape(out_f, in_f)}
        raise ValueError(f"unknown weight format {fmt!r}; expected 'float', 'fp8' or 'fp4'")

    def quantize_(self, fmt: Literal["fp8", "fp4"]) -> Linear:
        """Store the weight as `fmt` (round to nearest, power-of-two block scales). On the meta
        device this only switches dtypes and shapes, for the loader to fill."""
        shapes = self.storage_shapes(fmt)
        if fmt == "float":
            raise ValueError("quantize_ needs 'fp8' or 'fp4'; use dequantize_ for a float weight")
        self.quantised_gemm = True
        if self.weight.is_meta:
            wdtype = torch.float8_e4m3fn if fmt == "fp8" else torch.int8
            weight = torch.empty(shapes["weight"], dtype=wdtype, device="meta")
            scale = torch.empty(shapes["scale"], dtype=torch.float8_e8m0fnu, device="meta")
        else:
            w = self.dequantized_weight(torch.float32)
            weight, scale = quant.quantize_fp8(w) if fmt == "fp8" else quant.quantize_fp4(w)
        self._set_storage(weight, scale)
        return self

    def dequantize_(self, dtype: torch.dtype = torch.float32) -> Linear:
        """Replace a quantised weight by its exact float value at `dtype`; drop the scale."""
        if self.weight.is_meta:
            weight = torch.empty(self.out_features, self.in_features, dtype=dtype, device="meta")
        else:
            weight = self.dequantized_weight(dtype)
        self._set_storage(weight, None)
        return self

    def dequantized_weight(self, dtype: torch.dtype, rows: slice = slice(None)) -> torch.Tensor:
        """W[rows] as a float tensor of `dtype` ([n_rows, in_features]). For FP8 the row slice
        must start on a multiple of 128."""
        fmt = self.format
        if fmt == "float":
            return self.weight[rows].to(dtype)
        start, stop, _ = rows.indices(self.out_features)
        if fmt == "fp8":
            if start % quant.FP8_BLOCK:
                raise ValueError(f"FP8 row slices must start on a multiple of {quant.FP8_BLOCK}")
            first, last = start // quant.FP8_BLOCK, -(-stop // quant.FP8_BLOCK)
            return quant.dequantize_fp8(self.weight[start:stop], self.scale[first:last], dtype)
        return quant.dequantize_fp4(self.weight[start:stop], self.scale[start:stop], dtype)

    def _set_storage(self, weight: torch.Tensor, scale: torch.Tensor | None) -> None:
        floating = weight.dtype.is_floating_point and weight.dtype != torch.float8_e4m3fn
        # quantised codes and scales are not trainable values: keep autograd away from them
        self.weight = nn.Parameter(weight, requires_grad=floating and self.weight.requires_grad)
        self.scale = None if scale is None else nn.Parameter(scale, requires_grad=False)

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)`, `.float()`, `.half()` cast every floating tensor, which would
        # turn FP8 codes and e8m0 scales into meaningless floats; a dtype cast of a quantised layer
        # therefore dequantises it to that dtype instead. Device moves keep the format.
        if self.scale is None:
            return super()._apply(fn, recurse)
        weight, scale = self.weight.detach(), self.scale.detach()
        super()._apply(fn, recurse)
        if self.weight.dtype == weight.dtype and self.scale.dtype == scale.dtype:
            return self
        target = self.weight.dtype if self.weight.dtype != weight.dtype else self.scale.dtype
        device = self.weight.device
        self._set_storage(weight.to(device), scale.to(device))
        return self.dequantize_(target)

    # ---- compute ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        round_input = self.quant_sim and self.quantised_gemm
        if self.scale is not None and self.weight.dtype == torch.float8_e4m3fn \
                and x.dtype in (torch.bfloat16, torch.float16) and quant_kernels_enabled(x):
            import dsv4_kernels
            return dsv4_kernels.fp8_linear(x, self.weight, self.scale, fp8_activations=round_input)
        if round_input:
            x = _act_fake_quant(x)
        if self.scale is None:
            return F.linear(x, self.weight.to(x.dtype))
        rows = max(quant.FP8_BLOCK, _CHUNK_ELEMENTS // self.in_features
                   // quant.FP8_BLOCK * quant.FP8_BLOCK)
        if rows >= self.out_features:
            return F.linear(x, self.dequantized_weight(x.dtype))
        parts = [F.linear(x, self.dequantized_weight(x.dtype, slice(r, r + rows)))
                 for r in range(0, self.out_features, rows)]
        return torch.cat(parts, dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


def _act_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """x [..., in] rounded like the official act_quant (1 x 128 blocks); a partial last block
    (small test configs) is padded with zeros, which change no block maximum."""
    pad = -x.shape[-1] % ACT_BLOCK
    if not pad:
        return fp8_fake_quant(x, ACT_BLOCK)
    return fp8_fake_quant(F.pad(x, (0, pad)), ACT_BLOCK)[..., : x.shape[-1]]
