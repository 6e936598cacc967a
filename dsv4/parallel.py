"""Tensor + expert parallelism for DSV4 over torch.distributed (reference §6.1, as the official
inference code): one model-parallel group of W ranks (NCCL on GPUs, gloo on CPU).

What each rank holds (everything else is replicated: wq_a, q_norm, wkv, kv_norm, compressors,
norms, the MoE gate, the shared expert, hc_*; replicated parts compute the same values on every
rank, so the KV cache is the same on every rank too):
    embed.weight                    rows [r*V/W, (r+1)*V/W): masked lookup + all_reduce
    head.weight                     rows likewise: logits all_gather (every rank gets all of V)
    attn.wq_b, attn.attn_sink       heads [r*H/W, (r+1)*H/W) (rows)
    attn.wo_a                       output groups [r*G/W, (r+1)*G/W) (rows)
    attn.wo_b                       input columns of those groups: output all_reduce (fp32; each
                                    rank's partial is first rounded to the activation dtype)
    attn.indexer.wq_b, weights_proj indexer heads (rows): head-summed scores all_reduce (fp32)
                                    before the top-k, so every rank picks the same entries
    ffn.experts.{e}                 whole experts e in [r*E/W, (r+1)*E/W): MoE output all_reduce
                                    (fp32) of the routed sum; the shared expert is replicated and
                                    added after the reduce
Per layer that is 2 all_reduces (attention, MoE), 3 on CSA layers (indexer).
The KV cache is per rank: DSV4's single K=V head (MQA) and the compressed entries are needed by
every head, so each rank keeps the full cache of every session (bytes per rank = the
single-process figure; the whole group holds W copies).

    tp = parallel.init(rank, world, "tcp://127.0.0.1:29500", backend="gloo")
    model = dsv4.load_model(path, tp=tp)      # only this rank's slices are read
    results = parallel.launch(fn, world_size=2, args=(...))   # fn(tp, *args) on W spawned ranks
`dsv4.Engine(path, tp=N)` runs an engine over N ranks (dsv4/spmd.py).
"""
from __future__ import annotations

import math
import os
import queue
import re
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dsv4.linear import Linear

FP8_BLOCK = 128          # FP8 weights carry one scale per 128x128 block: shards must align to it


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the model-parallel group. `group` None = the default group.
    With world == 1 every collective is the identity and nothing is sharded."""

    rank: int = 0
    world: int = 1
    group: Any = None

    def __post_init__(self):
        if not 0 <= self.rank < self.world:
            raise ValueError(f"tensor parallel rank {self.rank} is not in [0, {self.world})")

    def local_range(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [lo, hi) of n items (n divisible by world)."""
        per = n // self.world
        return self.rank * per, (self.rank + 1) * per

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks, reduced in fp32, returned in x's dtype (identity on one rank)."""
        if self.world == 1:
            return x
        total = x.float().contiguous()
        if total is x:                  # fp32 input: reduce a copy, the caller's tensor stays as is
            total = x.clone()
        dist.all_reduce(total, group=self.group)
        return total.to(x.dtype)

    def gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' x concatenated along `dim`, rank order (identity on one rank)."""
        if self.world == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def check(self, cfg: Any) -> None:
        """Every sharded count of `cfg` must divide by the world size; ValueError names them."""
        if self.world == 1:
            return
        counts = {"n_heads": cfg.n_heads, "o_groups": cfg.o_groups, "index_n_heads": cfg.index_n_heads,
                  "n_routed_experts": cfg.n_routed_experts, "vocab_size": cfg.vocab_size}
        bad = [f"{k}={v}" for k, v in counts.items() if v % self.world]
        if bad:
            raise ValueError(f"tensor parallel over {self.world} ranks needs these divisible by "
                             f"{self.world}: {', '.join(bad)}")


SINGLE = TensorParallel()


