"""Starting the processes of a tensor-parallel group over torch.distributed (NCCL with one GPU a
rank, gloo on CPU): joining the group, a CPU-side control group for commands, and `launch`, which
runs a function on W spawned ranks and never hangs.

    tp = launch.init(rank, world, "tcp://127.0.0.1:29500", backend="gloo")
    model = dsv4.load_model(path, tp=tp)      # only this rank's slices are read
    results = launch.launch(fn, world_size=2, args=(...))   # fn(tp, *args) on W spawned ranks
"""
from __future__ import annotations

import os
import queue
import socket
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dsv4.network.tensor_parallel import TensorParallel


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
