"""A Session: a handle onto one of the engine's sequences, whose KV cache stays resident between
calls (agent turns). The engine owns the state (dsv4/runtime/sequence.py); every operation runs on
the engine's scheduler, so sessions used from several tasks or threads decode together.

Create one with `engine.new_session()`, `session.fork()` or `engine.load_session(path)`. A session
that is garbage-collected is closed.
"""
from __future__ import annotations

import os
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

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


class Session:
    """`sid` names the sequence in the engine's scheduler records (`engine.scheduler.records`)."""

    def __init__(self, engine: Engine, sid: int):
        self.engine, self.sid = engine, sid
        self._close = weakref.finalize(self, engine.scheduler.forget, sid)
        self._close.atexit = False  # at exit the process frees everything; no engine work then

    # ---- reading ----------------------------------------------------------------------------
    @property
    def _seq(self):
        return self.engine.sequence(self.sid)

    def __len__(self) -> int:
        return len(self._seq.tokens)

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(self._seq.tokens)

    @property
    def cached_length(self) -> int:
        return self._seq.cached_length

    @property
    def pending(self) -> list[int]:
        return list(self._seq.pending)

    @property
    def location(self) -> str:
        return self._seq.location

    @property
    def finish_reason(self) -> str | None:
        """Why the last generate() stopped: "stop" or "length" (None while none has ended)."""
        return self._seq.finish_reason

    @property
    def busy(self) -> bool:
        """An operation (a prefill, a decode, a call) is queued or running on this session."""
        return self._seq.owner is not None

    def reusable(self, n: int) -> int:
        """How many of the first n tokens keep their KV through `truncate(n)` (the others would be
        recomputed): all cached ones if n reaches past them, else the newest roll-back point at or
        before n."""
        seq = self._seq
        if n >= seq.cached_length:
            return seq.cached_length
        return max((snap.length for snap in seq.snapshots if snap.length <= n), default=0)

    def kv_bytes(self) -> int:
        """Bytes of this session's KV cache where it lives now (0 while spilled to disk)."""
        return self._seq.kv_bytes()

    def snapshot_bytes(self) -> int:
        return self._seq.snapshot_bytes()

    def memory(self) -> SessionMemory:
        seq = self._seq
        return SessionMemory(len(seq.tokens), seq.cached_length, seq.kv_bytes(), seq.snapshot_bytes(),
                             seq.location, seq.shared)

    def __repr__(self) -> str:
        try:
            m = self.memory()
        except SessionStateError:
            return f"Session(sid={self.sid}, closed)"
        return (f"Session(sid={self.sid}, tokens={m.tokens}, cached={m.cached_tokens}, "
                f"kv_bytes={m.kv_bytes}, location={m.location!r})")

    # ---- feeding ----------------------------------------------------------------------------
    def append(self, token_ids: Sequence[int], deadline: float | None = None) -> torch.Tensor:
        """Feed `token_ids` (after any pending ones) and return the logits [V] (float32) of the
        last position. Prefill runs in chunks, between the scheduler's decode steps, so memory stays
        bounded at any length and other sessions keep decoding. `deadline`: a `time.monotonic()`
        time after which the request ends with `DeadlineExceeded`."""
        return self.engine.scheduler.prefill(self.sid, token_ids, deadline).wait()

    async def aappend(self, token_ids: Sequence[int], deadline: float | None = None) -> torch.Tensor:
        """`append` awaited: the event loop keeps running during a long prefill. Cancelled before
        its prefill started, nothing is appended; after, the tokens stay (the rest is fed later)."""
        return await self.engine.scheduler.prefill(self.sid, token_ids, deadline).await_result()

    def generate(self, max_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop: Sequence[str | int] | str | int = (),
                 logits_processors: Sequence = (), ignore_eos: bool = False,
                 deadline: float | None = None) -> AsyncIterator[int]:
        """Async iterator of generated token ids (see `SamplingParams` for the arguments).
        Generated ids join the session as they are yielded; `finish_reason` tells why it ended.
        To stop early, close the iterator (`async with contextlib.aclosing(...)`): the session keeps
        the tokens yielded. `deadline`: as for `append` (the tokens drawn before it are kept)."""
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, stop=stop, ignore_eos=ignore_eos,
                                logits_processors=logits_processors)
        return self._generate(params, deadline)

    async def _generate(self, params: SamplingParams, deadline: float | None) -> AsyncIterator[int]:
        async with aclosing(self.engine.scheduler.decode([self.sid], [params], deadline)) as items:
            async for _, token in items:  # closed with this iterator: the request ends at once
                yield token

    # ---- roll-back and forks ----------------------------------------------------------------
    def truncate(self, n: int) -> None:
        """Keep only the first n tokens. The cache rolls back to the latest snapshot at or before
        n (or to empty); tokens between it and n become pending and are recomputed with the next
        forward. Snapshots are taken every `snapshot_every` tokens, at every generate start and
        after the last message boundary of every append (`RuntimeOptions.restore_after`)."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(self):
            raise ValueError(f"truncate: n must be an int in [0, {len(self)}], got {n!r}")
        self.engine.scheduler.call(self._truncate, n, claim=[self.sid])

    def _truncate(self, n: int) -> None:
        seq = self._seq
        if n < len(seq.tokens):
            self.engine.scheduler.ensure_resident(seq)
            self.engine.truncate(seq, n)

    def fork(self) -> Session:
        """A new session with the same tokens; the cache is shared until either side writes."""
        return Session(self.engine, self.engine.scheduler.call(self._fork, claim=[self.sid]))

    def _fork(self) -> int:
        seq = self._seq
        self.engine.scheduler.ensure_resident(seq)
        return self.engine.fork(seq).sid

    # ---- persistence and spilling -----------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the session to the folder `path` (kv.safetensors + manifest.json)."""
        return self.engine.scheduler.call(self._save, Path(path), claim=[self.sid])

    def _save(self, path: Path) -> Path:
        seq = self._seq
        self.engine.scheduler.ensure_resident(seq)
        return self.engine.save(seq, path)

    def spill(self, to: str | os.PathLike = "host") -> None:
        """Free this session's device memory: `to="host"` moves the cache to host memory, a path
        writes it to disk (as `save`) and drops it. It comes back on the next use, or `unspill()`.
        The scheduler also spills idle sessions to host by itself when the KV budget is full."""
        self.engine.scheduler.call(self._spill, to, claim=[self.sid])

    def _spill(self, to: str | os.PathLike) -> None:
        self.engine.spill(self._seq, to)

    def unspill(self) -> None:
        """Bring a spilled session's cache back to the engine's device (no-op if resident)."""
        self.engine.scheduler.call(self._unspill, claim=[self.sid])

    def _unspill(self) -> None:
        self.engine.scheduler.ensure_resident(self._seq)

    def close(self) -> None:
        """Drop the cache and snapshots (at the scheduler's next step; any request running on the
        session ends there); the session can no longer be used."""
        self._close()
