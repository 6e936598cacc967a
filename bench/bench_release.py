"""Release-format benchmark: the full-depth DeepSeek-V4-Flash shape in the release weight formats on
one GPU, with the ceilings measured in the same run.

Model: Flash dims, all 43 layers (CSA / HCA / sliding schedule, 3 hash-routed layers, top-6), 128
routed experts of Flash's 256 so it fits one H200, no MTP block; FP8 e4m3 linears with 128x128
UE8M0 scales, FP4 e2m1 routed experts with 1x32 UE8M0 scales, random values built straight on the
GPU (`dsv4.loading.testing.random_release_model`), `quant_sim` on (the official numerics); the
engine keeps its KV cache in the FP8 layout (`kv_fp8=True`, MXFP4 indexer keys).
Measured, in order (results JSON written after every phase):
  - ceilings: device-to-device copy (bytes read + written), 8192^3 matmuls: bf16, FP8 e4m3
    per-tensor `torch._scaled_mm`, and FP8 blockwise (1x128 x 128x128) `scaled_mm` where torch has it;
  - with --kernels: each FP8 projection shape of Flash at M = 1 .. 8192 through the Triton decode
    kernel, the Triton prefill kernel and torch's blockwise scaled_mm (activation quantisation
    included in all three), the fused FP4 MoE at Flash expert dims, the fused indexer;
  - time to first token of a fresh session for each --ttft prompt length (prefill + one greedy
    token; a warm-up prompt first compiles every kernel), and decode tokens/s at each --batch
    (forks of one session at --decode-context tokens); prompts longer than that context run last.
--budget-s skips the phases that would start after that many seconds.

    python bench/bench_release.py --out $OUT/release.json [--kernels fp8,moe,indexer] [--ttft 8192,131072]
CPU smoke test (tiny dims, interpreter kernels off): python bench/bench_release.py --tiny --device cpu
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time
from pathlib import Path

import anyio
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4 import Engine, ModelConfig, SamplingParams  # noqa: E402
from dsv4.loading.testing import random_release_model  # noqa: E402


def flash_release_config(experts: int) -> ModelConfig:
    flash = ModelConfig.flash()
    return flash.replace(n_routed_experts=experts, n_mtp_layers=0,
                         compress_ratios=flash.compress_ratios[:flash.n_layers])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn, *args, **kw):
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    sync(device)
    return time.perf_counter() - t0, out


def median_ms(fn, reps: int = 20) -> float:
    """Median of `reps` CUDA-event-timed calls after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def ceilings(device: torch.device) -> dict:
    """Copy bandwidth and 8192^3 matmul rates, medians of 20 on random data."""
    if device.type != "cuda":
        return {}
    out = {}
    src = torch.randn(1 << 29, device=device, dtype=torch.bfloat16)         # 1 GiB
    dst = torch.empty_like(src)
    out["copy_TBps"] = 2 * src.nbytes / median_ms(lambda: dst.copy_(src)) / 1e9
    del src, dst
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    flops = 2 * n ** 3
    out["bf16_matmul_TFLOPs"] = flops / median_ms(lambda: a @ b) / 1e9
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    one = torch.ones((), device=device)
    out["fp8_scaled_mm_tensorwise_TFLOPs"] = flops / median_ms(
        lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)) / 1e9
    from dsv4_kernels.fp8_gemm import scaled_mm_available
    if scaled_mm_available(device):
        F = torch.nn.functional
        sa = torch.ones(n // 128, n, device=device).t()                       # token-minor [M, K/128]
        sb = torch.ones(n // 128, n // 128, device=device).t()
        try:
            out["fp8_scaled_mm_blockwise_TFLOPs"] = flops / median_ms(
                lambda: F.scaled_mm(a8, b8.t(), sa, F.ScalingType.BlockWise1x128, sb,
                                    F.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16)) / 1e9
        except (RuntimeError, NotImplementedError) as e:
            out["fp8_scaled_mm_blockwise_error"] = str(e)[:300]
    return out


FLASH_FP8_SHAPES = {"attn.wq_a": (1024, 4096), "attn.wq_b": (32768, 1024), "attn.wkv": (512, 4096),
                    "attn.wo_b": (4096, 8192), "shared w1/w3": (2048, 4096), "shared w2": (4096, 2048),
                    "indexer.wq_b": (8192, 1024)}


def kernel_tables(device: torch.device, results: dict, save, which: set[str]) -> None:
    """Per-shape timings of the quantised kernels (module docstring); which: fp8, moe, indexer."""
    from dsv4.formats import quant
    from dsv4_kernels import fused_moe, indexer_topk, indexer_topk_reference
    from dsv4_kernels.fp8_gemm import fp8_linear, scaled_mm_available
    from dsv4_kernels.fused_moe import Fp4Experts

    g = torch.Generator(device).manual_seed(0)
    rows = results.setdefault("fp8_gemm", [])
    for name, (N, K) in FLASH_FP8_SHAPES.items() if "fp8" in which else ():
        w, s = quant.quantize_fp8(torch.randn(N, K, generator=g, device=device) * K ** -0.5)
        for M in (1, 8, 32, 128, 512, 2048, 8192):
            x = torch.randn(M, K, generator=g, device=device).bfloat16()
            row = {"shape": name, "M": M, "N": N, "K": K}
            paths = (["small"] if M <= 64 else []) + ["large"] + (["scaled_mm"] if scaled_mm_available(device) else [])
            for path in paths:
                try:
                    ms = median_ms(lambda x=x, path=path: fp8_linear(x, w, s, fp8_activations=True,
                                                                     config={"path": path}))
                except Exception as e:                      # recorded, the others still run
                    row[path] = repr(e)[:200]
                    continue
                row[path] = {"ms": ms, "TFLOPs": 2 * M * N * K / ms / 1e9,
                             "weight_TBps": N * K / ms / 1e9}
            rows.append(row)
            best = min((p for p in paths if isinstance(row.get(p), dict)), key=lambda p: row[p]["ms"], default=None)
            print(f"fp8 {name:>13} M={M:>5}: " + "  ".join(
                f"{p} {row[p]['ms']:.3f} ms ({row[p]['TFLOPs']:.0f} TF, {row[p]['weight_TBps']:.2f} TB/s)"
                for p in paths if isinstance(row.get(p), dict)) + f"  best {best}", flush=True)
        save()

    E, D, I, k = 128, 4096, 2048, 6

    def stack(out_f, in_f):
        codes = torch.randint(-128, 128, (E, out_f, in_f // 2), generator=g, device=device, dtype=torch.int8)
        scales = torch.full((E, out_f, in_f // 32), 119, dtype=torch.uint8, device=device).view(torch.float8_e8m0fnu)
        return codes, scales
    experts = Fp4Experts(*stack(I, D), *stack(I, D), *stack(D, I))
    moe_rows = results.setdefault("fused_moe", [])
    for T in (1, 32, 512, 2048, 8192) if "moe" in which else ():
        x = torch.randn(T, D, generator=g, device=device).bfloat16()
        ids = torch.rand(T, E, generator=g, device=device).argsort(1)[:, :k]
        wts = torch.rand(T, k, generator=g, device=device)
        used = min(E, T * k)
        weight_bytes = used * 3 * I * D // 2 * (1 + 1 / 16)         # codes + one scale byte a 32
        flops = 2 * T * k * 3 * I * D
        for block_m in (None, 128) if T >= 2048 else (None,):
            try:
                ms = median_ms(lambda: fused_moe(x, wts, ids, experts, n_routed_experts=E, swiglu_limit=10.0,
                                                 fp8_activations=True, block_m=block_m))
            except Exception as e:                              # recorded, the others still run
                moe_rows.append({"T": T, "block_m": block_m, "error": repr(e)[:300]})
                print(f"fused MoE T={T} block_m={block_m}: {e!r}"[:300], flush=True)
                continue
            moe_rows.append({"T": T, "block_m": block_m, "ms": ms, "TFLOPs": flops / ms / 1e9,
                             "weight_TBps": weight_bytes / ms / 1e9})
            print(f"fused MoE T={T:>5} block_m={block_m}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s, "
                  f"{weight_bytes / ms / 1e9:.2f} TB/s of expert weights", flush=True)
    save()
    ix_rows = results.setdefault("indexer", [])
    for S, N in ((2048, 2048), (2048, 32768)) if "indexer" in which else ():
        q = torch.randn(1, S, 64, 128, generator=g, device=device).bfloat16()
        keys = torch.randn(1, N, 128, generator=g, device=device).bfloat16()
        wts = torch.randn(1, S, 64, generator=g, device=device) / 90
        vis = torch.arange(N - S + 1, N + 1, device=device).view(1, S)
        ms = median_ms(lambda: indexer_topk(q, wts, keys, vis, 512), reps=5)
        ref_ms = median_ms(lambda: indexer_topk_reference(q, wts, keys, vis, 512), reps=3) if N <= 2048 else None
        flops = 2 * S * N * 64 * 128
        ix_rows.append({"S": S, "N": N, "ms": ms, "TFLOPs": flops / ms / 1e9, "reference_ms": ref_ms})
        print(f"indexer S={S} N={N}: {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s incl. top-512)"
              + (f", torch reference {ref_ms:.2f} ms" if ref_ms else ""), flush=True)
    save()


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def first_token(session) -> int:
    async def run():
        async for t in session.generate(max_tokens=1, temperature=0, ignore_eos=True):
            return t
    return anyio.run(run)


def decode_rate(engine: Engine, sessions, steps: int, device: torch.device) -> float:
    params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)

    async def run():
        async for _ in engine.generate_batch(sessions, params):
            pass
    t, _ = timed(device, anyio.run, run)
    return len(sessions) * steps / t


def main(argv=None):
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="ModelConfig.tiny() dims (CPU smoke test)")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--chunk", type=int, default=8192, help="prefill chunk tokens")
    p.add_argument("--ttft", type=ints, default=ints("8192,131072"))
    p.add_argument("--batch", type=ints, default=ints("1,32"))
    p.add_argument("--decode-context", type=int, default=8192)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--kernels", default="", help="also time quantised kernels per shape: any of fp8,moe,indexer")
    p.add_argument("--budget-s", type=float, default=0, help="skip phases started after this many s")
    p.add_argument("--out", type=Path, default=Path("bench/results/release.json"))
    args = p.parse_args(argv)
    deadline = time.time() + args.budget_s if args.budget_s else float("inf")
    device = torch.device(args.device)
    if args.tiny:
        base = ModelConfig.tiny()
        cfg = base.replace(n_mtp_layers=0, compress_ratios=base.compress_ratios[:base.n_layers])
    else:
        cfg = flash_release_config(args.experts)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(sys.argv), "torch": torch.__version__, "python": platform.python_version(),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
               "config": cfg.model_dump()}
    try:
        import triton
        results["triton"] = triton.__version__
    except ImportError:
        pass

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))

    results["ceilings"] = ceilings(device)
    print(f"ceilings: {results['ceilings']}", flush=True)
    save()
    if args.kernels and device.type == "cuda":
        kernel_tables(device, results, save, set(args.kernels.split(",")))
        gc.collect()
        torch.cuda.empty_cache()

    t_build, model = timed(device, random_release_model, cfg, device, 0, quant_sim=True)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    results["model"] = {"build_s": t_build, "weight_bytes": weight_bytes, "layers": cfg.n_layers,
                        "routed_experts": cfg.n_routed_experts}
    print(f"model: {cfg.n_layers} layers, {cfg.n_routed_experts} experts, {weight_bytes / 1e9:.1f} GB "
          f"built in {t_build:.1f} s", flush=True)
    save()

    engine = Engine(model, prefill_chunk=args.chunk, kv_fp8=True, snapshot_every=1 << 20, max_snapshots=0)
    vocab = cfg.vocab_size
    warm = engine.new_session()                        # compiles every kernel once
    t_warm, _ = timed(device, lambda: (warm.append(random_ids(min(args.chunk, 2048) + 5, vocab, 1)),
                                       first_token(warm)))
    warm.close()
    results["warmup_s"] = t_warm
    ttft = results.setdefault("ttft", {})

    def time_to_first_token(length: int) -> None:
        if time.time() > deadline:
            ttft[str(length)] = {"skipped": "time budget"}
            return
        session = engine.new_session()
        ids = random_ids(length, vocab, length)
        t_prefill, _ = timed(device, session.append, ids)
        t_first, _ = timed(device, first_token, session)
        ttft[str(length)] = {"prefill_s": t_prefill, "first_token_s": t_first, "ttft_s": t_prefill + t_first,
                             "prefill_tokens_per_s": length / t_prefill,
                             "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0}
        print(f"TTFT {length}: {t_prefill + t_first:.2f} s (prefill {length / t_prefill:,.0f} tok/s)", flush=True)
        session.close()
        gc.collect()
        save()

    long = [n for n in args.ttft if n > args.decode_context]       # after decode: they take longest
    for length in [n for n in args.ttft if n not in long]:
        time_to_first_token(length)
    decode = results.setdefault("decode", {})
    if args.batch and time.time() < deadline:
        base = engine.new_session()
        base.append(random_ids(args.decode_context, vocab, 7))
        for batch in args.batch:
            if time.time() > deadline:
                decode[str(batch)] = {"skipped": "time budget"}
                continue
            sessions = [base.fork() for _ in range(batch)]
            decode_rate(engine, sessions, 2, device)                       # warm-up
            rate = decode_rate(engine, sessions, args.decode_steps, device)
            decode[str(batch)] = {"batch": batch, "context": args.decode_context, "tokens_per_s": rate,
                                  "step_ms": 1000 * batch / rate}
            print(f"decode b={batch}: {rate:,.1f} tok/s ({1000 * batch / rate:.1f} ms a step)", flush=True)
            for s in sessions:
                s.close()
            save()
        base.close()
    for length in long:
        time_to_first_token(length)
    save()
    print(json.dumps({k: results[k] for k in ("ceilings", "model", "ttft", "decode") if k in results},
                     indent=1, default=str))


if __name__ == "__main__":
    main()
