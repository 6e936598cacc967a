"""Engine benchmarks on a Flash-shaped model with few layers, against HF transformers' DeepseekV4.

Measures, in one process (so every ratio compares figures of the same run and GPU):
  - the device's ceilings: copy bandwidth (bytes read + written) and a bf16 8192^3 matmul;
  - prefill tokens/s of a fresh session at each --prefill length (chunked, last-token logits);
  - agent turn: time to first token after appending --append tokens to a resident session of
    each --ttft length, against a full re-prefill of the same text (for lengths up to
    --reprefill-max a fresh session is timed; above, the re-prefill is the measured prefill of
    the resident part plus the measured append, the same chunks a fresh prefill would run);
  - decode tokens/s at each --batch (forks of one session at --decode-context tokens);
  - KV bytes per token, bf16 cache and (with --fp8) the 584-byte FP8 layout, measured from the
    caches and from the formula;
  - HF DeepseekV4ForCausalLM (eager, DynamicCache) on the same config: prefill at each --hf-prefill
    length until it runs out of memory, decode at batch 1 and --hf-batch.

Random weights (bf16, built on the device). Results go to --out as JSON after every phase, and a
table is printed at the end.

GPU: python bench/bench_engine.py --out $OUT/engine.json
CPU smoke test: python bench/bench_engine.py --device cpu --tiny
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

from dsv4 import Engine, ForwardOptions, ModelConfig, RuntimeOptions, SamplingParams  # noqa: E402
from dsv4.network.model import Transformer  # noqa: E402


def bench_config(args) -> ModelConfig:
    """Flash dims (dim 4096, 64 heads x 512, q_lora 1024, 8 x 1024 output groups, indexer 64 x 128
    top-512, window 128, mHC 4), `--layers` layers alternating CSA / HCA, `--experts` routed
    experts (Flash has 256; 64 keeps the weights small, the per-token work is the same), the
    first 3 layers hash-routed as in Flash, no MTP layer, bf16 weights."""
    if args.tiny:
        base = ModelConfig.tiny()
        return base.replace(n_mtp_layers=0, compress_ratios=base.compress_ratios[:base.n_layers])
    ratios = tuple(4 if i % 2 == 0 else 128 for i in range(args.layers))
    return ModelConfig.flash().replace(n_layers=args.layers, n_mtp_layers=0, compress_ratios=ratios,
                                       n_hash_layers=min(3, args.layers),
                                       n_routed_experts=args.experts, dtype="bf16", expert_dtype=None)


class Clock:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn, *a, **kw):
        self.sync()
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        self.sync()
        return time.perf_counter() - t0, out


def ceilings(clock: Clock, device: torch.device) -> dict:
    """Measured copy bandwidth and bf16 matmul rate (medians of 10 after warm-up)."""
    if device.type != "cuda":
        return {}
    src = torch.randn(1 << 29, device=device, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    copy, mm = [], []
    for i in range(13):
        t, _ = clock.time(dst.copy_, src)
        copy.append(t)
        t, _ = clock.time(torch.mm, a, b)
        mm.append(t)
    copy, mm = sorted(copy[3:])[5], sorted(mm[3:])[5]
    del src, dst, a, b
    return {"copy_TBps": 2 * (1 << 30) / copy / 1e12, "bf16_matmul_TFLOPs": 2 * 8192**3 / mm / 1e12}


def build_model(cfg: ModelConfig, device: torch.device) -> Transformer:
    """Random bf16 weights made on the device (fp32 where the release keeps fp32: norms, mHC,
    sinks, ape, gate bias)."""
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = Transformer(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval()


def weight_bytes_per_decode_step(model: Transformer, cfg: ModelConfig, batch: int) -> int:
    """Bytes of weights one decode step reads: everything except the routed experts no row uses
    (uniform routing assumed: min(E, 6 B) experts per layer) and the embedding table."""
    total = expert = 0
    for name, p in model.named_parameters():
        n = p.numel() * p.element_size()
        if name.startswith("embed."):
            continue
        if ".ffn.experts." in name:
            expert += n
        else:
            total += n
    used = min(cfg.n_routed_experts, cfg.n_activated_experts * batch) / cfg.n_routed_experts
    return int(total + expert * used)


def matmul_flops_per_token(model: Transformer, cfg: ModelConfig) -> int:
    """2 x the weights one token multiplies with (6 of E experts; attention and indexer score
    FLOPs left out, so achieved TFLOP/s is a lower bound)."""
    flops = 0
    for name, p in model.named_parameters():
        if p.dim() != 2 or name.startswith("embed.") or "hc_" in name:
            continue
        share = cfg.n_activated_experts / cfg.n_routed_experts if ".ffn.experts." in name else 1
        flops += 2 * p.numel() * share
    return int(flops)


def stored_kv_bytes(session) -> int:
    """Bytes of the compressed entries and indexer keys a session holds (growing buffers counted
    by their filled rows, not their doubled capacity)."""
    total = 0
    for layer in session.engine.sequence(session.sid).cache.layers:
        for rows in (layer.compressed, layer.indexer_keys):
            if rows is not None:
                total += rows.stored().nbytes
    return total


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def first_token(session) -> int:
    async def run():
        async for t in session.generate(max_tokens=1, temperature=0, ignore_eos=True):
            return t

    return anyio.run(run)


def decode_rate(engine: Engine, sessions, steps: int, clock: Clock) -> float:
    params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)

    async def run():
        async for _ in engine.generate_batch(sessions, params):
            pass

    t, _ = clock.time(anyio.run, run)
    return len(sessions) * steps / t


def model_only_decode(model, caches, steps: int, clock: Clock, options: ForwardOptions) -> float:
    """Greedy decode straight through the model (no engine): the floor the engine adds to."""
    nxt = torch.zeros(len(caches), 1, dtype=torch.long, device=caches[0].device)

    def run():
        nonlocal nxt
        with torch.inference_mode():
            for _ in range(steps):
                nxt = model(nxt, caches=caches, last_only=True, options=options)[:, -1].argmax(-1, keepdim=True)

    run_t, _ = clock.time(run)
    return len(caches) * steps / run_t


def profile_decode(model, caches, path: Path, options: ForwardOptions) -> None:
    """Top operators of 3 decode steps (torch.profiler), written to `path`."""
    from torch.profiler import ProfilerActivity, profile

    nxt = torch.zeros(len(caches), 1, dtype=torch.long, device=caches[0].device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, torch.inference_mode():
        for _ in range(3):
            nxt = model(nxt, caches=caches, last_only=True, options=options)[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
    table += "\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    path.write_text(table)


def bench_engine(args, cfg, model, device, clock, results, save):
    engine = Engine(model, kv_budget_bytes=None, options=RuntimeOptions(
        prefill_chunk=args.chunk, step_tokens=args.chunk, snapshot_every=args.chunk * 16, max_snapshots=2,
        forward=args.forward))
    bf16_formula = engine.kv_bytes_per_token
    results["kv_bytes_per_token_formula"] = {"bf16": bf16_formula}
    vocab = cfg.vocab_size
    # warm-up (kernels, allocator)
    s = engine.new_session()
    s.append(random_ids(min(2 * args.chunk, 4096), vocab, 99))
    first_token(s)
    s.close()

    decode = results.setdefault("decode", {})
    base = engine.new_session()
    base.append(random_ids(args.decode_context, vocab, 7))
    for batch in args.batch:
        if args.deadline and time.time() > args.deadline:
            decode[str(batch)] = {"skipped": "time budget"}
            continue
        sessions = [base.fork() for _ in range(batch)]
        decode_rate(engine, sessions, 2, clock)  # warm-up; forks take their own copies here
        rate = decode_rate(engine, sessions, args.decode_steps, clock)
        caches = [engine.sequence(s.sid).cache for s in sessions]
        floor = model_only_decode(model, caches, args.decode_steps, clock, args.forward)
        if args.profile and device.type == "cuda":
            profile_decode(model, caches, args.out.parent / f"profile_decode_b{batch}.txt", args.forward)
        step_bytes = weight_bytes_per_decode_step(model, cfg, batch)
        decode[str(batch)] = {"batch": batch, "context": args.decode_context, "tokens_per_s": rate,
                              "model_only_tokens_per_s": floor,
                              "step_ms": 1000 * batch / rate, "weight_bytes_per_step": step_bytes,
                              "weight_TBps": step_bytes * rate / batch / 1e12}
        print(f"decode b={batch}: {rate:,.1f} tok/s (model alone {floor:,.1f})", flush=True)
        for s in sessions:
            s.close()
        save()
    base.close()

    if args.fp8:
        try:
            fp8 = Engine(model, kv_budget_bytes=None, kv_fp8=True, options=RuntimeOptions(
                prefill_chunk=args.chunk, step_tokens=args.chunk, forward=args.forward))
            s = fp8.new_session()
            fixed = s.kv_bytes()
            n = args.fp8_tokens
            s.append(random_ids(n, vocab, 5))
            results["kv_bytes_per_token_formula"]["fp8"] = fp8.kv_bytes_per_token
            results["kv_fp8"] = {"tokens": n, "kv_bytes_per_token_allocated": (s.kv_bytes() - fixed) / n,
                                 "kv_bytes_per_token_stored": stored_kv_bytes(s) / n}
            s.close()
        except Exception as e:  # recorded, the other phases still count
            results["kv_fp8"] = {"error": repr(e)}
        save()
    flops_tok = matmul_flops_per_token(model, cfg)
    prefill = results.setdefault("prefill", {})
    ttft = results.setdefault("ttft", {})
    lengths = sorted(set(args.prefill) | set(args.ttft))
    for length in lengths:
        if args.deadline and time.time() > args.deadline:
            prefill[str(length)] = {"skipped": "time budget"}
            continue
        ids = random_ids(length + args.append, vocab, length)
        session = engine.new_session()
        fixed = session.kv_bytes()
        t_pre, _ = clock.time(session.append, ids[:length])
        kv = session.kv_bytes()
        row = {"tokens": length, "seconds": t_pre, "tokens_per_s": length / t_pre,
               "matmul_TFLOPs_lower_bound": flops_tok * length / t_pre / 1e12,
               "kv_bytes": kv, "kv_fixed_bytes": fixed,
               "kv_bytes_per_token_allocated": (kv - fixed) / length,
               "kv_bytes_per_token_stored": stored_kv_bytes(session) / length}
        if device.type == "cuda":
            row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
        prefill[str(length)] = row
        print(f"prefill {length}: {t_pre:.2f}s {length / t_pre:,.0f} tok/s", flush=True)
        if length in args.ttft:
            def turn():
                session.append(ids[length:])
                return first_token(session)

            t_turn, _ = clock.time(turn)
            entry = {"resident_tokens": length, "appended": args.append, "ttft_s": t_turn}
            if length + args.append <= args.reprefill_max:
                fresh = engine.new_session()

                def cold():
                    fresh.append(ids)
                    return first_token(fresh)

                t_cold, _ = clock.time(cold)
                fresh.close()
                entry["reprefill_s"] = t_cold
                entry["reprefill_how"] = "fresh session, timed"
            else:
                entry["reprefill_s"] = t_pre + t_turn
                entry["reprefill_how"] = "measured prefill of the resident part + measured append"
            entry["speedup"] = entry["reprefill_s"] / t_turn
            ttft[str(length)] = entry
            print(f"ttft {length}+{args.append}: {t_turn:.3f}s vs re-prefill {entry['reprefill_s']:.2f}s",
                  flush=True)
        session.close()
        del session
        gc.collect()
        save()

    del engine
    gc.collect()


def bench_hf(args, cfg, device, clock, results, save):
    """HF transformers' DeepseekV4ForCausalLM, same config, same device, bf16, eager attention."""
    import transformers
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    hf = results.setdefault("hf", {"transformers": transformers.__version__})
    torch.manual_seed(0)
    with device:
        model = DeepseekV4ForCausalLM(DeepseekV4Config(**cfg.to_hf_config())).to(torch.bfloat16).eval()
    vocab = cfg.vocab_size
    with torch.no_grad():
        model(torch.tensor([random_ids(256, vocab, 1)], device=device), use_cache=False, logits_to_keep=1)
        for length in args.hf_prefill:
            if args.deadline and time.time() > args.deadline:
                hf[f"prefill_{length}"] = {"skipped": "time budget"}
                continue
            ids = torch.tensor([random_ids(length, vocab, length)], device=device)
            try:
                t, _ = clock.time(model, ids, use_cache=False, logits_to_keep=1)
                hf[f"prefill_{length}"] = {"seconds": t, "tokens_per_s": length / t}
                print(f"hf prefill {length}: {length / t:,.0f} tok/s", flush=True)
            except torch.OutOfMemoryError as e:
                hf[f"prefill_{length}"] = {"error": "out of memory", "detail": str(e)[:200]}
                print(f"hf prefill {length}: OOM", flush=True)
                break
            finally:
                del ids
                gc.collect()
                torch.cuda.empty_cache() if device.type == "cuda" else None
            save()
        for batch in sorted({1, args.hf_batch}):
            try:
                ids = torch.tensor([random_ids(args.decode_context, vocab, 7 + b) for b in range(batch)],
                                   device=device)
                out = model(ids, use_cache=True, logits_to_keep=1)
                cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

                def steps(n):
                    nonlocal cache, nxt
                    for _ in range(n):
                        o = model(nxt, past_key_values=cache, use_cache=True)
                        cache, nxt = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)

                steps(2)
                t, _ = clock.time(steps, args.decode_steps)
                hf[f"decode_{batch}"] = {"tokens_per_s": batch * args.decode_steps / t,
                                         "context": args.decode_context}
                print(f"hf decode b={batch}: {batch * args.decode_steps / t:,.1f} tok/s", flush=True)
            except torch.OutOfMemoryError as e:
                hf[f"decode_{batch}"] = {"error": "out of memory", "detail": str(e)[:200]}
            finally:
                cache = out = ids = None
                gc.collect()
                torch.cuda.empty_cache() if device.type == "cuda" else None
            save()
    del model
    gc.collect()


