"""CPU throughput of the dsv4 reference network vs HF transformers' DeepseekV4ForCausalLM.

Both run the same random fp32 weights of `ModelConfig.tiny()` (every layer kind: sliding, CSA,
HCA; hash and biased MoE) on one CPU thread, in the same process:
  - prefill: one forward over S tokens from position 0 (no cache kept);
  - decode: 1 or 8 sequences with a 128-token prompt, then batched 1-token steps with the cache
    (ours: a ModelCache per row; HF: its DynamicCache with the V4 compressor layers).
Reports tokens/s (median of `--repeats`, ours and HF timed alternately) and the median per-pair
speed ratio ours / HF (= HF time / our time); checks the logits agree.

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
from test_model_hf_parity import PARITY_CFG, to_hf_state_dict  # the name mapping to HF

from dsv4.loading.testing import random_model


def paired(fn_ours, fn_hf, repeats: int) -> tuple[float, float, float]:
    """Median seconds of each, and the median of the per-pair ratios hf / ours. The two are
    timed alternately (after one warm-up each), so load from other processes hits both alike."""
    fn_ours(), fn_hf()
    t_ours, t_hf = [], []
    for _ in range(repeats):
        for fn, times in ((fn_ours, t_ours), (fn_hf, t_hf)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    ratio = statistics.median(h / o for o, h in zip(t_ours, t_hf))
    return statistics.median(t_ours), statistics.median(t_hf), ratio


def bench_load_model(repeats: int) -> None:
    """dsv4.load_model on random release-format checkpoints (tiny, and a ~70 MB one) against the
    floor of reading every shard into memory with safetensors' load_file (timed alternately)."""
    import tempfile

    from safetensors.torch import load_file

    from dsv4 import ModelConfig, load_model
    from dsv4.loading.testing import write_random_checkpoint

    mid = ModelConfig.tiny().replace(dim=1024, moe_inter_dim=256, vocab_size=4096, n_layers=8,
                                     compress_ratios=(0, 4, 128, 4, 128, 4, 128, 4, 0))
    print("\n| checkpoint | MB | load_model ms (FP8/FP4 kept, bf16) | load_model ms (dequantize, fp32) "
          "| load_file ms | load_model / load_file |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, cfg in (("tiny", ModelConfig.tiny()), ("mid (dim 1024, 8 layers)", mid)):
        with tempfile.TemporaryDirectory() as tmp:
            path = write_random_checkpoint(tmp, cfg, seed=0)
            shards = sorted(path.glob("model-*.safetensors"))
            mb = sum(f.stat().st_size for f in shards) / 1e6

            def read_all():
                return [{k: v.clone() for k, v in load_file(f).items()} for f in shards]

            t_load, t_raw, ratio = paired(lambda: load_model(path), read_all, repeats)
            t_deq, _, _ = paired(lambda: load_model(path, dtype=torch.float32, dequantize=True),
                                 read_all, repeats)
            print(f"| {name} | {mb:.1f} | {t_load * 1e3:.0f} | {t_deq * 1e3:.0f} | "
                  f"{t_raw * 1e3:.0f} | {1 / ratio:.1f} |")


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
            t_ours, t_hf, ratio = paired(lambda ids=ids: ours(ids), lambda ids=ids: hf(ids), args.repeats)
            diff = (ours(ids) - hf(ids).logits).abs().max().item()
            print(f"| prefill | {seq} | {seq / t_ours:,.0f} | {seq / t_hf:,.0f} | {ratio:.2f} | {diff:.1e} |")

        for batch in (1, 8):
            decode_row(ours, hf, cfg, batch, args.decode_steps, args.repeats, gen)
    bench_load_model(args.repeats)


def decode_row(ours, hf, cfg, batch: int, steps: int, repeats: int, gen: torch.Generator) -> None:
    """`batch` sequences with a 128-token prompt each, then `steps` batched 1-token steps (ours:
    one ModelCache per row; HF: one batched DynamicCache). Prints one table row."""
    ids = torch.randint(0, cfg.vocab_size, (batch, 128 + steps), generator=gen)

    def decode_ours() -> tuple[float, torch.Tensor]:
        caches = [ours.new_cache() for _ in range(batch)]
        ours(ids[:, :128], caches=caches)
        t = time.perf_counter()
        logits = [ours(ids[:, p:p + 1], caches=caches) for p in range(128, 128 + steps)]
        return time.perf_counter() - t, torch.cat(logits, 1)

    def decode_hf() -> tuple[float, torch.Tensor]:
        cache = hf(ids[:, :128], use_cache=True).cache
        t, logits = time.perf_counter(), []
        for p in range(128, 128 + steps):
            out = hf(ids[:, p:p + 1], cache=cache, use_cache=True)
            cache = out.cache
            logits.append(out.logits)
        return time.perf_counter() - t, torch.cat(logits, 1)

    runs = [(decode_ours(), decode_hf()) for _ in range(repeats)]
    t_ours = statistics.median(o[0] for o, _ in runs)
    t_hf = statistics.median(h[0] for _, h in runs)
    ratio = statistics.median(h[0] / o[0] for o, h in runs)
    diff = (runs[0][0][1] - runs[0][1][1]).abs().max().item()
    tokens = batch * steps
    print(f"| decode, batch {batch}, after 128-token prompts | {tokens} | {tokens / t_ours:,.1f} | "
          f"{tokens / t_hf:,.1f} | {ratio:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
