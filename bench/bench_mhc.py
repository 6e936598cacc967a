"""GPU benchmark of the fused mHC kernels (dsv4_kernels/mhc.py) against the torch path of
dsv4/network/mhc.py at Flash sizes (hc 4, D 4096): one decode row, a decode batch, a prefill chunk.

    PYTHONPATH=. python bench/bench_mhc.py

Bytes each operation must move (the floor): hc_pre reads h twice (the second pass is a re-read
from L2 for small T) and writes x; hc_post reads h and out and writes the new streams.
"""
from __future__ import annotations

import json

import torch
import triton.testing

from dsv4.network import mhc as torch_mhc
from dsv4_kernels import mhc as fused

HC, D, ITERS = 4, 4096, 20
SETTINGS = {"iters": ITERS, "norm_eps": 1e-6, "hc_eps": 1e-6}


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    fn = torch.randn((2 + HC) * HC, HC * D, device="cuda", generator=g) / (HC * D) ** 0.5
    scale = torch.rand(3, device="cuda", generator=g) + 0.5
    base = torch.randn((2 + HC) * HC, device="cuda", generator=g)
    rows = []
    for tokens in (1, 32, 8192):
        h = torch.randn(tokens, HC, D, device="cuda", generator=g).bfloat16()
        out = torch.randn(tokens, D, device="cuda", generator=g).bfloat16()
        # the torch path (what runs without the kernels): force it by calling the module's parts
        def torch_pre():
            split = torch_mhc.sinkhorn_split
            pre, post, comb = split(torch_mhc._mixes(h[None], fn, 1e-6), scale, base, HC, ITERS, 1e-6)
            return (pre.unsqueeze(-1) * h[None].float()).sum(2).to(h.dtype), post, comb
        x, post, comb = fused.hc_pre(h, fn, scale, base, **SETTINGS)
        t_torch_pre = triton.testing.do_bench(torch_pre, return_mode="median")
        t_fused_pre = triton.testing.do_bench(lambda: fused.hc_pre(h, fn, scale, base, **SETTINGS),
                                              return_mode="median")
        def torch_post():
            mixed = torch.einsum("tjk,tjd->tkd", comb, h.float())
            return (post.unsqueeze(-1) * out.float().unsqueeze(-2) + mixed).to(h.dtype)
        t_torch_post = triton.testing.do_bench(torch_post, return_mode="median")
        t_fused_post = triton.testing.do_bench(lambda: fused.hc_post(out, h, post, comb), return_mode="median")
        pre_bytes = 2 * h.numel() * 2 + tokens * D * 2
        post_bytes = h.numel() * 2 * 2 + tokens * D * 2
        rows.append({"tokens": tokens, "hc_pre_torch_ms": t_torch_pre, "hc_pre_fused_ms": t_fused_pre,
                     "hc_pre_fused_GBps": pre_bytes / t_fused_pre / 1e6,
                     "hc_post_torch_ms": t_torch_post, "hc_post_fused_ms": t_fused_post,
                     "hc_post_fused_GBps": post_bytes / t_fused_post / 1e6})
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t_copy = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    copy_gbps = 2 * a.numel() / t_copy / 1e6
    print(json.dumps({"copy_GBps": copy_gbps, "rows": rows}, indent=1))
    print(f"{'tokens':>7} {'pre torch':>10} {'pre fused':>10} {'post torch':>11} {'post fused':>11}  (ms; fused GB/s vs copy {copy_gbps:.0f})")
    for r in rows:
        print(f"{r['tokens']:>7} {r['hc_pre_torch_ms']:>10.4f} {r['hc_pre_fused_ms']:>10.4f} "
              f"{r['hc_post_torch_ms']:>11.4f} {r['hc_post_fused_ms']:>11.4f}  "
              f"pre {r['hc_pre_fused_GBps']:.0f} GB/s, post {r['hc_post_fused_GBps']:.0f} GB/s")


if __name__ == "__main__":
    main()
