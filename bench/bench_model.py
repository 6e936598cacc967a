"""CPU throughput of the dsv4 reference network vs HF transformers' DeepseekV4ForCausalLM.

Both run the same random fp32 weights of `ModelConfig.tiny()` (every layer kind: sliding, CSA,
HCA; hash and biased MoE) on one CPU thread, in the same process:
  - prefill: one forward over S tokens from position 0 (no cache kept);
  - decode: a 128-token prompt, then 1-token steps with the cache (ours: ModelCache,
    HF: its DynamicCache with the V4 compressor layers).
Reports tokens/s (median of `--repeats`) and the ratio ours / HF; checks the logits agree.

    PYTHONPATH=. python bench/bench_model.py [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "dsv4"))
from test_model_hf_parity import PARITY_CFG, to_hf_state_dict  # noqa: E402  (name mapping to HF)

from dsv4.testing import random_model  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--decode-steps", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = PARITY_CFG
    ours = random_model(cfg, seed=0).eval()
    hf_cfg = DeepseekV4Config(**copy.deepcopy(cfg.to_hf_config()))
    hf_cfg._attn_implementation = "eager"
    hf = DeepseekV4ForCausalLM(hf_cfg).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), config tiny (dim {cfg.dim}, {cfg.n_layers} layers + MTP, "
          f"vocab {cfg.vocab_size})")
    print("| phase | tokens | ours tok/s | HF tok/s | ours / HF | max abs logit diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for seq in (128, 512, 1024):
            ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=gen)
            t_ours = timed(lambda: ours(ids), args.repeats)
            t_hf = timed(lambda: hf(ids), args.repeats)
            diff = (ours(ids) - hf(ids).logits).abs().max().item()
            print(f"| prefill | {seq} | {seq / t_ours:,.0f} | {seq / t_hf:,.0f} | {t_hf / t_ours:.2f} | {diff:.1e} |")

        steps = args.decode_steps
        ids = torch.randint(0, cfg.vocab_size, (1, 128 + steps), generator=gen)

        def decode_ours() -> tuple[float, torch.Tensor]:
            cache = ours.new_cache()
            ours(ids[:, :128], caches=[cache])
            t = time.perf_counter()
            logits = [ours(ids[:, p:p + 1], caches=[cache]) for p in range(128, 128 + steps)]
            return time.perf_counter() - t, torch.cat(logits, 1)

        def decode_hf() -> tuple[float, torch.Tensor]:
            cache = hf(ids[:, :128], use_cache=True).cache
            t, logits = time.perf_counter(), []
            for p in range(128, 128 + steps):
                out = hf(ids[:, p:p + 1], cache=cache, use_cache=True)
                cache = out.cache
                logits.append(out.logits)
            return time.perf_counter() - t, torch.cat(logits, 1)

        runs_ours = [decode_ours() for _ in range(args.repeats)]
        runs_hf = [decode_hf() for _ in range(args.repeats)]
        t_ours = statistics.median(r[0] for r in runs_ours)
        t_hf = statistics.median(r[0] for r in runs_hf)
        diff = (runs_ours[0][1] - runs_hf[0][1]).abs().max().item()
        print(f"| decode after a 128-token prompt | {steps} | {steps / t_ours:,.1f} | "
              f"{steps / t_hf:,.1f} | {t_hf / t_ours:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
