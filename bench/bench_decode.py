"""Decode-step launch count and speed: how many ops one batched decode step issues, where they
come from, and how many host syncs it forces.

Rows sit at different positions (one shared prefix of --context tokens, then row b appends
b % 9 more tokens, so the rows cross compression boundaries at different steps), and each
measured step is `model(next_ids [B,1], caches, last_only=True)` + greedy argmax.

Counted per decode step, on any device (a TorchDispatchMode sees every aten op the model runs):
  - ops: aten ops that compute: in-place ops and ops returning new data (views, no-op casts and
    empty allocations excluded). The proxy for GPU kernel launches (a composite such as einsum
    counts once), split by the dsv4 file whose code issued them (innermost dsv4 frame);
  - syncs: ops that make the host wait for the device: `.item()` / int(t),
    `.tolist()`, nonzero / torch.where(cond), unique, boolean-mask indexing, masked_select, and
    on a GPU blocking host-to-device copies (`torch.tensor(list, device="cuda")`, `t.to("cuda")`).
On CUDA also the profiler's runtime calls per step (cudaLaunchKernel & co, cudaMemcpyAsync,
cudaStreamSynchronize) and the time per step (median of --steps after warm-up) -> tokens/s.

CPU (tiny dims): python bench/bench_decode.py --batch 1,32
GPU (Flash dims, 4 layers CSA/HCA/CSA/HCA, 64 experts, bf16):
    python bench/bench_decode.py --device cuda --batch 1,32,64 --out $OUT/decode.json
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4.network.config import ModelConfig
from dsv4.network.model import Transformer
from dsv4.network.options import ForwardOptions

DSV4_DIR = str(Path(__file__).resolve().parents[1] / "dsv4")
NO_LAUNCH = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default",
             "aten.lift_fresh.default", "aten._local_scalar_dense.default", "aten.item.default"}
SYNC_OPS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.nonzero.default",
            "aten.where.default", "aten.nonzero_numpy.default", "aten._unique2.default",
            "aten.unique_dim.default", "aten.masked_select.default", "aten.unique_consecutive.default"}


def config(args) -> ModelConfig:
    """The engine bench's decode model: `--layers` layers alternating CSA / HCA, `--experts` routed
    experts, top-6, the first 3 layers hash-routed, no MTP, bf16. Flash dims on CUDA or with
    --flash; on CPU by default the tiny dims with the same layer pattern, routing and dtypes, so
    the op counts are those of the GPU model."""
    ratios = tuple(4 if i % 2 == 0 else 128 for i in range(args.layers))
    layout = dict(n_layers=args.layers, n_mtp_layers=0, compress_ratios=ratios, n_hash_layers=min(3, args.layers),
                  n_routed_experts=args.experts, n_activated_experts=6, dtype="bf16", expert_dtype=None)
    if args.device == "cpu" and not args.flash:
        return ModelConfig.tiny().replace(**layout)
    return ModelConfig.flash().replace(**layout)


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
    """Random weights (small, so activations stay O(1)); fp32 where the release keeps fp32."""
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = Transformer(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith("embed."):
                p.normal_(0, p.shape[-1] ** -0.5)
            elif name.endswith(("_base", "attn_sink", "ape")):
                p.normal_(0, 1)
    return model.eval()


def _caller_file() -> str:
    """The innermost dsv4 module on the Python stack (who issued the op)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(DSV4_DIR):
            return Path(name).stem
        frame = frame.f_back
    return "outside dsv4"


def _storages(tree) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves(tree)
            if isinstance(t, torch.Tensor) and t.numel()}


def _aliases(out, args) -> bool:
    """True when every tensor the op returned is a view of one of its inputs (no new data: a
    view, or a `.to()` / `.contiguous()` that had nothing to do)."""
    outs = _storages(out)
    return bool(outs) and outs <= _storages(args)


def _blocking_upload(name: str, args, kwargs: dict) -> bool:
    """A CPU -> GPU copy without non_blocking ends in cudaStreamSynchronize: `t.to(device)`, or
    `torch.tensor(values, device=...)` (seen only as the detach_ of its freshly made result)."""
    if name == "aten.detach_.default":
        return args[0].device.type != "cpu"
    if not name.startswith(("aten.to.", "aten._to_copy")) or not isinstance(args[0], torch.Tensor):
        return False
    device = kwargs.get("device", next((a for a in args[1:] if isinstance(a, torch.device)), None))
    return (args[0].device.type == "cpu" and device is not None and torch.device(device).type != "cpu"
            and not kwargs.get("non_blocking", False))


