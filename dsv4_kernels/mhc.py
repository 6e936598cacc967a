"""Manifold-constrained hyper-connections (mHC, dsv4/network/mhc.py) fused into one Triton launch
per operation, and the torch references they must equal.

A decode step is launch-bound: in plain PyTorch each mHC block is ~80 small kernels (the RMS norm,
the 24-row linear map, the Sinkhorn iterations on a 4x4 matrix, the weighted collapse), twice per
layer plus the head. Here each is one or two launches that keep the small maths in registers:

  hc_pre   h [T, hc, D] -> x [T, D], post [T, hc], comb [T, hc, hc]
           launch 1, per (token, split of the hc*D inputs): partial sums of squares and of the
           (2+hc)*hc dot products with `fn` (a few tokens are split 32 ways so they still fill the
           GPU); launch 2, per token: the sums, the gates and the Sinkhorn projection (a [hc, hc]
           tile), then x = sum_k pre_k h_k
  hc_post  out [T, D], h [T, hc, D], post, comb -> new streams [T, hc, D]
           new_k = post_k * out + sum_j comb[j, k] * h_j, one program per (token, block of D)
  hc_head  h [T, hc, D] -> [T, D]: the sigmoid-only collapse before the output head (as hc_pre)

All weight math in fp32 (as the reference); the streams keep their dtype. The 24 dot products of
hc_pre are plain fp32 multiply-adds, not tensor-core dots: they are 24 outputs per token, and exact
fp32 keeps the Sinkhorn inputs equal to the reference's. hc must be a power of two (DSV4: 4).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:          # CPU-only installs: the torch references still work
    triton = None


# ---- torch references (the same maths as dsv4/network/mhc.py, written per token) -------------
def hc_pre_reference(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
                     iters: int, norm_eps: float, hc_eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [T,hc,D] -> x [T,D] (h's dtype), post [T,hc], comb [T,hc,hc] (in the compute dtype:
    fp32, or float64 when h is float64)."""
    hc = h.shape[1]
    dt = torch.float64 if h.dtype == torch.float64 else torch.float32
    flat = h.flatten(1).to(dt)
    mixes = (flat @ fn.to(dt).T) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    scale, base = scale.to(dt), base.to(dt)
    pre = torch.sigmoid(mixes[:, :hc] * scale[0] + base[:hc]) + hc_eps
    post = 2 * torch.sigmoid(mixes[:, hc:2 * hc] * scale[1] + base[hc:2 * hc])
    logits = (mixes[:, 2 * hc:] * scale[2] + base[2 * hc:]).unflatten(-1, (hc, hc))
    comb = logits.softmax(-1) + hc_eps
    comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    x = (pre.unsqueeze(-1) * h.to(dt)).sum(1)
    return x.to(h.dtype), post, comb


def hc_post_reference(out: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
                      ) -> torch.Tensor:
    """out [T,D], h [T,hc,D], post [T,hc], comb [T,hc,hc] -> [T,hc,D] in h's dtype."""
    dt = post.dtype
    mixed = torch.einsum("tjk,tjd->tkd", comb, h.to(dt))
    return (post.unsqueeze(-1) * out.to(dt).unsqueeze(1) + mixed).to(h.dtype)


def hc_head_reference(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
                      norm_eps: float, hc_eps: float) -> torch.Tensor:
    """h [T,hc,D] -> [T,D] in h's dtype."""
    dt = torch.float64 if h.dtype == torch.float64 else torch.float32
    flat = h.flatten(1).to(dt)
    mixes = (flat @ fn.to(dt).T) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    pre = torch.sigmoid(mixes * scale.to(dt) + base.to(dt)) + hc_eps
    return (pre.unsqueeze(-1) * h.to(dt)).sum(1).to(h.dtype)


