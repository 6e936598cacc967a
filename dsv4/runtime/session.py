"""A Session: one token sequence whose KV cache stays resident between calls (agent turns).

State:
    tokens          every token id of the sequence (prompt, appended, generated)
    cache           the model's KV cache of the first `cache.length` of them; the others are
                    *pending*: fed with the next forward (the last generated token is never fed
                    until something follows it, so a turn costs no extra step)
    last_logits     [V] float32 logits after the last fed token (the end of the cached prefix): the
                    next-token logits when nothing is pending, and what a truncate back to the
                    cached length needs
    snapshots       roll-back points (cache.snapshot() + the logits there) for `truncate`

A fork shares its parent's cache object until one of them writes (copy-on-write at cache level);
`_CacheRef` counts the sharers.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import torch

from dsv4.runtime import session_io
from dsv4.runtime.errors import SessionStateError
from dsv4.runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from dsv4.runtime.engine import Engine


@dataclass(frozen=True)
class SessionMemory:
    """Where a session's state lives and what it costs."""

    tokens: int  # len(session)
    cached_tokens: int  # tokens whose KV is in the cache (the rest are pending)
    kv_bytes: int  # the cache (0 while spilled to disk)
    snapshot_bytes: int  # roll-back snapshots
    location: str  # "device", "host" or "disk"
    shared: bool  # the cache is shared with a fork (copy-on-write)


@dataclass(frozen=True)
class _Snapshot:
    """A roll-back point: the cache's fixed-size state at `length` and the logits after it."""

    length: int
    state: Any  # cache.snapshot()
    logits: torch.Tensor | None


class _CacheRef:
    """A cache shared by the sessions that point at it (fork without copying)."""

    def __init__(self, cache: Any):
        self.cache = cache
        self.sharers = 1


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