# ---- sharded modules ------------------------------------------------------------------------
class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows of the embedding table; ids of other ranks' rows read as zeros, then the
    ranks' lookups are summed (exact: one non-zero term per id)."""

    def __init__(self, vocab_size: int, dim: int, tp: TensorParallel):
        super().__init__(vocab_size // tp.world, dim)
        self.tp = tp
        self.vocab_start = tp.local_range(vocab_size)[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.num_embeddings)
        rows = super().forward(torch.where(mine, local, 0)).masked_fill(~mine[..., None], 0)
        return self.tp.sum(rows)


class VocabParallelHead(Linear):
    """This rank's rows (vocab entries) of the output head; logits gathered over the vocab."""

    def __init__(self, dim: int, vocab_size: int, tp: TensorParallel):
        super().__init__(dim, vocab_size // tp.world)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.gather(super().forward(x), dim=-1)


# ---- checkpoint sharding rules (reference §4, convert.py) -----------------------------------
# (module path suffix, tensor) -> dimension split over the ranks
_SPLIT_DIM = {
    ("embed", "weight"): 0, ("head", "weight"): 0,
    ("attn.wq_b", "weight"): 0, ("attn.wo_a", "weight"): 0, ("attn.wo_b", "weight"): 1,
    ("attn", "attn_sink"): 0,
    ("indexer.wq_b", "weight"): 0, ("indexer.weights_proj", "weight"): 0,
}
_EXPERT = re.compile(r"(?:^|\.)ffn\.experts\.(\d+)\.")


def split_dim(name: str) -> int | None:
    """The dimension along which the checkpoint tensor `name` (a weight, or its `.scale`) is
    split over the ranks, or None (replicated, or a whole expert)."""
    owner, _, leaf = name.rpartition(".")
    for (suffix, tensor), dim in _SPLIT_DIM.items():
        if (owner == suffix or owner.endswith("." + suffix)) and leaf in (tensor, "scale"):
            return dim
    return None


def expert_of(name: str) -> int | None:
    """The routed-expert index of a checkpoint tensor name, or None."""
    m = _EXPERT.search(name)
    return int(m.group(1)) if m else None


def shard_headers(headers: dict[str, tuple[str, tuple[int, ...]]], tp: TensorParallel, n_experts: int
                  ) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, tuple[slice, ...]], list[str]]:
    """This rank's view of a checkpoint: (name -> (dtype code, local shape)) without the other
    ranks' experts, name -> the index that reads this rank's slice of a split tensor, and the
    problems found (a split that does not divide, or that cuts through an FP8 scale block)."""
    lo, hi = tp.local_range(n_experts)
    local: dict[str, tuple[str, tuple[int, ...]]] = {}
    index: dict[str, tuple[slice, ...]] = {}
    problems: list[str] = []
    for name, (code, shape) in headers.items():
        expert = expert_of(name)
        if expert is not None and not lo <= expert < hi:
            continue                                       # another rank's expert: never read
        dim = split_dim(name)
        if dim is None or tp.world == 1:
            local[name] = (code, shape)
            continue
        owner, _, leaf = name.rpartition(".")
        # a scale is split like its weight, in whole blocks; any other tensor by its own extent
        weight = headers.get(f"{owner}.weight") if leaf == "scale" else (code, shape)
        if weight is None or dim >= len(weight[1]) or dim >= len(shape):
            problems.append(f"{name}: {list(shape)} has no dimension {dim} to split over the ranks")
            continue
        full = weight[1][dim]                               # the weight's extent (rows / columns)
        if weight[0] == "I8":
            problems.append(f"{name}: a packed FP4 weight cannot be split over ranks")
            continue
        if full % tp.world:
            problems.append(f"{name}: {full} {'rows' if dim == 0 else 'columns'} do not split "
                            f"over {tp.world} ranks")
            continue
        per = full // tp.world
        if weight[0] == "F8_E4M3":                          # FP8 weight or its 128x128 scale
            if per % FP8_BLOCK:
                if leaf == "scale":
                    continue                                # reported once, with the weight
                problems.append(
                    f"{owner}: {tp.world} ranks would get {per} {'rows' if dim == 0 else 'columns'} each, "
                    f"not a multiple of the {FP8_BLOCK}-wide FP8 scale block (pick a world size that "
                    f"keeps every shard block-aligned)")
                continue
            if leaf == "scale":
                per //= FP8_BLOCK                           # the scale is split in whole blocks
        idx = [slice(None)] * len(shape)
        idx[dim] = slice(tp.rank * per, (tp.rank + 1) * per)
        index[name] = tuple(idx)
        local[name] = (code, tuple(per if d == dim else s for d, s in enumerate(shape)))
    return local, index, problems


