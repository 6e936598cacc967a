"""Lightning Indexer selection for prefill (reference §2.5): fused scores, then a top-k, and the
torch reference they must equal.

For query t of row b and index key j:
    I[t, j] = sum_h w[t, h] * ReLU(q[t, h] . K[j])          (j visible: j < visible[b, t])
and the picks are the `k` largest I[t, j] over the visible j, ties broken towards the smaller j
(the indexer's stable sort, so a choice never depends on how the prompt was chunked), in that
order; slots past the visible entries are -1.

The kernel computes a [BLOCK_T, BLOCK_N] tile of I per program: the key tile is loaded once, and
for each head one [BLOCK_T, d] x [d, BLOCK_N] dot, ReLU and the head weight accumulate into fp32
registers, so [tokens, heads, entries] never exists in memory. It writes one int64 sort key per
(t, j): the score's order-preserving integer in the high half, 2^32 - 1 - j in the low half (all
keys distinct, equal scores ordered by index), hidden entries the smallest int64. `torch.topk` of
those keys (a radix selection, not a sort) then returns exactly the stable-sort prefix. Tiles no
query of the block can see are filled without any dot.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:          # CPU-only installs: the torch reference still works
    triton = None

HIDDEN_KEY = -(2 ** 63)


if triton is not None:
    @triton.jit
    def _indexer_keys_kernel(Q, W, KEYS, VIS, OUT, S, H, N,
                             stride_qb, stride_qs, stride_qh, stride_wb, stride_ws,
                             stride_kb, stride_kn, stride_vb, stride_ob, stride_os,
                             D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                             PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        b = tl.program_id(2).to(tl.int64)
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        d = tl.arange(0, D)
        t_ok, j_ok = t < S, j < N
        visible = tl.load(VIS + b * stride_vb + t, mask=t_ok, other=0)
        out = OUT + b * stride_ob + t[:, None].to(tl.int64) * stride_os + j[None, :]
        seen = j[None, :] < visible[:, None]
        lowest = -9223372036854775807 - 1
        if tl.program_id(1) * BLOCK_N >= tl.max(visible, 0):          # no query of the block sees it
            tl.store(out, tl.full([BLOCK_T, BLOCK_N], lowest, tl.int64),
                     mask=t_ok[:, None] & j_ok[None, :])
            return
        cdt: tl.constexpr = tl.float32 if UPCAST else Q.dtype.element_ty
        keys = tl.load(KEYS + b * stride_kb + j[None, :].to(tl.int64) * stride_kn + d[:, None],
                       mask=j_ok[None, :], other=0.0).to(cdt)                     # [D, BLOCK_N]
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        q_rows = Q + b * stride_qb + t[:, None].to(tl.int64) * stride_qs + d[None, :]
        w_rows = W + b * stride_wb + t.to(tl.int64) * stride_ws
        for h in range(0, H):
            q = tl.load(q_rows + h * stride_qh, mask=t_ok[:, None], other=0.0).to(cdt)   # [BLOCK_T, D]
            s = tl.dot(q, keys, input_precision=PRECISION, out_dtype=tl.float32)
            w = tl.load(w_rows + h, mask=t_ok, other=0.0)
            acc += tl.maximum(s, 0.0) * w[:, None]
        acc = tl.where(acc == 0.0, 0.0, acc)                # -0 and +0 are one score
        bits = acc.to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed order = float order
        key = (ordered.to(tl.int64) << 32) + (4294967295 - j[None, :].to(tl.int64))
        key = tl.where(seen, key, lowest)
        tl.store(out, key, mask=t_ok[:, None] & j_ok[None, :])


def _check(q, weights, keys, visible, k):
    if q.dim() != 4:
        raise ValueError(f"q must be [B, S, H, d], got shape {tuple(q.shape)}")
    B, S, H, d = q.shape
    if tuple(weights.shape) != (B, S, H):
        raise ValueError(f"weights must be [B, S, H] = {(B, S, H)}, got {tuple(weights.shape)}")
    if keys.dim() != 3 or keys.shape[0] != B or keys.shape[2] != d:
        raise ValueError(f"keys must be [B, N, {d}], got {tuple(keys.shape)}")
    if tuple(visible.shape) != (B, S) or visible.dtype.is_floating_point:
        raise ValueError(f"visible must be integer [B, S] = {(B, S)}, got {visible.dtype} {tuple(visible.shape)}")
    if not 0 <= k <= keys.shape[1]:
        raise ValueError(f"k must be in [0, N={keys.shape[1]}], got {k}")


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor,
                 k: int, *, block_t: int = 64, block_n: int = 64) -> torch.Tensor:
    """q [B, S, H, d] (bf16 / fp16 / fp32), weights [B, S, H] fp32, keys [B, N, d], visible
    [B, S] (entries j < visible[b, t] count for query t) -> picks [B, S, k] int64 (module
    docstring), through the Triton kernel."""
    if triton is None:
        raise RuntimeError("indexer_topk needs Triton, which is not installed")
    _check(q, weights, keys, visible, k)
    B, S, H, d = q.shape
    N = keys.shape[1]
    if d & (d - 1):
        raise ValueError(f"the head dim must be a power of two, got {d}")
    q, keys = q.contiguous(), keys.contiguous()
    weights, visible = weights.float().contiguous(), visible.contiguous()
    sort_keys = torch.empty(B, S, N, dtype=torch.int64, device=q.device)
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if S and N:
        grid = (triton.cdiv(S, block_t), triton.cdiv(N, block_n), B)
        _indexer_keys_kernel[grid](
            q, weights, keys, visible, sort_keys, S, H, N,
            q.stride(0), q.stride(1), q.stride(2), weights.stride(0), weights.stride(1),
            keys.stride(0), keys.stride(1), visible.stride(0), sort_keys.stride(0), sort_keys.stride(1),
            D=d, BLOCK_T=block_t, BLOCK_N=block_n,
            PRECISION="ieee" if q.dtype == torch.float32 or interpret else "tf32", UPCAST=interpret,
            num_warps=4, num_stages=2)
    picks = sort_keys.topk(k, dim=-1, sorted=True).indices
    return picks.masked_fill(picks >= visible[..., None], -1)


def indexer_topk_reference(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor,
                           visible: torch.Tensor, k: int) -> torch.Tensor:
    """The same selection in torch: fp32 (float64 for float64 inputs) scores through
    [B, S, H, N], a stable descending sort."""
    _check(q, weights, keys, visible, k)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.einsum("bthd,bnd->bthn", q.to(ct), keys.to(ct)).relu_()
    scores = torch.einsum("bthn,bth->btn", scores, weights.to(ct))
    hidden = torch.arange(keys.shape[1], device=q.device) >= visible[..., None]
    order = scores.masked_fill(hidden, float("-inf")).sort(dim=-1, descending=True, stable=True)
    picks = order.indices[..., :k]
    return picks.masked_fill(picks >= visible[..., None], -1)
