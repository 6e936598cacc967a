"""FP8 block-scaled linear layers (the release's dense projections): Triton kernels and the torch
reference they must equal.

    weight  float8_e4m3fn [N, K]         scale [ceil(N/128), ceil(K/128)]  UE8M0 (or fp32)
    y[m, n] = sum_k x[m, k] * weight[n, k] * scale[n // 128, k // 128]

Two numerics, chosen by `fp8_activations`:
  - fp8_activations=True (the official inference, our `quant_sim`): x is first rounded to FP8 e4m3 with
    one power-of-two scale per token per 128 values (official `act_quant`: s = 2^ceil(log2(max(amax,
    1e-4) / 448))), so both operands are FP8 and the products run on the FP8 tensor cores;
  - fp8_activations=False (the exact float network): x stays bf16 / fp16 and the FP8 weight tile is
    widened to x's dtype in registers (exact: e4m3 fits in bf16), bf16 / fp16 tensor cores.
Either way each 128-deep slice of the reduction is one dot into a fresh fp32 tile, multiplied by its
scales and added to an fp32 accumulator (the FP8 MMA's own accumulator keeps fewer bits, so it is
never carried across scale blocks: DeepGEMM's "promotion").

Kernels:
  - `act_quant(x)`: x [M, K] -> (FP8 [M, K], fp32 scales [M, ceil(K/128)]), one pass; with
    `fake=True` the rounded values in x's dtype instead (what `quant_sim` feeds a float GEMM);
    `permute=True` also reorders each 128-column group to its even columns then its odd ones (the
    order the fused MoE's FP4 weights unpack in, dsv4_kernels/fused_moe.py).
  - prefill / large M: a tiled GEMM (128 x 128 output tiles, grouped launch order for L2 reuse) over
    the FP8 activations `act_quant` wrote;
  - decode / small M (<= SMALL_M rows): the weight rows are the MMA's M dimension and the few tokens
    its N dimension ("swap AB"), each program streams its [BLOCK_N, K-range] slice of the weight once
    and quantises the token tile itself (no extra launch); the K range is split over programs when
    the weight has too few row blocks to fill the GPU, partial sums reduced in fp32.

Rounding: the FP8 cast is done on values already rounded to the e4m3 grid (`_round_to_e4m3`), so the
result never depends on how a backend rounds (Triton's interpreter carries mantissa overflow
wrongly); scales come from the fp32 bits exactly as the official kernels compute them.
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:          # CPU-only installs: the torch references still work
    triton = None

BLOCK = 128                  # scale block of the weights (128 x 128) and the activations (1 x 128)
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4            # official act_quant: amax clamped below at 1e-4
SMALL_M = 16                 # rows up to which the decode kernel runs


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if triton is not None:
    @triton.jit
    def _round_to_e4m3(v):
        """fp32 values -> the nearest float8 e4m3 value (ties to even, saturating at 448), still
        fp32. Normal range: round the fp32 mantissa to 3 bits in the integer domain (the carry
        moves into the exponent); below 2^-6 the e4m3 step is 2^-9, what adding and removing
        2^14 (whose ulp is 2^-9) rounds to."""
        a = tl.minimum(tl.abs(v), 448.0)
        bits = a.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        small = (a + 16384.0) - 16384.0
        r = tl.where(a < 0.015625, small, normal)
        sign = v.to(tl.int32, bitcast=True) & (-2147483647 - 1)    # -0 stays -0, as the cast keeps it
        return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _pow2_scale(amax):
        """(scale, 1 / scale) = 2^ceil(log2(max(amax, 1e-4) / 448)) and its inverse, from the fp32
        bits of amax / 448 (the official fast_round_scale)."""
        r = tl.maximum(amax, 1e-4) * (1.0 / 448.0)
        bits = r.to(tl.int32, bitcast=True)
        exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)   # biased
        scale = (exponent << 23).to(tl.float32, bitcast=True)
        inverse = ((254 - exponent) << 23).to(tl.float32, bitcast=True)
        return scale, inverse

    @triton.jit
    def _output(acc, dtype: tl.constexpr, UPCAST: tl.constexpr):
        """fp32 -> the output dtype, rounded to nearest even. Triton's interpreter truncates to
        bf16, a bias that grows through a network's layers, so there the rounding is done on
        the bits first (the cast of the rounded value is then exact)."""
        if UPCAST and dtype == tl.bfloat16:
            bits = acc.to(tl.int32, bitcast=True)
            acc = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        return acc.to(dtype)

    @triton.jit
    def _block_scale(S, row_block, k_block, stride, E8M0: tl.constexpr):
        """One weight block scale as fp32 (UE8M0 byte e -> 2^(e - 127); or stored fp32)."""
        if E8M0:
            byte = tl.load(S + row_block * stride + k_block).to(tl.int32)
            scale = tl.where(byte == 0, 2.0 ** -127, (byte << 23).to(tl.float32, bitcast=True))
        else:
            scale = tl.load(S + row_block * stride + k_block)
        return scale

    @triton.jit
    def _act_quant_kernel(X, Q, S, M, K, stride_x, stride_q, stride_sm, stride_sk,
                          ROWS: tl.constexpr, FAKE: tl.constexpr, PERMUTE: tl.constexpr):
        """One [ROWS, 128] tile: per-row power-of-two scale, values rounded to e4m3."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * 128 + tl.arange(0, 128)
        ok = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        scale, inverse = _pow2_scale(tl.max(tl.abs(x), 1))
        q = _round_to_e4m3(x * inverse[:, None])
        if PERMUTE:   # even columns of the group first, then the odd ones
            local = cols % 128
            cols = cols - local + (local % 2) * 64 + local // 2
        out = Q + rows[:, None].to(tl.int64) * stride_q + cols[None, :]
        if FAKE:
            tl.store(out, (q * scale[:, None]).to(Q.dtype.element_ty), mask=ok)
        else:
            tl.store(out, q.to(Q.dtype.element_ty), mask=ok)
            tl.store(S + rows * stride_sm + tl.program_id(1) * stride_sk, scale, mask=rows < M)

    @triton.jit
    def _fp8_gemm_kernel(A, AS, B, BS, C, M, N, K,
                         stride_a, stride_as, stride_b, stride_bs, stride_c,
                         A_FP8: tl.constexpr, SCALE_E8M0: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                         UPCAST: tl.constexpr):
        """C [M, N] = A [M, K] (FP8 with scales AS [M, KB], or bf16 / fp16) x B [N, K]^T (FP8,
        block scales BS [NB, KB]). BLOCK_N divides 128, so one weight scale per (tile, K block)."""
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * tiles_n)                  # GROUP_M row tiles sweep the columns together
        first_m = group * GROUP_M
        rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * tiles_n)) % rows_in_group
        pid_n = (pid % (GROUP_M * tiles_n)) // rows_in_group
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, 128)
        a_ptr = A + rm[:, None].to(tl.int64) * stride_a + rk[None, :]
        b_ptr = B + rn[None, :].to(tl.int64) * stride_b + rk[:, None]
        m_ok, n_ok = rm < M, rn < N
        n_block = (pid_n * BLOCK_N) // 128
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, 128)):
            k_ok = rk < K - kb * 128
            a = tl.load(a_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            w_scale = _block_scale(BS, n_block, kb, stride_bs, SCALE_E8M0)
            if not A_FP8:
                b = b.to(a.dtype)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            part = tl.dot(a, b, out_dtype=tl.float32)
            if A_FP8:
                a_scale = tl.load(AS + rm * stride_as + kb, mask=m_ok, other=0.0)
                acc += part * (a_scale * w_scale)[:, None]
            else:
                acc += part * w_scale
            a_ptr += 128
            b_ptr += 128
        c = C + rm[:, None].to(tl.int64) * stride_c + rn[None, :]
        tl.store(c, _output(acc, C.dtype.element_ty, UPCAST), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _fp8_gemv_kernel(X, B, BS, OUT, M, N, K, blocks_per_split,
                         stride_x, stride_b, stride_bs, stride_os, stride_om,
                         ACT_QUANT: tl.constexpr, SCALE_E8M0: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, UPCAST: tl.constexpr):
        """Few tokens: OUT[split, t, n] = sum over this program's K blocks of x[t] . W[n]. The
        weight tile [BLOCK_N, 128] is the MMA's left operand, the BLOCK_T (>= M) tokens its right
        one; with ACT_QUANT the token tile is quantised here, per token per 128 values."""
        pid_n, split = tl.program_id(0), tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rt = tl.arange(0, BLOCK_T)
        rk = tl.arange(0, 128)
        n_ok, t_ok = rn < N, rt < M
        n_block = (pid_n * BLOCK_N) // 128
        kb0 = split * blocks_per_split
        kb1 = tl.minimum(kb0 + blocks_per_split, tl.cdiv(K, 128))
        acc = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
        for kb in range(kb0, kb1):
            k = kb * 128 + rk
            k_ok = k < K
            w = tl.load(B + rn[:, None].to(tl.int64) * stride_b + k[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(X + rt[:, None] * stride_x + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            w_scale = _block_scale(BS, n_block, kb, stride_bs, SCALE_E8M0)
            if ACT_QUANT:
                x_scale, x_inverse = _pow2_scale(tl.max(tl.abs(x.to(tl.float32)), 1))
                xq = _round_to_e4m3(x.to(tl.float32) * x_inverse[:, None])
                if UPCAST:
                    part = tl.dot(w.to(tl.float32), tl.trans(xq), out_dtype=tl.float32)
                else:
                    part = tl.dot(w, tl.trans(xq.to(tl.float8e4nv)), out_dtype=tl.float32)
                acc += part * (w_scale * x_scale)[None, :]
            else:
                if UPCAST:
                    part = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), out_dtype=tl.float32)
                else:
                    part = tl.dot(w.to(x.dtype), tl.trans(x), out_dtype=tl.float32)
                acc += part * w_scale
        out = OUT + split * stride_os + rt[None, :] * stride_om + rn[:, None]
        tl.store(out, _output(acc, OUT.dtype.element_ty, UPCAST), mask=n_ok[:, None] & t_ok[None, :])


# ---- checks and shapes ------------------------------------------------------------------------------
def _check_weight(weight: torch.Tensor, scale: torch.Tensor) -> None:
    if weight.dim() != 2 or weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"weight must be float8_e4m3fn [N, K], got {weight.dtype} {tuple(weight.shape)}")
    want = (-(-weight.shape[0] // BLOCK), -(-weight.shape[1] // BLOCK))
    if tuple(scale.shape) != want:
        raise ValueError(f"scale for weight {tuple(weight.shape)} must have shape {want}, got {tuple(scale.shape)}")
    if scale.dtype not in (torch.float8_e8m0fnu, torch.float32):
        raise ValueError(f"scale must be float8_e8m0fnu or float32, got {scale.dtype}")
    if weight.stride(1) != 1 or not scale.is_contiguous():
        raise ValueError("weight rows and the scale must be contiguous")


def _scale_arg(scale: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The scale as the kernels read it: UE8M0 as its bytes, or fp32."""
    if scale.dtype == torch.float8_e8m0fnu:
        return scale.view(torch.uint8), True
    return scale, False


def _rows(x: torch.Tensor, K: int) -> torch.Tensor:
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {K}")
    x2 = x.reshape(-1, K)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _check_permute(K: int, permute: bool) -> None:
    if permute and K % BLOCK:
        raise ValueError(f"permute needs whole {BLOCK}-column groups, got {K} columns")


# ---- public entry points ----------------------------------------------------------------------------
def act_quant(x: torch.Tensor, *, fake: bool = False, permute: bool = False, token_minor: bool = False
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] (bf16 / fp16 / fp32) -> (FP8 e4m3 [..., K], fp32 scales [..., ceil(K/128)]), or
    with `fake` the rounded values in x's dtype. `permute`: each 128-column group stored as its
    even columns, then its odd ones. `token_minor` (2-D x only): the scales [M, KB] laid out
    with the token index fastest (strides (1, M)), as cuBLAS's blockwise scaled_mm reads them."""
    if triton is None:
        raise RuntimeError("act_quant needs Triton, which is not installed")
    K = x.shape[-1]
    _check_permute(K, permute)
    rows = _rows(x, K)
    M = rows.shape[0]
    q = torch.empty(M, K, dtype=x.dtype if fake else torch.float8_e4m3fn, device=x.device)
    kb = -(-K // BLOCK)
    if token_minor:
        s = torch.empty(kb, M, dtype=torch.float32, device=x.device).t()
    else:
        s = torch.empty(M, kb, dtype=torch.float32, device=x.device)
    if M:
        grid = (triton.cdiv(M, 16), kb)
        _act_quant_kernel[grid](rows, q, s, M, K, rows.stride(0), q.stride(0), s.stride(0), s.stride(1),
                                ROWS=16, FAKE=fake, PERMUTE=permute, num_warps=4)
    if token_minor:
        return q, s
    q = q.view(*x.shape[:-1], K)
    return q if fake else (q, s.view(*x.shape[:-1], -1))


def act_quant_reference(x: torch.Tensor, *, fake: bool = False, permute: bool = False
                        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`act_quant` in torch (dsv4.formats.fakequant's rule; a partial last group is padded with
    zeros, which change no maximum)."""
    K = x.shape[-1]
    _check_permute(K, permute)
    pad = -K % BLOCK
    blocks = torch.nn.functional.pad(x.float(), (0, pad)).unflatten(-1, (-1, BLOCK))
    mantissa, exponent = torch.frexp(blocks.abs().amax(-1, keepdim=True).clamp_min(AMAX_FLOOR) * (1.0 / FP8_MAX))
    scale = torch.ldexp(torch.ones_like(mantissa), exponent - (mantissa == 0.5).to(exponent.dtype))
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    out = (q.float() * scale).to(x.dtype) if fake else q
    if permute:
        out = torch.cat((out[..., 0::2], out[..., 1::2]), -1)
    out = out.flatten(-2)[..., :K]
    return out if fake else (out, scale[..., 0])


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, fp8_activations: bool,
               config: dict | None = None) -> torch.Tensor:
    """y = x W^T for an FP8 block-scaled weight (module docstring). x [..., K] bf16 / fp16 ->
    y [..., N] in x's dtype. `config` overrides the launch (keys: path 'small' | 'large', block_m,
    block_n, group_m, num_warps, num_stages, split)."""
    if triton is None:
        raise RuntimeError("fp8_linear needs Triton, which is not installed")
    _check_weight(weight, scale)
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x must be bf16 or fp16, got {x.dtype}")
    N, K = weight.shape
    rows = _rows(x, K)
    M = rows.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out.view(*x.shape[:-1], N)
    cfg = dict(config or {})
    path = cfg.get("path") or default_path(M, N, K, fp8_activations, x.device)
    if path == "scaled_mm":
        if not fp8_activations:
            raise ValueError("the scaled_mm path multiplies FP8 activations: needs fp8_activations=True")
        return _blockwise_scaled_mm(rows, weight, scale).view(*x.shape[:-1], N)
    scale_arg, e8m0 = _scale_arg(scale)
    interpret = _interpreting()
    if path == "small":
        block_n = cfg.get("block_n", 64)
        block_t = max(16, triton.next_power_of_2(M))
        n_tiles, k_blocks = triton.cdiv(N, block_n), triton.cdiv(K, BLOCK)
        sms = _multiprocessors(x.device)
        split = cfg.get("split", max(1, min(k_blocks, -(-2 * sms // n_tiles))))
        per_split = triton.cdiv(k_blocks, split)
        split = triton.cdiv(k_blocks, per_split)
        partial = out[None] if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=x.device)
        _fp8_gemv_kernel[(n_tiles, split)](
            rows, weight, scale_arg, partial, M, N, K, per_split,
            rows.stride(0), weight.stride(0), scale_arg.stride(0), partial.stride(0), partial.stride(1),
            ACT_QUANT=fp8_activations, SCALE_E8M0=e8m0, BLOCK_N=block_n, BLOCK_T=block_t, UPCAST=interpret,
            num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 4))
        if split > 1:
            out.copy_(partial.sum(0))
        return out.view(*x.shape[:-1], N)
    if fp8_activations:
        a, a_scale = act_quant(rows)
    else:
        a, a_scale = rows, rows.new_empty(0, dtype=torch.float32)
    block_m = cfg.get("block_m", 128 if M > 64 else 64)
    block_n = cfg.get("block_n", 128)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _fp8_gemm_kernel[grid](
        a, a_scale, weight, scale_arg, out, M, N, K,
        a.stride(0), a_scale.stride(0) if fp8_activations else 0, weight.stride(0), scale_arg.stride(0), out.stride(0),
        A_FP8=fp8_activations, SCALE_E8M0=e8m0, BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=cfg.get("group_m", 8),
        UPCAST=interpret, num_warps=cfg.get("num_warps", 8), num_stages=cfg.get("num_stages", 3))
    return out.view(*x.shape[:-1], N)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


@functools.lru_cache(maxsize=None)
def scaled_mm_available(device: torch.device) -> bool:
    """torch's cuBLAS blockwise FP8 GEMM (1x128 activation and 128x128 weight scales, fp32)
    exists in this torch and runs on this device (Hopper only)."""
    F = torch.nn.functional
    return device.type == "cuda" and hasattr(F, "scaled_mm") and hasattr(F, "ScalingType") \
        and torch.cuda.get_device_capability(device) == (9, 0)


def _blockwise_scaled_mm(rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The same product through torch.nn.functional.scaled_mm (cuBLAS): activations quantised by
    `act_quant` with token-minor scales, the weight scales as fp32 [KB, NB] (KB padded to a
    multiple of 4, as cuBLAS requires)."""
    F = torch.nn.functional
    M = rows.shape[0]
    if M % 4:                  # cuBLAS takes whole groups of 4 tokens
        rows = F.pad(rows, (0, 0, 0, -M % 4))
    a, a_scale = act_quant(rows, token_minor=True)
    w_scale = scale.float()
    if w_scale.shape[1] % 4:
        w_scale = F.pad(w_scale, (0, -w_scale.shape[1] % 4))
    return F.scaled_mm(a, weight.t(), a_scale, F.ScalingType.BlockWise1x128, w_scale.t(),
                       F.ScalingType.BlockWise128x128, output_dtype=rows.dtype)[:M]


def default_path(M: int, N: int, K: int, fp8_activations: bool, device: torch.device) -> str:
    """Which implementation runs a product of M tokens by an [N, K] weight, from the per-shape
    timings of bench/bench_release.py --kernels on an H200 (bench/RESULTS.md): the decode kernel
    up to 16 tokens; cuBLAS's blockwise scaled_mm once the output reaches 2^23 elements (from 512
    tokens), where it beats the Triton GEMM by up to 1.5x (812-829 against 543-593 TFLOP/s at
    8192 tokens); the Triton GEMM in between and wherever scaled_mm does not exist."""
    if M <= SMALL_M:
        return "small"
    if fp8_activations and M >= 512 and M * N >= 1 << 23 and N % BLOCK == 0 and K % BLOCK == 0 \
            and scaled_mm_available(device):
        return "scaled_mm"
    return "large"


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *,
                         fp8_activations: bool) -> torch.Tensor:
    """`fp8_linear` in torch: the same (rounded) operands multiplied in float64, -> float64
    [..., N] (callers compare in that precision or cast)."""
    _check_weight(weight, scale)
    K = weight.shape[1]
    a = act_quant_reference(x, fake=True).double() if fp8_activations else x.double()
    s = scale.double().repeat_interleave(BLOCK, 0)[: weight.shape[0]].repeat_interleave(BLOCK, 1)[:, :K]
    return a @ (weight.double() * s).T