# ---- kernels -----------------------------------------------------------------------------------
if triton is not None:
    @triton.jit
    def _hc_mix_partial_kernel(h_ptr, fn_ptr, part_ptr, K, CHUNK, PART_ROWS, N_MIX: tl.constexpr,
                               PART: tl.constexpr, BLOCK_K: tl.constexpr):
        """One (token, split of the hc*D inputs): the split's sum of squares and its N_MIX dot
        products with `fn`, written to part[t, split, :] as [sumsq, dot_0 .. dot_{N_MIX-1}, 0...]."""
        t = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        rows = tl.arange(0, PART)                        # slot 0: sumsq; slot 1 + m: fn row m
        fn_row = rows - 1
        has_row = (fn_row >= 0) & (fn_row < N_MIX)
        acc = tl.zeros([PART], dtype=tl.float32)
        sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(split * CHUNK, tl.minimum((split + 1) * CHUNK, K), BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            ok = offs < K
            v = tl.load(h_ptr + t * K + offs, mask=ok, other=0.0).to(tl.float32)
            sq += v * v
            f = tl.load(fn_ptr + fn_row[:, None] * K + offs[None, :], mask=has_row[:, None] & ok[None, :],
                        other=0.0)
            acc += tl.sum(f * v[None, :], 1)
        acc = tl.where(rows == 0, tl.sum(sq, 0), acc)
        tl.store(part_ptr + (t * PART_ROWS + split) * PART + rows, acc)

    @triton.jit
    def _hc_pre_finish_kernel(h_ptr, part_ptr, scale_ptr, base_ptr, x_ptr, post_ptr, comb_ptr,
                              D, norm_eps, hc_eps,
                              HC: tl.constexpr, ITERS: tl.constexpr, HEAD: tl.constexpr,
                              SPLITS: tl.constexpr, PART: tl.constexpr, BLOCK_D: tl.constexpr):
        """One token: sum the splits' partials, then the gates and the Sinkhorn projection (not for
        HEAD: only the sigmoid `pre`), then x = sum_k pre_k h_k."""
        t = tl.program_id(0).to(tl.int64)
        K = HC * D
        streams = tl.arange(0, HC)
        pairs = tl.arange(0, HC * HC)
        parts = part_ptr + t * SPLITS * PART + tl.arange(0, SPLITS)[:, None] * PART
        sumsq = tl.sum(tl.load(parts), 0)                                         # [SPLITS, 1]
        rsqrt = 1.0 / tl.sqrt(tl.sum(sumsq, 0) / K + norm_eps)
        mix_pre = tl.sum(tl.load(parts + 1 + streams[None, :]), 0)               # [HC]
        pre = tl.sigmoid(mix_pre * rsqrt * tl.load(scale_ptr) + tl.load(base_ptr + streams)) + hc_eps
        if not HEAD:
            mix_post = tl.sum(tl.load(parts + 1 + HC + streams[None, :]), 0)
            post = 2.0 * tl.sigmoid(mix_post * rsqrt * tl.load(scale_ptr + 1) + tl.load(base_ptr + HC + streams))
            tl.store(post_ptr + t * HC + streams, post)
            mix_comb = tl.sum(tl.load(parts + 1 + 2 * HC + pairs[None, :]), 0)
            logits = mix_comb * rsqrt * tl.load(scale_ptr + 2) + tl.load(base_ptr + 2 * HC + pairs)
            logits = tl.reshape(logits, [HC, HC])            # [j, k]: input stream j, output k
            e = tl.exp(logits - tl.max(logits, 1)[:, None])
            comb = e / tl.sum(e, 1)[:, None] + hc_eps
            comb = comb / (tl.sum(comb, 0)[None, :] + hc_eps)
            for _ in tl.static_range(ITERS - 1):
                comb = comb / (tl.sum(comb, 1)[:, None] + hc_eps)
                comb = comb / (tl.sum(comb, 0)[None, :] + hc_eps)
            tl.store(comb_ptr + t * HC * HC + tl.reshape(pairs, [HC, HC]), comb)
        row = h_ptr + t * K
        for d0 in range(0, D, BLOCK_D):                      # collapse the streams
            offs_d = d0 + tl.arange(0, BLOCK_D)
            ok_d = offs_d < D
            hv = tl.load(row + streams[:, None] * D + offs_d[None, :], mask=ok_d[None, :],
                         other=0.0).to(tl.float32)
            x = tl.sum(pre[:, None] * hv, 0)
            tl.store(x_ptr + t * D + offs_d, x.to(x_ptr.dtype.element_ty), mask=ok_d)

    @triton.jit
    def _hc_post_kernel(out_ptr, h_ptr, post_ptr, comb_ptr, new_ptr, D,
                        HC: tl.constexpr, BLOCK_D: tl.constexpr):
        """One (token, block of D): new[k, d] = post[k] out[d] + sum_j comb[j, k] h[j, d]."""
        t = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        ok_d = offs_d < D
        streams = tl.arange(0, HC)
        hv = tl.load(h_ptr + t * HC * D + streams[:, None] * D + offs_d[None, :], mask=ok_d[None, :],
                     other=0.0).to(tl.float32)                                        # [j, d]
        comb = tl.load(comb_ptr + t * HC * HC + streams[:, None] * HC + streams[None, :])  # [j, k]
        post = tl.load(post_ptr + t * HC + streams)                                   # [k]
        o = tl.load(out_ptr + t * D + offs_d, mask=ok_d, other=0.0).to(tl.float32)    # [d]
        mixed = tl.sum(comb[:, :, None] * hv[:, None, :], 0)                          # [k, d]
        new = post[:, None] * o[None, :] + mixed
        tl.store(new_ptr + t * HC * D + streams[:, None] * D + offs_d[None, :],
                 new.to(new_ptr.dtype.element_ty), mask=ok_d[None, :])


_BLOCK_K = 512
_BLOCK_D = 256
# Splits of the hc*D inputs per token for the linear map: a few tokens (decode) still spread over
# many multiprocessors; many tokens (prefill) need no split.
_SPLITS_FEW_TOKENS = 32


def _check_streams(h: torch.Tensor) -> tuple[int, int]:
    if h.dim() != 3:
        raise ValueError(f"mHC kernels take the streams as [tokens, hc, D], got {tuple(h.shape)}")
    hc = h.shape[1]
    if hc & (hc - 1):
        raise ValueError(f"mHC kernels need hc_mult a power of two, got {hc}")
    return hc, h.shape[2]


def _collapse(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
              iters: int, norm_eps: float, hc_eps: float, head: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two launches of hc_pre / hc_head: split partials of the map, then finish per token."""
    hc, d = _check_streams(h)
    t, k = h.shape[0], hc * d
    h = h.contiguous()
    x = torch.empty(t, d, dtype=h.dtype, device=h.device)
    post = torch.empty(t, hc, dtype=torch.float32, device=h.device)
    comb = torch.empty(t, hc, hc, dtype=torch.float32, device=h.device)
    if t == 0:
        return x, post, comb
    n_mix = fn.shape[0]
    part_width = triton.next_power_of_2(n_mix + 1)
    sms = torch.cuda.get_device_properties(h.device).multi_processor_count if h.is_cuda else 4
    splits = _SPLITS_FEW_TOKENS if t < 4 * sms else 1
    chunk = triton.cdiv(triton.cdiv(k, splits), _BLOCK_K) * _BLOCK_K
    splits = triton.cdiv(k, chunk)
    rows = triton.next_power_of_2(splits)            # zero rows past `splits` add nothing
    part = torch.zeros(t, rows, part_width, dtype=torch.float32, device=h.device)
    _hc_mix_partial_kernel[(t, splits)](h, fn.float().contiguous(), part, k, chunk, rows,
                                        N_MIX=n_mix, PART=part_width, BLOCK_K=_BLOCK_K)
    _hc_pre_finish_kernel[(t,)](h, part, scale.float().contiguous(), base.float().contiguous(), x, post,
                                comb, d, norm_eps, hc_eps, HC=hc, ITERS=iters, HEAD=head,
                                SPLITS=rows, PART=part_width, BLOCK_D=_BLOCK_D)
    return x, post, comb


def hc_pre(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
           iters: int, norm_eps: float, hc_eps: float
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `hc_pre_reference`, two launches. h [T,hc,D]; fn [(2+hc)*hc, hc*D] fp32."""
    return _collapse(h, fn, scale, base, iters=iters, norm_eps=norm_eps, hc_eps=hc_eps, head=False)


def hc_post(out: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """As `hc_post_reference`, one launch."""
    hc, d = _check_streams(h)
    t = h.shape[0]
    new = torch.empty_like(h, memory_format=torch.contiguous_format)
    if t:
        grid = (t, triton.cdiv(d, _BLOCK_D))
        _hc_post_kernel[grid](out.contiguous(), h.contiguous(), post.float().contiguous(),
                              comb.float().contiguous(), new, d, HC=hc, BLOCK_D=_BLOCK_D)
    return new


def hc_head(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
            norm_eps: float, hc_eps: float) -> torch.Tensor:
    """As `hc_head_reference`, two launches. fn [hc, hc*D]."""
    return _collapse(h, fn, scale, base, iters=1, norm_eps=norm_eps, hc_eps=hc_eps, head=True)[0]