def summary(results) -> str:
    lines = []
    hf = results.get("hf", {})
    for k, v in results.get("prefill", {}).items():
        if "tokens_per_s" in v:
            peer = hf.get(f"prefill_{k}", {})
            ratio = f" ({v['tokens_per_s'] / peer['tokens_per_s']:.2f}x HF)" if "tokens_per_s" in peer else \
                (" (HF: OOM)" if peer.get("error") else "")
            lines.append(f"prefill {int(k):>8}: {v['tokens_per_s']:>10,.0f} tok/s{ratio}")
    for k, v in hf.items():
        if k.startswith("prefill_") and "tokens_per_s" in v and k[8:] not in results.get("prefill", {}):
            lines.append(f"HF prefill {k[8:]:>5}: {v['tokens_per_s']:>10,.0f} tok/s")
        elif k.startswith("prefill_") and v.get("error"):
            lines.append(f"HF prefill {k[8:]:>5}: {v['error']}")
    for k, v in results.get("decode", {}).items():
        if "tokens_per_s" in v:
            peer = hf.get(f"decode_{k}", {})
            ratio = f" ({v['tokens_per_s'] / peer['tokens_per_s']:.2f}x HF)" if "tokens_per_s" in peer else ""
            lines.append(f"decode b={k:>3}: {v['tokens_per_s']:>10,.1f} tok/s{ratio}")
    for k, v in results.get("ttft", {}).items():
        lines.append(f"turn at {int(k):>8} +{v['appended']}: TTFT {v['ttft_s']:.3f}s vs re-prefill "
                     f"{v['reprefill_s']:.2f}s ({v['speedup']:.0f}x)")
    f = results.get("kv_bytes_per_token_formula", {})
    stored = {k: round(v["kv_bytes_per_token_stored"], 1) for k, v in results.get("prefill", {}).items()
              if "kv_bytes_per_token_stored" in v}
    lines.append(f"KV bytes/token formula: {f}; bf16 stored: {stored}; fp8: {results.get('kv_fp8')}")
    return "\n".join(lines)