class Session:
    """Create with `engine.new_session()`, `session.fork()` or `engine.load_session(path)`."""

    def __init__(self, engine: Engine, cache: Any, tokens: Sequence[int] = ()):
        self.engine = engine
        self._ref: _CacheRef | None = _CacheRef(cache)
        self._tokens: list[int] = list(tokens)
        self._last_logits: torch.Tensor | None = None
        self._snapshots: list[_Snapshot] = []
        self._spilled_to: Path | None = None  # set while the cache lives only on disk
        self._disk_cached_length = 0
        self._on_host = False  # spilled to host memory (outside the engine's device budget)
        self._busy = False
        self._closed = False
        self.finish_reason: str | None = None  # why the last generate() stopped

    # ---- reading ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(self._tokens)

    @property
    def cached_length(self) -> int:
        if self._ref is None:
            return self._disk_cached_length
        return int(self._ref.cache.length)

    @property
    def pending(self) -> list[int]:
        return self._tokens[self.cached_length:]

    @property
    def location(self) -> str:
        if self._spilled_to is not None:
            return "disk"
        return "host" if self._on_host else "device"

    def kv_bytes(self) -> int:
        """Bytes of this session's KV cache where it lives now (0 while spilled to disk)."""
        return 0 if self._ref is None else int(self._ref.cache.nbytes())

    def snapshot_bytes(self) -> int:
        return sum(tree_bytes(s) for s in self._snapshots)

    def memory(self) -> SessionMemory:
        return SessionMemory(len(self), self.cached_length, self.kv_bytes(), self.snapshot_bytes(),
                             self.location, self._ref is not None and self._ref.sharers > 1)

    def __repr__(self) -> str:
        m = self.memory()
        return (f"Session(tokens={m.tokens}, cached={m.cached_tokens}, kv_bytes={m.kv_bytes}, "
                f"location={m.location!r})")

    # ---- feeding ----------------------------------------------------------------------------
    def append(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Feed `token_ids` (after any pending ones) and return the logits [V] (float32) of the
        last position. Prefill runs in chunks, so memory stays bounded at any length."""
        ids = self.engine.check_token_ids(token_ids)
        with self._exclusive():
            self._ensure_resident()
            self.engine.reserve(self, len(ids))
            self._tokens.extend(ids)
            self._flush()
            return self._last_logits.clone()

    async def aappend(self, token_ids: Sequence[int]) -> torch.Tensor:
        """`append` in a worker thread, so the event loop keeps running during a long prefill."""
        return await anyio.to_thread.run_sync(self.append, list(token_ids))

    def generate(self, max_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop: Sequence[str | int] | str | int = (),
                 logits_processors: Sequence = (), ignore_eos: bool = False) -> AsyncIterator[int]:
        """Async iterator of generated token ids (see `SamplingParams` for the arguments).
        Generated ids join the session as they are yielded; `finish_reason` tells why it ended.
        To stop early, close the iterator (`async with contextlib.aclosing(...)`)."""
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, stop=stop, ignore_eos=ignore_eos,
                                logits_processors=logits_processors)
        return self._generate(params)

    async def _generate(self, params: SamplingParams) -> AsyncIterator[int]:
        async for _, token in self.engine.generate_batch([self], params):
            yield token

    # ---- roll-back and forks ----------------------------------------------------------------
    def truncate(self, n: int) -> None:
        """Keep only the first n tokens. The cache rolls back to the latest snapshot at or before
        n (or to empty); tokens between it and n become pending and are recomputed with the next
        forward."""
        if not isinstance(n, int) or not 0 <= n <= len(self):
            raise ValueError(f"truncate: n must be an int in [0, {len(self)}], got {n!r}")
        with self._exclusive():
            if n == len(self):
                return
            self._ensure_resident()
            del self._tokens[n:]
            self.finish_reason = None
            if n >= self.cached_length:
                return  # only pending tokens were dropped; last_logits stay valid iff none remain
            self._last_logits = None
            usable = [snap for snap in self._snapshots if snap.length <= n]
            if usable:
                self._own_cache()
                self._ref.cache.restore(usable[-1].state)
                self._last_logits = usable[-1].logits
            else:  # nothing to roll back to: start over, everything becomes pending
                self._release_cache()
                self._ref = _CacheRef(self.engine.new_cache())
            self._snapshots = [snap for snap in self._snapshots if snap.length <= self.cached_length]

    def fork(self) -> Session:
        """A new session with the same tokens; the cache is shared until either side writes."""
        with self._exclusive():
            self._ensure_resident()
            child = type(self)(self.engine, None, self._tokens)    # tensor parallel: same kind
            child._ref = self._ref
            self._ref.sharers += 1
            child._last_logits = self._last_logits
            child._snapshots = list(self._snapshots)
            self.engine.register(child)
            return child

    # ---- persistence and spilling -----------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the session to the folder `path` (kv.safetensors + manifest.json)."""
        with self._exclusive():
            self._ensure_resident()
            tensors = dict(self._ref.cache.state_tensors())
            if self._last_logits is not None:  # kept with pending tokens too: truncate may drop them
                tensors[_LAST_LOGITS] = self._last_logits
            return session_io.write_session(
                path, fingerprint=self.engine.fingerprint, token_ids=self._tokens,
                cache_length=self.cached_length, tensors=tensors, kv_dtype=self.engine.kv_dtype)

    def spill(self, to: str | os.PathLike = "host") -> None:
        """Free this session's device memory: `to="host"` moves the cache to host memory, a path
        writes it to disk (as `save`) and drops it. It comes back on the next use, or `unspill()`."""
        with self._exclusive():
            if self._spilled_to is not None:
                raise SessionStateError(f"session is already spilled to {self._spilled_to}")
            if str(to) == "host":
                self._own_cache()
                self._move_to(torch.device("cpu"))
                self._on_host = True
                return
        self.save(to)
        with self._exclusive():
            self._disk_cached_length = self.cached_length
            self._release_cache()
            self._snapshots = []
            self._last_logits = None
            self._spilled_to = Path(to)

    def unspill(self) -> None:
        """Bring a spilled session's cache back to the engine's device (no-op if resident)."""
        with self._exclusive():
            self._ensure_resident()

    def close(self) -> None:
        """Drop the cache and snapshots; the session can no longer be used."""
        self._release_cache()
        self._snapshots, self._last_logits = [], None
        self._closed = True
        self.engine.unregister(self)

    # ---- internals --------------------------------------------------------------------------
    def _exclusive(self):
        return _Exclusive(self)

    def _release_cache(self) -> None:
        if self._ref is not None:
            self._ref.sharers -= 1
        self._ref = None

    def _ensure_resident(self) -> None:
        if self._spilled_to is not None:
            path = self._spilled_to
            tokens, cache, logits = self.engine.read_session_state(path)
            self._ref, self._tokens, self._last_logits = _CacheRef(cache), tokens, logits
            self._spilled_to = None
        elif self.location == "host":
            self.engine.reserve(self, 0, extra_bytes=self.kv_bytes() + self.snapshot_bytes())
            self._move_to(self.engine.device)
            self._on_host = False

    def _move_to(self, device: torch.device) -> None:
        self._ref.cache = self._ref.cache.to(device)
        self._snapshots = [tree_to(snap, device) for snap in self._snapshots]
        if self._last_logits is not None:
            self._last_logits = self._last_logits.to(device)

    def _own_cache(self) -> None:
        """Copy-on-write: before writing a shared cache, take a private copy."""
        if self._ref.sharers > 1:
            self._ref.sharers -= 1
            self._ref = _CacheRef(self._ref.cache.clone())

    def _flush(self) -> None:
        """Feed every pending token (chunked); afterwards last_logits is the newest position's."""
        if not self.pending:
            if self._last_logits is None:
                raise SessionStateError("the session is empty: append tokens before generating")
            return
        self._own_cache()
        self.finish_reason = None
        self.engine.prefill(self)

    def _feed_chunk(self, chunk: list[int]) -> None:
        """One forward of `chunk` through the cache (called by the engine); keeps snapshots."""
        self._last_logits = self.engine.forward([chunk], [self._ref.cache])[0]
        self._maybe_snapshot()

    def _maybe_snapshot(self, force: bool = False) -> None:
        length = self.cached_length
        if self._snapshots and self._snapshots[-1].length == length:
            return
        if force or length % self.engine.snapshot_every == 0:
            self._snapshots.append(_Snapshot(length, self._ref.cache.snapshot(), self._last_logits))
            del self._snapshots[:-self.engine.max_snapshots]


_LAST_LOGITS = "session.last_logits"


class _Exclusive:
    """Guards a session against concurrent use and use after close."""

    def __init__(self, session: Session):
        self.s = session

    def __enter__(self):
        if self.s._closed:
            raise SessionStateError("session is closed")
        if self.s._busy:
            raise SessionStateError("session is busy (another call on it is still running)")
        self.s._busy = True

    def __exit__(self, *exc):
        self.s._busy = False
