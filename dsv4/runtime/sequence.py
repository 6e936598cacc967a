"""The state of one token sequence, owned by the engine (a `Session` is a handle onto one).

    tokens          every token id of the sequence (prompt, appended, generated)
    cache           the model's KV cache of the first `cache.length` of them; the others are
                    *pending*: fed with the next forward (the last generated token is never fed
                    until something follows it, so a turn costs no extra step)
    last_logits     [V] float32 logits after the last fed token (the end of the cached prefix): the
                    next-token logits when nothing is pending, and what a truncate back to the
                    cached length needs
    snapshots       roll-back points (cache.snapshot() + the logits there) for `truncate`

A fork shares its parent's cache object until one of them writes (copy-on-write at cache level);
`CacheRef` counts the sharers. On the ranks of a tensor-parallel group that follow rank 0, only the
cache side (cache, snapshots, location) is kept: rank 0 decides everything that needs the tokens.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Snapshot:
    """A roll-back point: the cache's fixed-size state at `length` and the logits after it."""

    length: int
    state: Any  # cache.snapshot()
    logits: torch.Tensor | None
    nbytes: int  # of state and logits


class CacheRef:
    """A cache shared by the sequences that point at it (fork without copying)."""

    def __init__(self, cache: Any):
        self.cache = cache
        self.sharers = 1


@dataclass(eq=False)
class Sequence:
    sid: int
    ref: CacheRef | None
    tokens: list[int] = field(default_factory=list)
    last_logits: torch.Tensor | None = None
    snapshots: list[Snapshot] = field(default_factory=list)
    location: str = "device"  # "device", "host" (spilled to host memory) or "disk"
    spilled_to: Path | None = None  # the folder while location == "disk"
    disk_cached_length: int = 0
    owner: Any = None  # the scheduler request using it (None = idle); see Scheduler
    closed: bool = False
    finish_reason: str | None = None  # why the last decode stopped: "stop" | "length"
    last_used: int = 0  # scheduler step of the last use: idle sequences spill least recent first

    @property
    def cache(self) -> Any:
        return self.ref.cache

    @property
    def cached_length(self) -> int:
        return self.disk_cached_length if self.ref is None else int(self.ref.cache.length)

    @property
    def pending(self) -> list[int]:
        return self.tokens[self.cached_length:]

    @property
    def shared(self) -> bool:
        return self.ref is not None and self.ref.sharers > 1

    def kv_bytes(self) -> int:
        """Bytes of the KV cache where it lives now (0 while spilled to disk)."""
        return 0 if self.ref is None else int(self.ref.cache.nbytes())

    def snapshot_bytes(self) -> int:
        return sum(s.nbytes for s in self.snapshots)

    def own_cache(self) -> None:
        """Copy-on-write: before writing a shared cache, take a private copy."""
        if self.ref.sharers > 1:
            self.ref.sharers -= 1
            self.ref = CacheRef(self.ref.cache.clone())

    def release_cache(self) -> None:
        if self.ref is not None:
            self.ref.sharers -= 1
        self.ref = None

    def move_to(self, device: torch.device | str) -> None:
        self.ref.cache = self.ref.cache.to(device)
        self.snapshots = [Snapshot(s.length, tree_to(s.state, device), tree_to(s.logits, device), s.nbytes)
                          for s in self.snapshots]
        if self.last_logits is not None:
            self.last_logits = self.last_logits.to(device)


def tree_bytes(obj: Any) -> int:
    """Bytes of every tensor in a snapshot-like object (tensor, containers, or .nbytes())."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tree_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tree_bytes(v) for v in obj)
    if dataclasses.is_dataclass(obj):
        return sum(tree_bytes(v) for v in vars(obj).values())
    return 0


def tree_to(obj: Any, device: torch.device | str) -> Any:
    """Move every tensor of a snapshot-like object to `device` (new object; input untouched)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: tree_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree_to(v, device) for v in obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: tree_to(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj
