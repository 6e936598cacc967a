"""DeepSeek-V4 core sparse attention (reference §2.6): one Triton forward kernel and the torch
reference it must equal.

For each query t of a sequence (position `n_prev + t` in the window key buffer), one softmax
with scale `scale` runs over
  - its sliding window: window_kv[i] for n_prev + t - window < i <= n_prev + t (causal band);
  - compressed entries: CSA `picks[t, :]` (indices into `entries`, -1 or anything outside
    [0, N) = none), or HCA the first `n_visible[t]` entries (clamped to N);
  - a per-head sink logit `sink[h]` (a key with no value: it only grows the denominator),
and the output is the probability-weighted sum of the same vectors (K = V, one d-dim head shared
by all H query heads, as in MQA).

Shapes (the leading batch dim B is optional; every batched tensor then carries it):
  q [B,S,H,d]   window_kv [B,n_prev+S,d]   entries [B,N,d]   picks [B,S,k] int   n_visible [B,S] int
  sink [H] fp32   ->   out [B,S,H,d] fp32

The kernel: one program per (query, block of heads, batch row). Since all heads share the keys,
each key tile [BLOCK_N, d] is loaded once and multiplied against all heads of the block (heads are
the M dimension of both dots, as in FlashMLA's sparse decode); online softmax in fp32 over the
window tiles, then the compressed tiles, then the sink. bf16 / fp16 inputs use the matrix units
with fp32 accumulation (P is rounded to the input dtype for the second dot, as flash attention
does); fp32 inputs use exact fp32 dots.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:          # CPU-only installs: the torch reference still works
    triton = None

LOG2E = 1.4426950408889634


def triton_available() -> bool:
    return triton is not None


@dataclass(frozen=True)
class KernelConfig:
    """Launch shape. block_h heads share each loaded key tile; block_n keys per tile;
    num_stages 2 overlaps the next tile's gather with this tile's dots."""
    block_h: int = 64
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2


def default_config(n_queries: int, n_heads: int) -> KernelConfig:
    """All heads in one program (each key tile loaded once per query) when the queries alone
    give the GPU enough programs: prefill, batched decode (fastest on an H200 at 4096 prefill
    queries and at 64 decode rows, bench/RESULTS.md). A few decode queries instead split the
    heads into blocks of 16, so they still spread over several multiprocessors."""
    if n_queries >= 64 or n_heads <= 16:
        return KernelConfig(block_h=max(16, min(64, triton.next_power_of_2(n_heads))))
    return KernelConfig(block_h=16, block_n=32, num_warps=4, num_stages=1)


if triton is not None:
    @triton.jit
    def _online_update(q, kv, ok, m, l, acc, qk_scale, PRECISION: tl.constexpr):
        """One key tile: kv [BLOCK_N, BLOCK_D], ok [BLOCK_N] -> updated running max m [BLOCK_H]
        (log2 domain), denominator l [BLOCK_H], numerator acc [BLOCK_H, BLOCK_D]."""
        s = tl.dot(q, tl.trans(kv), input_precision=PRECISION) * qk_scale      # [BLOCK_H, BLOCK_N]
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision=PRECISION)
        return m_new, l, acc

    @triton.jit
    def _sparse_attention_fwd(
        Q, WIN, ENT, PICKS, NVIS, SINK, OUT,
        S, H, N, n_prev, window, n_picks, qk_scale,
        stride_qb, stride_qs, stride_qh,
        stride_wb, stride_wn,
        stride_eb, stride_en,
        stride_pb, stride_ps,
        stride_vb,
        stride_ob, stride_os, stride_oh,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
        MODE: tl.constexpr,            # 0: window only, 1: CSA picks, 2: HCA visible count
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,          # dots in fp32 (the interpreter's bf16 dot is wrong)
    ):
        t = tl.program_id(0).to(tl.int64)         # int64: offsets of long prompts pass 2^31
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        b = tl.program_id(2).to(tl.int64)
        dims = tl.arange(0, BLOCK_D)
        d_ok = dims < D
        h_ok = heads < H
        # keys are cast to the query dtype for the dots
        cdt: tl.constexpr = tl.float32 if UPCAST else Q.dtype.element_ty

        q = tl.load(Q + b * stride_qb + t * stride_qs + heads[:, None] * stride_qh + dims[None, :],
                    mask=h_ok[:, None] & d_ok[None, :], other=0.0).to(cdt)      # [BLOCK_H, BLOCK_D]
        # a finite floor instead of -inf: a fully masked tile then gives alpha = 1, p = 0, not NaN
        m = tl.full([BLOCK_H], -1.0e30, tl.float32)
        l = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)

        # sliding window: keys lo..pos of this row's window buffer
        pos = n_prev + t
        lo = tl.maximum(pos - window + 1, 0)
        for k0 in range(lo, pos + 1, BLOCK_N):
            keys = k0 + tl.arange(0, BLOCK_N)
            ok = keys <= pos
            kv = tl.load(WIN + b * stride_wb + keys[:, None] * stride_wn + dims[None, :],
                         mask=ok[:, None] & d_ok[None, :], other=0.0).to(cdt)    # [BLOCK_N, BLOCK_D]
            m, l, acc = _online_update(q, kv, ok, m, l, acc, qk_scale, PRECISION)

        if MODE == 1:      # CSA: gather the picked entries, one index list per query
            for j0 in range(0, n_picks, BLOCK_N):
                j = j0 + tl.arange(0, BLOCK_N)
                idx = tl.load(PICKS + b * stride_pb + t * stride_ps + j, mask=j < n_picks, other=-1)
                ok = (idx >= 0) & (idx < N)
                rows = tl.where(ok, idx, 0).to(tl.int64)
                kv = tl.load(ENT + b * stride_eb + rows[:, None] * stride_en + dims[None, :],
                             mask=ok[:, None] & d_ok[None, :], other=0.0).to(cdt)
                m, l, acc = _online_update(q, kv, ok, m, l, acc, qk_scale, PRECISION)
        if MODE == 2:      # HCA: the first n_visible entries, contiguous
            n_vis = tl.minimum(tl.load(NVIS + b * stride_vb + t), N)
            for j0 in range(0, n_vis, BLOCK_N):
                rows = j0 + tl.arange(0, BLOCK_N)
                ok = rows < n_vis
                kv = tl.load(ENT + b * stride_eb + rows[:, None].to(tl.int64) * stride_en + dims[None, :],
                             mask=ok[:, None] & d_ok[None, :], other=0.0).to(cdt)
                m, l, acc = _online_update(q, kv, ok, m, l, acc, qk_scale, PRECISION)

        # the sink: one more logit per head (already a logit, so not scaled), no value
        sink = tl.load(SINK + heads, mask=h_ok, other=0.0) * 1.4426950408889634
        m_new = tl.maximum(m, sink)
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.exp2(sink - m_new)
        out = acc * (alpha / l)[:, None]
        tl.store(OUT + b * stride_ob + t * stride_os + heads[:, None] * stride_oh + dims[None, :],
                 out, mask=h_ok[:, None] & d_ok[None, :])


def _check_inputs(q, window_kv, entries, sink, window, n_prev, picks, n_visible):
    """Raise ValueError naming the first argument that does not fit; return (batched, mode)."""
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be [S,H,d] or [B,S,H,d], got shape {tuple(q.shape)}")
    batched = q.dim() == 4
    lead = tuple(q.shape[:1]) if batched else ()
    S, H, d = q.shape[-3:]
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not 0 <= n_prev <= window:
        raise ValueError(f"n_prev must be in [0, window={window}], got {n_prev}")
    if tuple(window_kv.shape) != lead + (n_prev + S, d):
        raise ValueError(f"window_kv must be {lead + (n_prev + S, d)} (n_prev + S keys of dim d), "
                         f"got {tuple(window_kv.shape)}")
    if tuple(sink.shape) != (H,):
        raise ValueError(f"sink must be [H]={H}, got {tuple(sink.shape)}")
    if picks is not None and n_visible is not None:
        raise ValueError("give picks (CSA) or n_visible (HCA), not both")
    if (picks is not None or n_visible is not None) and entries is None:
        raise ValueError("picks / n_visible need entries")
    if entries is not None:
        if entries.dim() != len(lead) + 2 or tuple(entries.shape[:-2]) != lead or entries.shape[-1] != d:
            raise ValueError(f"entries must be {lead + ('N', d)}, got {tuple(entries.shape)}")
    if picks is not None:
        if picks.dim() != len(lead) + 2 or tuple(picks.shape[:-1]) != lead + (S,):
            raise ValueError(f"picks must be {lead + (S, 'k')}, got {tuple(picks.shape)}")
        if picks.dtype.is_floating_point or picks.dtype == torch.bool:
            raise ValueError(f"picks must be an integer tensor, got {picks.dtype}")
    if n_visible is not None:
        if tuple(n_visible.shape) != lead + (S,):
            raise ValueError(f"n_visible must be {lead + (S,)}, got {tuple(n_visible.shape)}")
        if n_visible.dtype.is_floating_point or n_visible.dtype == torch.bool:
            raise ValueError(f"n_visible must be an integer tensor, got {n_visible.dtype}")
    for name, t in (("window_kv", window_kv), ("entries", entries), ("sink", sink),
                    ("picks", picks), ("n_visible", n_visible)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    mode = 1 if picks is not None else 2 if n_visible is not None else 0
    return batched, mode


def sparse_attention(q: torch.Tensor, window_kv: torch.Tensor, entries: torch.Tensor | None,
                     sink: torch.Tensor, *, scale: float, window: int, n_prev: int,
                     picks: torch.Tensor | None = None, n_visible: torch.Tensor | None = None,
                     config: KernelConfig | None = None) -> torch.Tensor:
    """The Triton kernel (module docstring for the arguments) -> out [(B,)S,H,d] fp32."""
    if triton is None:
        raise RuntimeError("sparse_attention needs Triton, which is not installed")
    batched, mode = _check_inputs(q, window_kv, entries, sink, window, n_prev, picks, n_visible)
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"q must be bf16, fp16 or fp32, got {q.dtype}")
    if not batched:
        q, window_kv = q[None], window_kv[None]
        entries = entries[None] if entries is not None else None
        picks = picks[None] if picks is not None else None
        n_visible = n_visible[None] if n_visible is not None else None
    B, S, H, d = q.shape
    q, window_kv = q.contiguous(), window_kv.contiguous()
    if entries is None or entries.shape[1] == 0:     # nothing compressed to see: window only
        entries, mode = window_kv, 0                  # (never read; any valid pointer will do)
    entries = entries.contiguous()
    picks = picks.contiguous() if picks is not None else window_kv.new_empty((B, S, 0), dtype=torch.int32)
    n_visible = n_visible.contiguous() if n_visible is not None else window_kv.new_empty((B, S), dtype=torch.int32)
    sink = sink.float().contiguous()
    out = torch.empty(B, S, H, d, dtype=torch.float32, device=q.device)
    if S == 0:
        return out if batched else out[0]

    if config is None:
        config = default_config(B * S, H)
    grid = (S, triton.cdiv(H, config.block_h), B)
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    _sparse_attention_fwd[grid](
        q, window_kv, entries, picks, n_visible, sink, out,
        S, H, entries.shape[1], n_prev, window, picks.shape[2], scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        window_kv.stride(0), window_kv.stride(1),
        entries.stride(0), entries.stride(1),
        picks.stride(0), picks.stride(1),
        n_visible.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_H=config.block_h, BLOCK_N=config.block_n,
        MODE=mode, PRECISION="ieee" if q.dtype == torch.float32 or interpret else "tf32",
        UPCAST=interpret,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out if batched else out[0]


def sparse_attention_reference(q: torch.Tensor, window_kv: torch.Tensor, entries: torch.Tensor | None,
                               sink: torch.Tensor, *, scale: float, window: int, n_prev: int,
                               picks: torch.Tensor | None = None, n_visible: torch.Tensor | None = None,
                               block: int = 64) -> torch.Tensor:
    """The same function in plain torch: logits of a block of `block` queries against its banded
    window keys and its compressed keys, masked, one softmax with the sink column. Computes in
    float64 when q is float64, else fp32. -> [(B,)S,H,d] in that dtype."""
    batched, mode = _check_inputs(q, window_kv, entries, sink, window, n_prev, picks, n_visible)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    if not batched:
        return sparse_attention_reference(
            q[None], window_kv[None], entries[None] if entries is not None else None, sink,
            scale=scale, window=window, n_prev=n_prev, block=block,
            picks=picks[None] if picks is not None else None,
            n_visible=n_visible[None] if n_visible is not None else None)[0]
    B, S, H, d = q.shape
    dev = q.device
    out = torch.empty(B, S, H, d, dtype=ct, device=dev)
    for b in range(B):
        ent = entries[b].to(ct) if entries is not None else None                   # [N,d]
        for t0 in range(0, S, block):
            t1 = min(S, t0 + block)
            qb = q[b, t0:t1].to(ct)                                                 # [T,H,d]
            lo, hi = max(0, n_prev + t0 - window + 1), n_prev + t1
            win = window_kv[b, lo:hi].to(ct)                                        # [Kw,d]
            k_idx = torch.arange(lo, hi, device=dev)
            q_idx = n_prev + torch.arange(t0, t1, device=dev)[:, None]
            win_ok = (k_idx <= q_idx) & (k_idx > q_idx - window)                    # [T,Kw]
            logits = [torch.einsum("thd,kd->thk", qb, win).masked_fill(~win_ok[:, None], -math.inf)]
            values = [(win, "thk,kd->thd")]
            if mode == 1:
                sel = picks[b, t0:t1].long()                                        # [T,k]
                ok = (sel >= 0) & (sel < ent.shape[0])
                comp = ent[torch.where(ok, sel, 0)]                                 # [T,k,d]
            elif mode == 2:
                comp = ent.expand(t1 - t0, -1, -1)                                  # [T,N,d]
                ok = torch.arange(ent.shape[0], device=dev) < n_visible[b, t0:t1, None]
            if mode:
                logits.append(torch.einsum("thd,tkd->thk", qb, comp).masked_fill(~ok[:, None], -math.inf))
                values.append((comp, "thk,tkd->thd"))
            sink_col = sink.to(ct).view(1, H, 1).expand(t1 - t0, H, 1)
            probs = torch.cat([x * scale for x in logits] + [sink_col], -1).softmax(-1)
            o, k0 = 0, 0
            for v, eq in values:
                o = o + torch.einsum(eq, probs[..., k0:k0 + v.shape[-2]], v)
                k0 += v.shape[-2]
            out[b, t0:t1] = o
    return out
