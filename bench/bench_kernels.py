"""GPU benchmark of dsv4_kernels.sparse_attention (Triton) against its torch reference, at DSV4 sizes.

Per case: the relative error ||kernel - ref|| / ||ref|| of the kernel against
`sparse_attention_reference` on fresh random bf16 inputs (the reference computes in fp32 from the
same values), then `triton.testing.do_bench` medians of both. Ceilings measured in the same run: a
device-to-device copy (bytes read + written) and an 8192^3 bf16 matmul. Each case's floor is
max(FLOPs / matmul rate, bytes / copy bandwidth), with
  FLOPs = 4 * H * d * (visible keys summed over queries)      (QK^T and PV, masked keys not counted)
  bytes = q (bf16) + out (fp32) + the distinct keys and index lists it must read once.
Shapes: H=64 heads, d=512, window 128 with a full ring before the chunk, CSA top-512 over a 64K
context (16,384 entries), HCA over a 64K context (512 entries); prefill blocks of 256..4096
queries, decode S=1 with batch 1..64 (the batched [B,...] API, one program per query).

    PYTHONPATH=. python bench/bench_kernels.py [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import platform

import torch
import triton
from triton.testing import do_bench

from dsv4_kernels.sparse_attention import (
    KernelConfig,
    default_config,
    sparse_attention,
    sparse_attention_reference,
)

H, D, WINDOW, TOPK, CTX = 64, 512, 128, 512, 65536


def ceilings() -> tuple[float, float]:
    """(copy bytes/s counting read + write, bf16 matmul FLOP/s), medians on random data."""
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)          # 2 GiB
    dst = torch.empty_like(src)
    copy_s = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median") * 1e-3
    src = dst = None                                                          # free 4 GiB
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_s = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median") * 1e-3
    return 2 * 2 * (1 << 30) / copy_s, 2 * 8192 ** 3 / mm_s


def make_case(kind: str, B: int, S: int, g: torch.Generator) -> tuple[dict, float, float]:
    """Inputs of one case (fresh random) -> (kwargs, FLOPs, bytes)."""
    n_prev = WINDOW
    dev = "cuda"
    q = torch.randn(B, S, H, D, generator=g, device=dev).bfloat16()
    win = torch.randn(B, n_prev + S, D, generator=g, device=dev).bfloat16()
    kw = dict(q=q, window_kv=win, sink=torch.randn(H, generator=g, device=dev),
              scale=D ** -0.5, window=WINDOW, n_prev=n_prev, entries=None)
    keys_per_query = WINDOW                       # the ring is full: every query sees 128 window keys
    key_bytes = win.numel() * 2
    if kind == "csa":
        N = CTX // 4
        kw["entries"] = torch.randn(B, N, D, generator=g, device=dev).bfloat16()
        kw["picks"] = torch.randint(0, N, (B, S, TOPK), generator=g, device=dev)
        keys_per_query += TOPK
        distinct = min(N, S * TOPK)               # entries the picks can touch, each read once
        key_bytes += B * distinct * D * 2 + kw["picks"].numel() * 8
    elif kind == "hca":
        N = CTX // 128
        kw["entries"] = torch.randn(B, N, D, generator=g, device=dev).bfloat16()
        kw["n_visible"] = torch.full((B, S), N, device=dev, dtype=torch.int32)
        keys_per_query += N
        key_bytes += kw["entries"].numel() * 2
    flops = 4.0 * H * D * keys_per_query * B * S
    nbytes = q.numel() * 2 + B * S * H * D * 4 + key_bytes
    return kw, flops, nbytes


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer cases, no config sweep")
    args = ap.parse_args()
    torch.manual_seed(0)
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}")
    copy_bw, mm_rate = ceilings()
    print(f"# ceilings: copy {copy_bw / 1e12:.2f} TB/s (read + write), bf16 matmul 8192^3 {mm_rate / 1e12:.0f} TFLOP/s")

    sweep = [KernelConfig(64, 32, 8, 1), KernelConfig(64, 32, 8, 2), KernelConfig(64, 32, 8, 3),
             KernelConfig(64, 16, 8, 2), KernelConfig(64, 64, 8, 2), KernelConfig(16, 32, 4, 1)]
    if not args.quick:
        print("# config sweep (CSA): block_h block_n warps stages -> ms")
        for B, S in ((1, 4096), (64, 1), (8, 1)):
            kw, flops, _ = make_case("csa", B, S, g)
            for cfg in sweep:
                try:
                    ms = do_bench(lambda kw=kw, cfg=cfg: sparse_attention(**kw, config=cfg), warmup=25, rep=100,
                                  return_mode="median")
                except triton.runtime.errors.OutOfResources as e:       # too much shared memory
                    print(f"#   B={B} S={S} {cfg}: {e}")
                    continue
                print(f"#   B={B} S={S} {cfg.block_h} {cfg.block_n} {cfg.num_warps} {cfg.num_stages} -> "
                      f"{ms:.3f} ms ({flops / ms * 1e-9:.0f} TFLOP/s)")

    cases = [("csa", 1, 256), ("csa", 1, 1024), ("csa", 1, 4096), ("hca", 1, 4096), ("window", 1, 4096),
             ("csa", 1, 1), ("csa", 8, 1), ("csa", 64, 1), ("hca", 64, 1)]
    if args.quick:
        cases = [("csa", 1, 1024), ("csa", 64, 1)]
    rows = []
    for kind, B, S in cases:
        kw, flops, nbytes = make_case(kind, B, S, g)
        out = sparse_attention(**kw)
        ref = sparse_attention_reference(**kw)
        err = rel_err(out, ref)
        del out, ref
        k_ms = do_bench(lambda kw=kw: sparse_attention(**kw), warmup=25, rep=100, return_mode="median")
        r_ms = do_bench(lambda kw=kw: sparse_attention_reference(**kw), warmup=5, rep=50, return_mode="median")
        floor_ms = max(flops / mm_rate, nbytes / copy_bw) * 1e3
        cfg = default_config(B * S, H)
        rows.append((kind, B, S, err, k_ms, r_ms, flops / k_ms * 1e-9, nbytes / k_ms * 1e-9, floor_ms,
                     f"{cfg.block_h}/{cfg.block_n}/{cfg.num_warps}"))

    print("| case | B | S | rel err | kernel ms | torch ref ms | ref / kernel | TFLOP/s | TB/s | floor ms | floor / kernel | config h/n/w |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind, B, S, err, k_ms, r_ms, tf, tb, floor_ms, cfg in rows:
        print(f"| {kind} | {B} | {S} | {err:.1e} | {k_ms:.3f} | {r_ms:.3f} | {r_ms / k_ms:.1f} | {tf:.0f} | "
              f"{tb:.2f} | {floor_ms:.3f} | {floor_ms / k_ms:.2f} | {cfg} |")
    bad = [r for r in rows if not r[3] < 1e-2]
    if bad:
        raise SystemExit(f"kernel disagrees with the reference: {[(r[0], r[1], r[2], r[3]) for r in bad]}")


if __name__ == "__main__":
    main()