# ---- process groups -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, world: int, init_method: str, backend: str = "gloo",
         timeout_s: float = 1800.0) -> TensorParallel:
    """Join the default process group (`backend` for the model's collectives: "nccl" with one
    GPU a rank, cuda:rank, or "gloo"); `timeout_s` bounds every collective."""
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    return TensorParallel(rank, world, None)


def control_group(timeout_s: float = 7 * 24 * 3600.0) -> Any:
    """A gloo group over the same ranks for Python objects (commands, statuses): CPU-side, and
    with a long timeout, since a follower rank waits there while the engine is idle."""
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def _launched(rank: int, world: int, init_method: str, backend: str, timeout_s: float,
              fn: Callable, args: tuple, results: Any) -> None:
    try:
        tp = init(rank, world, init_method, backend, timeout_s)
        try:
            results.put((rank, True, fn(tp, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the launcher, which raises it
        results.put((rank, False, traceback.format_exc()))


def launch(fn: Callable, world_size: int, args: tuple = (), backend: str = "gloo",
           timeout_s: float = 300.0) -> list[Any]:
    """Run fn(tp, *args) on `world_size` spawned ranks joined in one process group (a free TCP
    port on localhost) and return the ranks' results, rank order. fn and its results must be
    picklable. `timeout_s` is the group's collective timeout: a rank stuck in a collective fails
    after it. A rank that fails raises RuntimeError here (with its traceback), a rank silent for
    timeout_s + 60 s TimeoutError, and every rank still running is terminated: this never hangs."""
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_launched, daemon=True,
                         args=(r, world_size, init_method, backend, timeout_s, fn, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: list[str] = []
    try:
        deadline = timeout_s + 60.0          # + start-up; the ranks' collective timeout fires first
        while len(out) + len(errors) < world_size:
            try:
                rank, ok, value = results.get(timeout=deadline)
            except queue.Empty:
                alive = [r for r, p in enumerate(procs) if p.is_alive()]
                raise TimeoutError(f"launch: ranks {alive} gave no result within {deadline:.0f} s") from None
            if ok:
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break                        # the others may now wait forever on a collective
    finally:
        finished = len(out) == world_size      # else a rank failed or hangs: do not wait for it
        for p in procs:
            p.join(timeout=10 if finished else 0.5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    if errors:
        raise RuntimeError("launch: a rank failed\n" + "\n".join(errors))
    return [out[r] for r in range(world_size)]


def device_for(rank: int, device: str | torch.device | None) -> torch.device:
    """Rank `rank`'s device: with CUDA (or device None and CUDA present) cuda:rank, else `device`."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return torch.device("cuda", rank) if device.type == "cuda" else device


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def exit_with_parent(parent: int) -> None:
    """Exit this (spawned) rank when the process that started it is gone."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="dsv4-parent-watchdog").start()


def rank_bytes(cfg: Any, world: int) -> list[int]:
    """Checkpoint bytes each rank reads (the release layout of `cfg`, stored dtypes), rank order;
    raises ValueError when the split does not divide or cuts an FP8 block."""
    from dsv4.checkpoint import (  # checkpoint imports this module
        ST_DTYPES,
        checkpoint_layout,
    )

    headers = {s.name: (s.dtype, s.shape) for s in checkpoint_layout(cfg)}
    out = []
    for rank in range(world):
        tp = TensorParallel(rank, world)
        tp.check(cfg)
        local, _, problems = shard_headers(headers, tp, cfg.n_routed_experts)
        if problems:
            raise ValueError(f"cannot split over {world} ranks: {problems[0]}")
        out.append(sum(math.prod(shape) * ST_DTYPES[code].itemsize for code, shape in local.values()))
    return out