def main(argv=None):
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="ModelConfig.tiny() dims (CPU smoke test)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--chunk", type=int, default=4096, help="prefill chunk tokens")
    p.add_argument("--prefill", type=ints, default=ints("4096,32768,131072"))
    p.add_argument("--ttft", type=ints, default=ints("131072"),
                   help="resident lengths; each + --append + 1 must fit in max_seq_len (1M: 1046527)")
    p.add_argument("--append", type=int, default=2048)
    p.add_argument("--reprefill-max", type=int, default=140000)
    p.add_argument("--batch", type=ints, default=ints("1,32"))
    p.add_argument("--decode-context", type=int, default=4096)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--fp8", action="store_true", help="also measure the FP8 KV cache")
    p.add_argument("--profile", action="store_true", help="write torch.profiler tables of decode")
    p.add_argument("--fp8-tokens", type=int, default=32768)
    p.add_argument("--hf", action="store_true", help="also run HF transformers' DeepseekV4")
    p.add_argument("--hf-prefill", type=ints, default=ints("4096,8192,16384"))
    p.add_argument("--hf-batch", type=int, default=32)
    p.add_argument("--budget-s", type=float, default=0, help="skip engine phases started after this many s")
    p.add_argument("--workspace-elems", type=int, default=1 << 28,
                   help="fp32 elements of the model's attention / indexer score blocks")
    p.add_argument("--no-tf32", action="store_true", help="keep fp32 matmuls in full fp32")
    p.add_argument("--out", type=Path, default=Path("bench/engine_results.json"))
    args = p.parse_args(argv)
    args.deadline = time.time() + args.budget_s if args.budget_s else 0
    device = torch.device(args.device)
    clock = Clock(device)
    args.forward = ForwardOptions(workspace_elems=args.workspace_elems)
    torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
    cfg = bench_config(args)
    for length in args.ttft:
        if length + args.append + 1 > cfg.max_seq_len:
            p.error(f"--ttft {length} + --append {args.append} + 1 generated token exceeds "
                    f"max_seq_len {cfg.max_seq_len}")
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(sys.argv), "torch": torch.__version__, "python": platform.python_version(),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
               "config": cfg.model_dump(), "workspace_elems": args.workspace_elems,
               "tf32": not args.no_tf32}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))

    results["ceilings"] = ceilings(clock, device)
    t, model = clock.time(build_model, cfg, device)
    results["model"] = {"build_s": t, "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    print(f"model built in {t:.1f}s, {results['model']['param_bytes'] / 1e9:.2f} GB", flush=True)
    save()
    try:
        bench_engine(args, cfg, model, device, clock, results, save)
    except Exception as e:
        results["engine_error"] = repr(e)
        import traceback

        traceback.print_exc()
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.hf:
        try:
            bench_hf(args, cfg, device, clock, results, save)
        except Exception as e:
            results["hf_error"] = repr(e)
            import traceback

            traceback.print_exc()
    save()
    print(summary(results))


if __name__ == "__main__":
    main()
