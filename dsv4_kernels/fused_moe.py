"""Fused MoE over FP4 routed experts (W4A16: FP4 weights widened to bf16 in registers, bf16 tensor
cores, fp32 accumulation) and the torch reference it must equal.

For T tokens routed to k experts each (assignment a = t * k + slot, expert e, routing weight w):
    h_a = silu(min(x_t W1_e^T, L)) * clamp(x_t W3_e^T, -L, L) * w_a        (L = swiglu_limit)
    y_t = sum over its k slots of h_a W2_e^T                                 -> [T, D] fp32
With `fp8_activations` (the official numerics, `quant_sim`) x and h are first rounded to FP8 per
token per 128 values, as the official fp4_gemm's act_quant does. Gate and up are rounded to the
activation dtype before the SwiGLU (the official GEMMs return bf16), h once more after it. The routing weight multiplies h
before that rounding, where the official Expert applies it, so it cannot move past w2.

Weights stay in the release layout, stacked per expert (`Fp4Experts`: int8 [E, out, in/2], two
e2m1 codes a byte with the even column in the low nibble, UE8M0 scales [E, out, in/32]). A 64-byte
slice of a weight row therefore unpacks into the 64 even and the 64 odd columns of a 128-column
group; the activations are stored in that order (each 128-column group: even columns, then odd
ones), so every dot reads contiguous tiles.

Launches (no host sync, no loop over experts):
  1. `routing_plan` (torch, on the device): assignments sorted by expert, cut into blocks of
     BLOCK_M rows of one expert; the block count is bounded on the host by ceil(A / BLOCK_M) +
     min(E, A), so unused blocks exist and exit at once;
  2. x permuted (and rounded) once;
  3. gate + up: one program per (block, 64 intermediate columns), both dots over D, SwiGLU with the
     clamp and the routing weight in the epilogue, h written in the permuted order;
  4. (h rounded to FP8 values in place, with `fp8_activations`);
  5. down: one program per (block, 128 output columns), written to its assignment's row of a
     [T * k, D] fp32 buffer; the k rows of a token are summed in a fixed order (deterministic).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from dsv4_kernels.fp8_gemm import act_quant, act_quant_reference

try:
    import triton
    import triton.language as tl
except ImportError:          # CPU-only installs: the torch reference still works
    triton = None

if triton is not None:
    from dsv4_kernels.fp8_gemm import _output

FP4_BLOCK = 32               # one scale per 32 weights along `in`
GROUP = 128                  # columns of one activation rounding group / one unpacked weight slice


@dataclass(frozen=True)
class Fp4Experts:
    """The FP4 routed experts first .. first + E - 1 of one layer, stacked:
    w1 / w3 int8 [E, I, D/2] with scales [E, I, D/32]; w2 int8 [E, D, I/2] with scales [E, D, I/32]
    (scales float8_e8m0fnu, or float32 as some checkpoints store them)."""

    w1: torch.Tensor
    s1: torch.Tensor
    w3: torch.Tensor
    s3: torch.Tensor
    w2: torch.Tensor
    s2: torch.Tensor
    first: int = 0

    def __post_init__(self):
        E, I, half_d = self.w1.shape
        D = 2 * half_d
        want = {"w1": (E, I, D // 2), "w3": (E, I, D // 2), "w2": (E, D, I // 2),
                "s1": (E, I, D // FP4_BLOCK), "s3": (E, I, D // FP4_BLOCK), "s2": (E, D, I // FP4_BLOCK)}
        for name, shape in want.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise ValueError(f"Fp4Experts.{name} must be {shape} (E={E}, I={I}, D={D}), got {tuple(t.shape)}")
            if not t.is_contiguous():
                raise ValueError(f"Fp4Experts.{name} must be contiguous")
        for name in ("w1", "w3", "w2"):
            if getattr(self, name).dtype not in (torch.int8, torch.uint8):
                raise ValueError(f"Fp4Experts.{name} must hold packed e2m1 codes (int8), got {getattr(self, name).dtype}")
        dtypes = {self.s1.dtype, self.s2.dtype, self.s3.dtype}
        if len(dtypes) != 1 or not dtypes <= {torch.float8_e8m0fnu, torch.float32}:
            raise ValueError(f"Fp4Experts scales must all be float8_e8m0fnu or all float32, got {dtypes}")
        if D % GROUP or I % GROUP:
            raise ValueError(f"fused MoE needs dim and inter_dim divisible by {GROUP}, got {D}, {I}")

    @property
    def n_experts(self) -> int:
        return self.w1.shape[0]

    @property
    def dim(self) -> int:
        return 2 * self.w1.shape[2]

    @property
    def inter_dim(self) -> int:
        return self.w1.shape[1]


if triton is not None:
    @triton.jit
    def _e2m1_values(code):
        """int32 e2m1 codes (bit 3 the sign) -> fp32 values 0, .5, 1, 1.5, 2, 3, 4, 6 (and negatives):
        magnitude code m = 2e + f gives 2^(e-1) (1 + f/2) for e > 0 (exponent field e + 126, mantissa
        bit f) and 0.5 for m = 1."""
        m = code & 7
        bits = tl.where(m > 1, (m << 22) + (126 << 23), tl.where(m == 1, 126 << 23, 0))
        v = bits.to(tl.float32, bitcast=True)
        return tl.where(code > 7, -v, v)

    @triton.jit
    def _scale_values(s, E8M0: tl.constexpr):
        if E8M0:
            byte = s.to(tl.int32) & 0xFF
            value = tl.where(byte == 0, 2.0 ** -127, (byte << 23).to(tl.float32, bitcast=True))
        else:
            value = s
        return value

    @triton.jit
    def _fp4_tiles(W, S, n, n_ok, kb, stride_wn, stride_sn, E8M0: tl.constexpr, DT: tl.constexpr,
                   BLOCK_N: tl.constexpr):
        """Rows n of one expert's packed weight, K group kb -> (even columns, odd columns) as
        [64, BLOCK_N] tiles of dtype DT (the dot's right operand: row = k, column = n)."""
        j = tl.arange(0, 64)
        packed = tl.load(W + n[None, :].to(tl.int64) * stride_wn + (kb * 64 + j)[:, None],
                         mask=n_ok[None, :], other=0).to(tl.int32) & 0xFF
        # the slice's 4 scales of each row, widened to its 64 rows: byte j of the slice holds
        # columns 2j and 2j + 1, both in group j // 16
        if E8M0:    # the 4 UE8M0 bytes of a row read as one int32 (S is the int32 view)
            words = tl.load(S + n.to(tl.int64) * stride_sn + kb, mask=n_ok, other=0)       # [BLOCK_N]
            scale = _scale_values(words[None, :] >> (8 * (j // 16))[:, None], True)
        else:
            four = tl.load(S + n[None, :].to(tl.int64) * stride_sn + (kb * 4 + tl.arange(0, 4))[:, None],
                           mask=n_ok[None, :], other=0.0)                                    # [4, BLOCK_N]
            scale = tl.reshape(tl.broadcast_to(four[:, None, :], (4, 16, BLOCK_N)), (64, BLOCK_N))
        even = (_e2m1_values(packed & 15) * scale).to(DT)
        odd = (_e2m1_values(packed >> 4) * scale).to(DT)
        return even, odd

    @triton.jit
    def _block_rows(BLOCK_EXPERT, BLOCK_ROW0, BLOCK_ROW1, ORDER, BLOCK_M: tl.constexpr):
        """(expert, sorted rows, their mask, their assignment ids) of this program's block."""
        b = tl.program_id(0)
        e = tl.load(BLOCK_EXPERT + b)
        rows = tl.load(BLOCK_ROW0 + b) + tl.arange(0, BLOCK_M)
        ok = rows < tl.load(BLOCK_ROW1 + b)
        aid = tl.load(ORDER + rows, mask=ok, other=0)
        return e, rows, ok, aid

    @triton.jit
    def _moe_gate_up_kernel(X, RW, ORDER, BLOCK_EXPERT, BLOCK_ROW0, BLOCK_ROW1,
                            W1, S1, W3, S3, H, D, I, TOPK, limit,
                            stride_x, stride_we, stride_wn, stride_se, stride_sn, stride_h,
                            E8M0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            UPCAST: tl.constexpr):
        e, rows, r_ok, aid = _block_rows(BLOCK_EXPERT, BLOCK_ROW0, BLOCK_ROW1, ORDER, BLOCK_M)
        if e < 0:
            return
        token = aid // TOPK
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < I
        j = tl.arange(0, 64)
        DT: tl.constexpr = tl.float32 if UPCAST else X.dtype.element_ty
        w1, s1 = W1 + e.to(tl.int64) * stride_we, S1 + e.to(tl.int64) * stride_se
        w3, s3 = W3 + e.to(tl.int64) * stride_we, S3 + e.to(tl.int64) * stride_se
        x_rows = X + token[:, None].to(tl.int64) * stride_x
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(0, D // 128):
            a_even = tl.load(x_rows + kb * 128 + j[None, :], mask=r_ok[:, None], other=0.0).to(DT)
            a_odd = tl.load(x_rows + kb * 128 + 64 + j[None, :], mask=r_ok[:, None], other=0.0).to(DT)
            g_even, g_odd = _fp4_tiles(w1, s1, n, n_ok, kb, stride_wn, stride_sn, E8M0, DT, BLOCK_N)
            acc_g += tl.dot(a_even, g_even, out_dtype=tl.float32)
            acc_g += tl.dot(a_odd, g_odd, out_dtype=tl.float32)
            u_even, u_odd = _fp4_tiles(w3, s3, n, n_ok, kb, stride_wn, stride_sn, E8M0, DT, BLOCK_N)
            acc_u += tl.dot(a_even, u_even, out_dtype=tl.float32)
            acc_u += tl.dot(a_odd, u_odd, out_dtype=tl.float32)
        # gate and up leave their GEMMs in the activation dtype, as the official fp4_gemm's do
        acc_g = _output(acc_g, H.dtype.element_ty, UPCAST).to(tl.float32)
        acc_u = _output(acc_u, H.dtype.element_ty, UPCAST).to(tl.float32)
        if limit > 0:
            acc_g = tl.minimum(acc_g, limit)
            acc_u = tl.minimum(tl.maximum(acc_u, -limit), limit)
        weight = tl.load(RW + aid, mask=r_ok, other=0.0)
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u * weight[:, None]
        local = n % 128                                   # stored as the down GEMM reads it
        col = n - local + (local % 2) * 64 + local // 2
        tl.store(H + rows[:, None].to(tl.int64) * stride_h + col[None, :], _output(h, H.dtype.element_ty, UPCAST),
                 mask=r_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _moe_down_kernel(H, ORDER, BLOCK_EXPERT, BLOCK_ROW0, BLOCK_ROW1, W2, S2, OUT, I, D,
                         stride_h, stride_we, stride_wn, stride_se, stride_sn, stride_o,
                         E8M0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         UPCAST: tl.constexpr):
        e, rows, r_ok, aid = _block_rows(BLOCK_EXPERT, BLOCK_ROW0, BLOCK_ROW1, ORDER, BLOCK_M)
        if e < 0:
            return
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < D
        j = tl.arange(0, 64)
        DT: tl.constexpr = tl.float32 if UPCAST else H.dtype.element_ty
        w2, s2 = W2 + e.to(tl.int64) * stride_we, S2 + e.to(tl.int64) * stride_se
        h_rows = H + rows[:, None].to(tl.int64) * stride_h
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(0, I // 128):
            a_even = tl.load(h_rows + kb * 128 + j[None, :], mask=r_ok[:, None], other=0.0).to(DT)
            a_odd = tl.load(h_rows + kb * 128 + 64 + j[None, :], mask=r_ok[:, None], other=0.0).to(DT)
            b_even, b_odd = _fp4_tiles(w2, s2, n, n_ok, kb, stride_wn, stride_sn, E8M0, DT, BLOCK_N)
            acc += tl.dot(a_even, b_even, out_dtype=tl.float32)
            acc += tl.dot(a_odd, b_odd, out_dtype=tl.float32)
        tl.store(OUT + aid[:, None].to(tl.int64) * stride_o + n[None, :], acc,
                 mask=r_ok[:, None] & n_ok[None, :])


@dataclass(frozen=True)
class RoutingPlan:
    """Assignments grouped by expert, on the device. order [A]: assignment ids sorted by local
    expert (stable; other ranks' experts last); per block of BLOCK_M sorted rows: its local expert
    (-1 = unused block) and its row range [row0, row1)."""

    order: torch.Tensor
    block_expert: torch.Tensor
    block_row0: torch.Tensor
    block_row1: torch.Tensor
    all_local: bool          # every assignment is one of these experts (no row left unwritten)


def routing_plan(expert_ids: torch.Tensor, first: int, n_experts: int, block_m: int,
                 all_local: bool) -> RoutingPlan:
    """expert_ids [T, k] (global ids) -> the plan for experts first .. first + n_experts - 1.
    Device ops only; the block count is a host-side bound, ceil(A / block_m) + min(E, A)."""
    flat = expert_ids.flatten().to(torch.int64) - first                     # [A]
    A, E = flat.numel(), n_experts
    if not all_local:
        flat = torch.where((flat >= 0) & (flat < E), flat, E)              # others sort last
    order = flat.argsort(stable=True)
    # scatter_add, not bincount: bincount sizes its output from the max, a host sync
    counts = torch.zeros(E + 1, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))[:E]
    starts = counts.cumsum(0) - counts                                      # first sorted row
    blocks = (counts + block_m - 1) // block_m
    block_end = blocks.cumsum(0)
    n_blocks = -(-A // block_m) + min(E, A)
    b = torch.arange(n_blocks, device=flat.device)
    expert = torch.searchsorted(block_end, b, right=True)                  # E = past the last block
    used = expert < E
    e = expert.clamp(max=E - 1)
    row0 = starts[e] + (b - (block_end[e] - blocks[e])) * block_m
    row1 = torch.minimum(row0 + block_m, starts[e] + counts[e])
    return RoutingPlan(order, torch.where(used, expert, -1).to(torch.int32),
                       torch.where(used, row0, 0).to(torch.int32), torch.where(used, row1, 0).to(torch.int32),
                       all_local)


def _launch(block_m: int) -> dict:
    """(BLOCK_N, warps, stages) of each launch: 16-row blocks for few assignments (decode), 64
    from 65 assignments, 128 from 8192 (prefill chunks; 1.75x faster than 64 there on an H200,
    bench/RESULTS.md; its down tile keeps within shared memory with 2 stages)."""
    if block_m <= 16:
        return dict(gate_up=(32, 4, 3), down=(64, 4, 3))
    if block_m >= 128:
        return dict(gate_up=(64, 8, 3), down=(128, 8, 2))
    return dict(gate_up=(64, 8, 3), down=(128, 8, 3))


def fused_moe(x: torch.Tensor, route_weights: torch.Tensor, expert_ids: torch.Tensor,
              experts: Fp4Experts, *, n_routed_experts: int, swiglu_limit: float, fp8_activations: bool,
              block_m: int | None = None) -> torch.Tensor:
    """x [T, D] bf16 / fp16, route_weights [T, k] fp32, expert_ids [T, k] (global ids in
    [0, n_routed_experts)) -> the sum over each token's slots served by `experts` of
    w * expert(x), [T, D] fp32 (module docstring). Slots of other experts (expert parallel)
    contribute zero."""
    if triton is None:
        raise RuntimeError("fused_moe needs Triton, which is not installed")
    T, D = x.shape
    if D != experts.dim or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x must be bf16 / fp16 [T, {experts.dim}], got {x.dtype} {tuple(x.shape)}")
    if route_weights.shape != expert_ids.shape or route_weights.shape[0] != T:
        raise ValueError(f"route_weights {tuple(route_weights.shape)} and expert_ids "
                         f"{tuple(expert_ids.shape)} must both be [T={T}, k]")
    k, I, E = expert_ids.shape[1], experts.inter_dim, experts.n_experts
    A = T * k
    y = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    if A == 0:
        return y
    block_m = block_m or (16 if A <= 64 else 64 if A < 8192 else 128)
    all_local = experts.first == 0 and E == n_routed_experts
    plan = routing_plan(expert_ids, experts.first, E, block_m, all_local)
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    e8m0 = experts.s1.dtype == torch.float8_e8m0fnu

    def scales(s):      # UE8M0: the 4 scales of a 128-column group as one int32 word
        return s.view(torch.uint8).view(torch.int32) if e8m0 else s

    if fp8_activations:
        xp = act_quant(x, fake=True, permute=True)
    else:
        xp = x.view(T, D // GROUP, GROUP // 2, 2).transpose(-1, -2).reshape(T, D)
    h = torch.empty(A, I, dtype=x.dtype, device=x.device)
    cfg = _launch(block_m)
    n_blocks = plan.block_expert.numel()
    bn, warps, stages = cfg["gate_up"]
    s1, s3, s2 = scales(experts.s1), scales(experts.s3), scales(experts.s2)
    _moe_gate_up_kernel[(n_blocks, triton.cdiv(I, bn))](
        xp, route_weights.float().contiguous(), plan.order, plan.block_expert, plan.block_row0, plan.block_row1,
        experts.w1, s1, experts.w3, s3, h, D, I, k, float(swiglu_limit),
        xp.stride(0), experts.w1.stride(0), experts.w1.stride(1), s1.stride(0), s1.stride(1), h.stride(0),
        E8M0=e8m0, BLOCK_M=block_m, BLOCK_N=bn, UPCAST=interpret, num_warps=warps, num_stages=stages)
    if fp8_activations:
        h = act_quant(h, fake=True)
    slots = (torch.empty if plan.all_local else torch.zeros)(A, D, dtype=torch.float32, device=x.device)
    bn, warps, stages = cfg["down"]
    _moe_down_kernel[(n_blocks, triton.cdiv(D, bn))](
        h, plan.order, plan.block_expert, plan.block_row0, plan.block_row1, experts.w2, s2, slots, I, D,
        h.stride(0), experts.w2.stride(0), experts.w2.stride(1), s2.stride(0), s2.stride(1), slots.stride(0),
        E8M0=e8m0, BLOCK_M=block_m, BLOCK_N=bn, UPCAST=interpret, num_warps=warps, num_stages=stages)
    return torch.sum(slots.view(T, k, D), 1, out=y)


_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_fp4_expert(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One expert's packed [out, in/2] codes and [out, in/32] scales -> float64 [out, in]."""
    b = weight.view(torch.uint8)
    codes = torch.stack((b & 15, b >> 4), -1).flatten(-2).long()
    values = torch.tensor(_E2M1, dtype=torch.float64, device=weight.device)[codes]
    return values * scale.to(torch.float64).repeat_interleave(FP4_BLOCK, -1)


def fused_moe_reference(x: torch.Tensor, route_weights: torch.Tensor, expert_ids: torch.Tensor,
                        experts: Fp4Experts, *, swiglu_limit: float, fp8_activations: bool) -> torch.Tensor:
    """`fused_moe` in torch, per expert, dequantised weights and float64 sums; gate, up and h are
    rounded to x's dtype (h then to FP8 values with `fp8_activations`) where the kernel rounds them."""
    T, D = x.shape
    k = expert_ids.shape[1]
    a = act_quant_reference(x, fake=True) if fp8_activations else x
    y = torch.zeros(T, D, dtype=torch.float64, device=x.device)
    flat_ids, flat_w = expert_ids.flatten(), route_weights.flatten().double()
    for e in range(experts.n_experts):
        slots = (flat_ids == experts.first + e).nonzero().flatten()
        if slots.numel() == 0:
            continue
        w1, w3, w2 = (dequantize_fp4_expert(w[e], s[e]) for w, s in
                      ((experts.w1, experts.s1), (experts.w3, experts.s3), (experts.w2, experts.s2)))
        rows = a[slots // k].double()
        gate, up = (rows @ w1.T).to(x.dtype).double(), (rows @ w3.T).to(x.dtype).double()
        if swiglu_limit > 0:
            gate, up = gate.clamp(max=swiglu_limit), up.clamp(-swiglu_limit, swiglu_limit)
        h = (torch.nn.functional.silu(gate) * up * flat_w[slots, None]).to(x.dtype)
        if fp8_activations:
            h = act_quant_reference(h, fake=True)
        y.index_add_(0, slots // k, h.double() @ w2.T)
    return y