class OpCounter(TorchDispatchMode):
    """Counts computing aten ops by dsv4 file, and host-syncing ops (see the module doc)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in SYNC_OPS or (name.startswith("aten.index.Tensor") and any(
                i is not None and i.dtype == torch.bool for i in args[1])):
            self.syncs[f"{_caller_file()}: {name}"] += 1
        if _blocking_upload(name, args, kwargs or {}):
            self.syncs[f"{_caller_file()}: blocking host-to-device copy"] += 1
        out = func(*args, **(kwargs or {}))
        if name not in NO_LAUNCH and (func._schema.is_mutable or not _aliases(out, args)):
            self.ops[_caller_file()] += 1
        return out

    def __enter__(self):
        # .tolist() never reaches the dispatcher: count it at the Python level
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t):
            counter.syncs[f"{_caller_file()}: Tensor.tolist"] += 1
            return counter._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def make_caches(model: Transformer, batch: int, context: int, device: torch.device):
    """One prefix of `context` tokens, forked per row; row b then appends b % 9 more tokens."""
    vocab = model.cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    base = model.new_cache()
    chunk = 2048
    ids = torch.randint(0, vocab, (1, context), generator=g).to(device)
    with torch.inference_mode():
        for t0 in range(0, context, chunk):
            model(ids[:, t0:t0 + chunk], caches=[base], last_only=True)
        caches = []
        for b in range(batch):
            c = base.clone()
            if b % 9:
                model(torch.randint(0, vocab, (1, b % 9), generator=g).to(device), caches=[c], last_only=True)
            caches.append(c)
    return caches


def decode_step(model: Transformer, caches, nxt: torch.Tensor) -> torch.Tensor:
    return model(nxt, caches=caches, last_only=True)[:, -1].argmax(-1, keepdim=True)


def count_step(model, caches, nxt) -> dict:
    with torch.inference_mode(), OpCounter() as counter:
        decode_step(model, caches, nxt)
    return {"ops": sum(counter.ops.values()), "ops_by_file": dict(counter.ops.most_common()),
            "syncs": sum(counter.syncs.values()), "syncs_by_op": dict(counter.syncs.most_common())}


def cuda_runtime_calls(model, caches, nxt, steps: int = 3) -> dict:
    """Per step: kernel launches, memcpys and stream syncs as the CUDA profiler records them."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, torch.inference_mode():
        for _ in range(steps):
            nxt = decode_step(model, caches, nxt)
        torch.cuda.synchronize()
    calls = collections.Counter()
    for ev in prof.key_averages():
        if ev.key.startswith(("cudaLaunchKernel", "cuLaunchKernel")):
            calls["launches"] += ev.count
        elif ev.key == "cudaMemcpyAsync":
            calls["memcpy"] += ev.count
        elif ev.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"):
            calls["syncs"] += ev.count
    gpu_us = sum(ev.self_device_time_total for ev in prof.key_averages()) / steps
    return {k: v / steps for k, v in calls.items()} | {"gpu_ms_per_step": gpu_us / 1000}


def time_steps(model, caches, nxt, steps: int, device: torch.device) -> float:
    """Median seconds per decode step (after 2 warm-up steps)."""
    times = []
    with torch.inference_mode():
        for i in range(steps + 2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            nxt = decode_step(model, caches, nxt)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--context", type=int, default=None, help="shared prefix (default cpu 300, cuda 4096)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default cpu 5, cuda 20)")
    p.add_argument("--flash", action="store_true", help="Flash dims on CPU too (slow)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="CPU torch threads")
    p.add_argument("--compile-sinkhorn", action="store_true",
                   help="opt-in torch.compile'd Sinkhorn (ForwardOptions.compile_sinkhorn); its kernels are "
                        "invisible to the op count, the CUDA launch count sees them")
    p.add_argument("--label", default="", help="free text stored with the results (e.g. the commit)")
    p.add_argument("--out", type=Path, default=None, help="JSON results")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True          # as bench_engine.py's decode figures
    cuda = device.type == "cuda"
    context = args.context or (4096 if cuda else 300)
    steps = args.steps or (20 if cuda else 5)
    cfg = config(args)
    model = build_model(cfg, device, torch.bfloat16 if cfg.dtype == "bf16" else torch.float32)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "label": args.label,
               "compile_sinkhorn": args.compile_sinkhorn, "torch": torch.__version__, "machine": platform.node(),
               "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
               "config": {"n_layers": cfg.n_layers, "dim": cfg.dim, "compress_ratios": cfg.compress_ratios,
                          "n_routed_experts": cfg.n_routed_experts, "n_activated_experts": cfg.n_activated_experts}, "context": context, "batch": {}}
    with ForwardOptions(compile_sinkhorn=args.compile_sinkhorn).applied():  # every forward below
        for batch in [int(b) for b in args.batch.split(",")]:
            caches = make_caches(model, batch, context, device)
            nxt = torch.randint(0, cfg.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(2)).to(device)
            with torch.inference_mode():
                nxt = decode_step(model, caches, nxt)           # warm-up
            row = count_step(model, caches, nxt)
            if cuda:
                row["cuda"] = cuda_runtime_calls(model, caches, nxt)
            step_s = time_steps(model, caches, nxt, steps, device)
            row |= {"step_ms": 1000 * step_s, "tokens_per_s": batch / step_s}
            results["batch"][str(batch)] = row
            extra = (f", {row['cuda'].get('launches', 0):.0f} launches, {row['cuda'].get('syncs', 0):.0f} stream syncs"
                     if cuda else "")
            print(f"batch {batch}: {row['ops']} ops, {row['syncs']} syncs{extra} per step; "
                  f"{row['step_ms']:.2f} ms/step, {row['tokens_per_s']:.1f} tok/s", flush=True)
            print("   ops by file:", row["ops_by_file"])
            print("   syncs:", row["syncs_by_op"])
            del caches
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
