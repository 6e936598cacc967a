"""Manifold-constrained hyper-connections (mHC).

The residual is `hc_mult` (4) parallel streams h [B, S, hc, D]. Around each sub-layer (attention,
FFN) a block:
  hc_pre : reads the streams and computes, from one linear map `fn` of the RMS-normalised
           concatenated streams, three sets of weights: `pre` [hc] (collapse the streams to the
           sub-layer input), `post` [hc] (spread the output back) and `comb` [hc, hc] (mix the
           residual streams), projected onto doubly-stochastic matrices by Sinkhorn-Knopp;
  hc_post: h_new[k] = post[k] * out + sum_j comb[j, k] * h[j].
The final collapse before the head (`hc_head`) uses only sigmoid `pre` weights.
All weight math in fp32; the streams stay in the activation dtype.

On CUDA (with Triton) each of the three runs as one fused kernel (dsv4_kernels/mhc.py: one launch
instead of ~80, which decode is bound by); the torch code here is the path everywhere else and the
reference the kernels are tested against.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsv4.network.options import forward_options


def _mixes(h: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """h [B,S,hc,D] -> fn(rms-normalised flattened streams) [B,S,fn.shape[0]] fp32."""
    flat = h.flatten(2).float()                                            # [B,S,hc*D]
    rsqrt = torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    return F.linear(flat, fn.float()) * rsqrt


def sinkhorn_reference(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int,
                       iters: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sinkhorn_split` as the reference writes it, in `mixes`' dtype (the tests run it in float64),
    out of place: the form `torch.compile` gets (inductor miscompiles the in-place frame of
    `sinkhorn_split`: comb off by ~1e-2 on torch 2.13 CPU)."""
    scale, base = scale.to(mixes.dtype), base.to(mixes.dtype)
    pre = torch.sigmoid(mixes[..., :hc] * scale[0] + base[:hc]) + eps
    post = 2 * torch.sigmoid(mixes[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
    logits = mixes[..., 2 * hc:].unflatten(-1, (hc, hc)) * scale[2] + base[2 * hc:].view(hc, hc)
    comb = logits.softmax(-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre, post, comb


# Opt-in (`ForwardOptions.compile_sinkhorn`): hc_pre through torch.compile(sinkhorn_reference), a
# few fused kernels a call on CUDA instead of ~80 launches; compiled once, on first use.
_compiled_sinkhorn = None


def _sinkhorn() -> Callable:
    global _compiled_sinkhorn
    if not forward_options().compile_sinkhorn:
        return sinkhorn_split
    if _compiled_sinkhorn is None:
        _compiled_sinkhorn = torch.compile(sinkhorn_reference, dynamic=True)
    return _compiled_sinkhorn


def sinkhorn_split(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int,
                   iters: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mixes [..., (2+hc)*hc] -> pre [..., hc], post [..., hc], comb [..., hc, hc].

    comb = softmax over k of the logits, + eps, then `iters` column normalisations with
    row normalisations in between (the last operation is a column normalisation, so the
    columns sum to ~1; comb[j, k] weighs input stream j into output stream k).

    Few ops, as decode is launch-bound (~80 per call instead of ~120): one affine map for the
    three groups, and the matrices live in a [.., hc+1, hc+1] frame whose last row and column
    hold eps, so each normalisation is one sum (which adds the eps) and one in-place division
    of the [hc, hc] view."""
    scale, base = scale.float(), base.float()
    group_scale = torch.cat((scale[0:1].expand(hc), scale[1:2].expand(hc), scale[2:3].expand(hc * hc)))
    logits = torch.addcmul(base, mixes, group_scale)                       # [..., (2+hc)*hc]
    gates = torch.sigmoid(logits[..., :2 * hc])
    pre, post = gates[..., :hc] + eps, 2 * gates[..., hc:]
    frame = logits.new_full((*logits.shape[:-1], hc + 1, hc + 1), eps)
    comb = frame[..., :hc, :hc]                                            # a view of the frame
    torch.add(logits[..., 2 * hc:].unflatten(-1, (hc, hc)).softmax(-1), eps, out=comb)
    comb.div_(frame[..., :, :hc].sum(-2, keepdim=True))                    # columns (+ eps row)
    for _ in range(iters - 1):
        comb.div_(frame[..., :hc, :].sum(-1, keepdim=True))                # rows (+ eps column)
        comb.div_(frame[..., :, :hc].sum(-2, keepdim=True))
    return pre, post, comb


# hc_pre / hc_head of more tokens than this take the torch path: its matmul reads `fn` once for
# all tokens, the kernel once per token (H200, Flash: kernel 15x faster at 1-32 tokens, torch 1.2x
# at 8192; bench/bench_mhc.py). hc_post is fused at every size.
FUSED_COLLAPSE_MAX_TOKENS = 1024


def _fused_kernels(*tensors: torch.Tensor):
    """dsv4_kernels.mhc for CUDA tensors when Triton is there, else None (the torch path). Autograd
    (training) takes the torch path: the kernels have no backward."""
    if not tensors[0].is_cuda or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return None
    import dsv4_kernels  # lazily: Triton must be imported after a test sets TRITON_INTERPRET
    return dsv4_kernels.mhc if dsv4_kernels.triton_available() else None


def hc_pre(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
           iters: int, norm_eps: float, hc_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [B,S,hc,D] -> sub-layer input x [B,S,D] (h's dtype), post [B,S,hc], comb [B,S,hc,hc]."""
    fused = _fused_kernels(h, fn, scale, base)
    if fused is not None and h.shape[0] * h.shape[1] <= FUSED_COLLAPSE_MAX_TOKENS:
        b, s, hc, d = h.shape
        x, post, comb = fused.hc_pre(h.reshape(b * s, hc, d), fn, scale, base, iters=iters,
                                     norm_eps=norm_eps, hc_eps=hc_eps)
        return x.view(b, s, d), post.view(b, s, hc), comb.view(b, s, hc, hc)
    pre, post, comb = _sinkhorn()(_mixes(h, fn, norm_eps), scale, base, h.shape[2], iters, hc_eps)
    x = (pre.unsqueeze(-1) * h.float()).sum(2)
    return x.to(h.dtype), post, comb


def hc_post(out: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """out [B,S,D], residual streams h [B,S,hc,D] -> new streams [B,S,hc,D] in h's dtype."""
    fused = _fused_kernels(h, out, post, comb)
    if fused is not None:
        b, s, hc, d = h.shape
        return fused.hc_post(out.reshape(b * s, d), h.reshape(b * s, hc, d), post.reshape(b * s, hc),
                             comb.reshape(b * s, hc, hc)).view(b, s, hc, d)
    mixed = torch.einsum("bsjk,bsjd->bskd", comb, h.float())
    return (post.unsqueeze(-1) * out.float().unsqueeze(-2) + mixed).to(h.dtype)


def hc_head(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
            norm_eps: float, hc_eps: float) -> torch.Tensor:
    """Final collapse of the streams: h [B,S,hc,D] -> [B,S,D] (h's dtype), sigmoid weights only."""
    fused = _fused_kernels(h, fn, scale, base)
    if fused is not None and h.shape[0] * h.shape[1] <= FUSED_COLLAPSE_MAX_TOKENS:
        b, s, hc, d = h.shape
        return fused.hc_head(h.reshape(b * s, hc, d), fn, scale, base, norm_eps=norm_eps,
                             hc_eps=hc_eps).view(b, s, d)
    pre = torch.sigmoid(_mixes(h, fn, norm_eps) * scale.float() + base.float()) + hc_eps
    return (pre.unsqueeze(-1) * h.float()).sum(2).to(h.dtype)
