"""The tensor-parallel part of an engine (SPMD): `dsv4.Engine(path, tp=N)` holds a
`TensorParallelGroup`.

This process is rank 0: it loads its part of the model (dsv4/network/tensor_parallel.py,
dsv4/loading/sharding.py) and serves the usual `Engine` / `Session` API, so callers (the agent) see no
difference. The group spawns ranks 1..N-1 (followers); each loads its own part and runs an ordinary
engine that applies rank 0's state operations (`Engine.apply`: create, reserve, forward, snapshot,
rollback, fork, move, release, load, drop) in the order rank 0 applied them. Every rank holds a full
copy of every sequence's KV cache (DSV4's K=V head is replicated), so the same operations keep all
ranks identical, and the collectives inside their forwards line up.

    rank 0 (Engine + group)                        ranks 1..N-1 (replay)
    scheduler step -> engine._replicate("forward", sids, rows)
                   -> broadcast ("forward", (sids, rows))  -> engine.apply("forward", (sids, rows))
                   -> its own forward (collectives in step with the followers')

Rules:
- Everything that needs the token ids (chunking, snapshots, roll-back targets, budgets, sampling)
  is decided on rank 0, which sends only the resulting operations; followers never refuse one.
- Operations are sent from the scheduler's thread only, so they never interleave.
- Followers write no files: rank 0 writes saved / spilled sessions, followers re-read them from
  the same path (one host; several hosts would need a shared filesystem).
Limits: a rank that fails on its own (out of memory, a crash) is not recovered; rank 0 then
fails at the next collective after the process group's timeout. A session saved under tp=N
carries rank 0's fingerprint and loads only into a tp=N engine of the same checkpoint.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from dsv4.network.tensor_parallel import TensorParallel
from dsv4.runtime import launch
from dsv4.runtime.errors import EngineError

log = logging.getLogger(__name__)


class TensorParallelGroup:
    """Rank 0's side: the spawned followers and the command channel to them (a gloo group)."""

    def __init__(self, world: int, device: torch.device, rank0: TensorParallel, control: Any, procs: list):
        self.world, self.device, self.rank0 = world, device, rank0
        self.control, self.procs = control, procs
        self.closed = False

    @classmethod
    def start(cls, world: int, device: str | torch.device | None, backend: str | None, timeout_s: float,
              follower: Callable, follower_args: tuple) -> TensorParallelGroup:
        """Spawn ranks 1..world-1 running follower(rank, world, init_method, backend, timeout_s,
        *follower_args, parent pid, torch threads) and join the group as rank 0."""
        if dist.is_initialized():
            raise RuntimeError("Engine(tp=N) starts its own process group, but one is initialised already")
        here = launch.device_for(0, device)
        if here.type == "cuda" and torch.cuda.device_count() < world:
            raise ValueError(f"Engine(tp={world}) on CUDA needs {world} GPUs (one a rank), "
                             f"found {torch.cuda.device_count()}")
        backend = backend or launch.default_backend(here)
        init_method = f"tcp://127.0.0.1:{launch.free_port()}"
        ctx = torch.multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=follower, daemon=True, name=f"dsv4-tp-rank{r}",
                             args=(r, world, init_method, backend, timeout_s, *follower_args,
                                   os.getpid(), torch.get_num_threads()))
                 for r in range(1, world)]
        for p in procs:
            p.start()
        try:
            rank0 = launch.init(0, world, init_method, backend, timeout_s)
            control = launch.control_group()
        except BaseException:
            _abort(procs)
            raise
        return cls(world, here, rank0, control, procs)

    def load(self, load_part: Callable[[TensorParallel], Any]) -> Any:
        """Rank 0's part of the model, `load_part(rank0)`; raises on every rank if any rank failed."""
        error = None
        try:
            model = load_part(self.rank0)
        except Exception as e:  # noqa: BLE001 - every rank hears of it, then it is raised
            error = e
        agree(self.control, None if error is None else f"{type(error).__name__}: {error}", self.world)
        if error is not None:
            raise error
        return model

    def send(self, op: str, args: tuple) -> None:
        if self.closed:
            raise EngineError("this tensor-parallel engine was shut down")
        dist.broadcast_object_list([(op, args)], src=0, group=self.control)

    def abort(self) -> None:
        """Start-up failed: leave the group, stop the followers."""
        self.closed = True
        _abort(self.procs)

    def shutdown(self) -> None:
        """Stop the followers, join them (terminating any that hang) and leave the group."""
        if self.closed:
            return
        try:
            self.send("shutdown", ())
        except Exception as e:  # noqa: BLE001 - a follower already gone: terminated below
            log.warning("tensor parallel shutdown: %s", e)
        self.closed = True
        _stop(self.procs)
        if dist.is_initialized():
            dist.destroy_process_group()


def _abort(procs: list) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    for p in procs:
        p.terminate()
    _stop(procs, 5)


def _stop(procs: list, timeout_s: float = 30.0) -> None:
    for p in procs:
        p.join(timeout=timeout_s)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)


def agree(group: Any, error: str | None, world: int) -> None:
    """Every rank reports whether it is ready; raise on all of them if any is not."""
    reports: list[Any] = [None] * world
    dist.all_gather_object(reports, error, group=group)
    failed = [f"rank {r}: {e}" for r, e in enumerate(reports) if e is not None]
    if failed and error is None:
        raise RuntimeError("tensor-parallel start-up failed on other ranks:\n  " + "\n  ".join(failed))


def replay(engine: Any, group: Any) -> None:
    """(a follower rank) Apply rank 0's operations to this rank's engine until shutdown."""
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        op, args = box[0]
        if op == "shutdown":
            return
        engine.apply(op, args)
