"""The embedded DSV4 inference engine: one model, many resident sequences, one scheduler.

    engine = dsv4.Engine(model_or_checkpoint_path, kv_budget_bytes=40 << 30)
    s = engine.new_session()
    s.append(prompt_ids)                      # chunked prefill, returns last-position logits
    async for tok in s.generate(max_tokens=512, temperature=1.0, stop=["</answer>"]): ...
    s.append(tool_result_ids)                 # the next turn prefills only the new tokens

The engine owns the model, the device, the limits (context length, KV byte budget), the runtime
options and the state of every sequence (`Sequence`); a `Session` is a handle onto one. All work on
that state runs on the scheduler's thread (dsv4/runtime/scheduler.py), which decodes every running
sequence together each step and prefills new prompts in chunks between those steps, so sessions
used from several tasks or threads batch together.

Every change to a sequence's cache goes through `apply(op, args)`, a small set of operations
(create, reserve, forward, snapshot, rollback, fork, move, release, load, drop) that are
deterministic given their arguments. With tensor parallelism (`Engine(path, tp=N)`) the engine
holds a `spmd.TensorParallelGroup`: each operation is sent to the other ranks, which apply it to
their own engine, so every rank's caches stay identical and the collectives inside their forwards
line up. Everything that needs the token ids (chunking, snapshots, budgets, sampling) is decided
here, on rank 0.
"""
from __future__ import annotations

import itertools
import os
import weakref
from collections.abc import AsyncIterator, Iterable
from collections.abc import Sequence as Seq
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from dsv4.formats.kv_fp8 import Fp8KVLayout
from dsv4.loading.checkpoint import load_model
from dsv4.network.cache import ModelCache
from dsv4.runtime import launch, session_io, spmd
from dsv4.runtime.errors import (
    ContextLengthExceeded,
    SessionFormatError,
    SessionMismatch,
    SessionStateError,
)
from dsv4.runtime.options import RuntimeOptions
from dsv4.runtime.sampling import SamplingParams
from dsv4.runtime.scheduler import Scheduler
from dsv4.runtime.sequence import CacheRef, Sequence, Snapshot, tree_bytes
from dsv4.runtime.session import Session

ALIGN = 128  # compression boundary shared by every layer type (lcm of the ratios 4 and 128)
_LAST_LOGITS = "session.last_logits"  # the tensor holding a saved session's last logits
_CPU_BUDGET_SHARE = 2  # on CPU the default KV budget is 1/2 of the host memory available at start
_GPU_RESERVE = 2 << 30  # on CUDA it is the free memory less max(2 GiB, 10 %) for activations

# the replicated operations (see the module doc): name -> the engine method that applies it
_OPS = ("start", "create", "reserve", "forward", "snapshot", "rollback", "fork", "move", "release", "load",
        "drop")


@dataclass(frozen=True)
class EngineMemory:
    resident_bytes: int  # KV + snapshots of the sessions on the engine's device
    host_bytes: int  # sessions spilled to host memory
    budget_bytes: int | None
    sessions: int
    resident_sessions: int
    tokens: int  # tokens over all sessions
    kv_bytes_per_token: float  # asymptotic growth of one session's cache per token


class Engine:
    """Run a DSV4 model over resident sessions.

    model_or_path   a `dsv4.Transformer` (or anything with the cache contract) or a checkpoint
                    path, loaded with `load_model(path, device=device or "cuda", dtype=dtype)`
    tokenizer       anything with `.decode(ids) -> str` (for stop strings); default: the DSV4
                    tokenizer when the vocabulary is DSV4's
    kv_budget_bytes cap on resident KV + snapshots over all sessions; "auto" (default) = what the
                    GPU has free once the weights are loaded, less max(2 GiB, 10 %) for
                    activations; on CPU half the host memory available at start-up; None = no cap
    max_context     cap on a session's length (default and upper bound: the model's max_seq_len)
    options         `RuntimeOptions` (prefill chunk, per-step token budget, snapshots, restore
                    points, admission queue, forward options); `prefill_chunk`, `snapshot_every`
                    and `max_snapshots` given as keywords override its fields
    kv_fp8          quantised KV storage: compressed main entries in the 584-byte FP8 layout,
                    indexer keys in MXFP4 (68 bytes); lossless when the model's quantisation
                    simulation is on (as it is for FP8 checkpoints on GPU)
    tp              tensor-parallel ranks: with N > 1 this process is rank 0 and serves the API,
                    N - 1 spawned ranks follow it (a checkpoint path is needed: every rank loads its
                    own part). `backend` ("nccl" on CUDA, "gloo" on CPU by default) and `timeout_s`
                    (bound on each collective) configure the group; cuda:r on rank r when `device`
                    is a CUDA device (or None with CUDA present), else `device` on every rank.
                    `shutdown()` (also on garbage collection, at exit, or leaving a `with` block)
                    stops the other ranks. A script using it must guard its entry point.
    """

    def __init__(self, model_or_path: Any, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, tokenizer: Any = None,
                 kv_budget_bytes: int | Literal["auto"] | None = "auto", max_context: int | None = None,
                 options: RuntimeOptions | None = None, prefill_chunk: int | None = None,
                 snapshot_every: int | None = None, max_snapshots: int | None = None,
                 kv_fp8: bool = False, eos_token_ids: Iterable[int] | None = None, tp: int = 1,
                 backend: str | None = None, timeout_s: float = 1800.0):
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tp must be an int >= 1, got {tp!r}")
        given = {k: v for k, v in (("prefill_chunk", prefill_chunk), ("snapshot_every", snapshot_every),
                                   ("max_snapshots", max_snapshots)) if v is not None}
        self.options = RuntimeOptions.model_validate({**(options or RuntimeOptions()).model_dump(), **given})
        self.tp, self.group = tp, None
        is_path = isinstance(model_or_path, (str, os.PathLike))
        load = {"dtype": dtype} if dtype is not None else {}
        if tp > 1:
            if not is_path:
                raise TypeError("Engine(..., tp=N) needs a checkpoint path: every rank loads its own part")
            self.group = spmd.TensorParallelGroup.start(
                tp, device, backend, timeout_s, follower=_follow_rank,
                follower_args=(Path(model_or_path), device, load, {"options": self.options, "kv_fp8": kv_fp8}))
            try:
                model = self.group.load(lambda rank_tp: load_model(model_or_path, device=self.group.device,
                                                                   tp=rank_tp, **load))
            except BaseException:
                self.group.abort()
                raise
            tokenizer = tokenizer if tokenizer is not None else _tokenizer_beside(model_or_path)
        elif is_path:
            model = load_model(model_or_path, device=device or "cuda", **load)
            tokenizer = tokenizer if tokenizer is not None else _tokenizer_beside(model_or_path)
        else:
            model = model_or_path
        try:
            self._setup(model, tokenizer, kv_budget_bytes, max_context, kv_fp8, eos_token_ids)
        except BaseException:
            if self.group is not None:
                self.group.shutdown()
            raise
        if self.group is not None:
            # also on garbage collection and at exit; holds no reference to the engine
            self._stop_group = weakref.finalize(self, _stop_group, weakref.ref(self.scheduler), self.group)
            self.group.send("start", (self.fingerprint,))   # sessions carry rank 0's fingerprint

    def _setup(self, model: Any, tokenizer: Any, kv_budget_bytes: Any, max_context: int | None,
               kv_fp8: bool, eos_token_ids: Iterable[int] | None) -> None:
        self.model = model.eval()
        self.cfg = model.cfg
        self.device = _model_device(model)  # `device` only says where a checkpoint is loaded
        self.kv_fp8 = kv_fp8
        model_max = int(self.cfg.max_seq_len)
        if max_context is not None and not 1 <= max_context <= model_max:
            raise ValueError(f"max_context must be in [1, {model_max}] (the model's max_seq_len), "
                             f"got {max_context}")
        self.max_context = max_context or model_max
        self._tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids) if eos_token_ids is not None else \
            (int(getattr(tokenizer, "eos_id", 1)),)
        self._seqs: dict[int, Sequence] = {}
        self._sids = itertools.count()
        self._fingerprint: str | None = None
        empty = self.new_cache()
        cache_dtype, self.empty_cache_bytes = empty.dtype, empty.nbytes()
        self.kv_dtype = "fp8" if kv_fp8 else str(cache_dtype).removeprefix("torch.")  # in saved sessions
        self.kv_bytes_per_token = kv_bytes_per_token(self.cfg, cache_dtype.itemsize, fp8=kv_fp8)
        self.kv_budget_bytes = default_kv_budget(self.device) if kv_budget_bytes == "auto" else kv_budget_bytes
        if self.kv_budget_bytes is not None and (isinstance(self.kv_budget_bytes, bool) or
                                                 not isinstance(self.kv_budget_bytes, int) or self.kv_budget_bytes < 0):
            raise ValueError(f"kv_budget_bytes must be an int >= 0, 'auto' or None, got {kv_budget_bytes!r}")
        self.scheduler = Scheduler(self)

    # ---- public API -------------------------------------------------------------------------
    def new_session(self, token_ids: Seq[int] = ()) -> Session:
        """An empty session (or one with `token_ids` fed at once)."""
        ids = self.check_token_ids(token_ids) if len(token_ids) else []
        if len(ids) > self.max_context:
            raise ContextLengthExceeded(0, len(ids), self.max_context)
        session = Session(self, self.scheduler.open().sid)
        if ids:
            session.append(ids)
        return session

    def load_session(self, path: str | os.PathLike) -> Session:
        """A session saved with `session.save(path)`; it must come from this very model."""
        return Session(self, self.scheduler.call(self.load, Path(path)).sid)

    async def generate_batch(self, sessions: Seq[Session],
                             params: SamplingParams | Seq[SamplingParams] | None = None,
                             **sampling: Any) -> AsyncIterator[tuple[int, int]]:
        """Decode several sessions together (they join every step the scheduler runs); yields
        (index into `sessions`, token id) as tokens are drawn. `params` is one SamplingParams for
        all, one per session, or given as keyword arguments (max_tokens=, temperature=, ...).
        The sessions are busy until the iterator ends: to stop early, close it
        (`async with contextlib.aclosing(it)`); each session then keeps the tokens yielded."""
        if params is None:
            params = SamplingParams(**sampling)
        elif sampling:
            raise TypeError("give sampling settings either as params or as keywords, not both")
        plist = [params] * len(sessions) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(sessions):
            raise ValueError(f"{len(plist)} SamplingParams for {len(sessions)} sessions")
        if len({id(s) for s in sessions}) != len(sessions):
            raise ValueError("generate_batch: the same session appears twice")
        if any(s.engine is not self for s in sessions):
            raise ValueError("generate_batch: a session belongs to another engine")
        async with aclosing(self.scheduler.decode([s.sid for s in sessions], plist)) as items:
            async for item in items:  # closed with this iterator: the request ends at once
                yield item

    def memory(self) -> EngineMemory:
        """Bytes by place; a cache or snapshot shared by forks counts once."""
        resident = host = tokens = n_resident = 0
        seen: set[int] = set()
        seqs = [s for s in list(self._seqs.values()) if not s.closed]
        for s in seqs:
            tokens += len(s.tokens)
            size = self._unshared_bytes(s, seen)
            if s.location == "device":
                resident += size
                n_resident += 1
            elif s.location == "host":
                host += size
        return EngineMemory(resident, host, self.kv_budget_bytes, len(seqs), n_resident, tokens,
                            self.kv_bytes_per_token)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = session_io.model_fingerprint(self.model, self.cfg)
        return self._fingerprint

    @property
    def tokenizer(self):
        if self._tokenizer is None and self.cfg.vocab_size == 129280:
            try:
                from encoding import Tokenizer

                self._tokenizer = Tokenizer.default()
            except ImportError:
                pass
        return self._tokenizer

    def find(self, sid: int) -> Sequence | None:
        return self._seqs.get(sid)

    def sequence(self, sid: int) -> Sequence:
        """The state behind a session handle (read it; only the scheduler's thread changes it)."""
        seq = self._seqs.get(sid)
        if seq is None or seq.closed:
            raise SessionStateError("session is closed")
        return seq

    def shutdown(self) -> None:
        """Stop the other ranks of a tensor-parallel engine (after the work queued before)."""
        if self.group is not None:
            self.scheduler.call(self._stop_group)

    def __enter__(self) -> Engine:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- checks (any thread) ------------------------------------------------------------------
    def check_token_ids(self, token_ids: Seq[int]) -> list[int]:
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.flatten().tolist()
        ids = list(token_ids)
        if not ids:
            raise ValueError("append: token_ids is empty")
        vocab = self.cfg.vocab_size
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab:
                raise ValueError(f"token id {i!r} is not an int in [0, {vocab})")
        return ids

    @property
    def restore_after(self) -> frozenset[int]:
        """Token ids after which a prefill keeps a roll-back point (`RuntimeOptions.restore_after`)."""
        if self.options.restore_after is not None:
            return frozenset(self.options.restore_after)
        tok = self.tokenizer
        return frozenset(getattr(tok, name) for name in ("user_id", "assistant_id") if hasattr(tok, name))

    # ---- the replicated operations (see the module doc) ------------------------------------
    def apply(self, op: str, args: tuple) -> None:
        """Apply one state operation: on rank 0 through `_replicate`, on the other ranks of a
        tensor-parallel group from spmd.replay, in the same order."""
        if op not in _OPS:
            raise ValueError(f"unknown engine operation {op!r}")
        getattr(self, f"_op_{op}")(*args)

    def _replicate(self, op: str, *args: Any) -> None:
        if self.group is not None:
            self.group.send(op, args)
        self.apply(op, args)

    def _op_start(self, fingerprint: str) -> None:
        """(the other ranks) The fingerprint sessions carry: rank 0's, which writes the files."""
        self._fingerprint = fingerprint

    def _op_create(self, sid: int) -> None:
        self._seqs[sid] = Sequence(sid, CacheRef(self.new_cache()))

    def _op_reserve(self, sid: int, length: int) -> None:
        seq = self._seqs[sid]
        seq.own_cache()
        seq.cache.reserve(length)

    def _op_forward(self, sids: list[int], rows: list[list[int]]) -> None:
        seqs = [self._seqs[sid] for sid in sids]
        for seq in seqs:
            seq.own_cache()
        logits = self._forward(rows, [seq.cache for seq in seqs])
        for seq, row in zip(seqs, logits):
            seq.last_logits = row

    def _op_snapshot(self, sid: int) -> None:
        seq = self._seqs[sid]
        state = seq.cache.snapshot()
        seq.snapshots.append(Snapshot(seq.cached_length, state, seq.last_logits,
                                      tree_bytes(state) + tree_bytes(seq.last_logits)))
        del seq.snapshots[:len(seq.snapshots) - self.options.max_snapshots]

    def _op_rollback(self, sid: int, n: int) -> None:
        """The cache back to the newest snapshot at or before n, or to empty."""
        seq = self._seqs[sid]
        usable = [snap for snap in seq.snapshots if snap.length <= n]
        if usable:
            seq.own_cache()
            seq.cache.restore(usable[-1].state)
            seq.last_logits = usable[-1].logits
        else:
            seq.release_cache()
            seq.ref, seq.last_logits = CacheRef(self.new_cache()), None
        seq.snapshots = [snap for snap in seq.snapshots if snap.length <= seq.cached_length]

    def _op_fork(self, sid: int, child: int) -> None:
        parent = self._seqs[sid]
        parent.ref.sharers += 1
        self._seqs[child] = Sequence(child, parent.ref, list(parent.tokens), parent.last_logits,
                                     list(parent.snapshots))

    def _op_move(self, sid: int, where: str) -> None:
        seq = self._seqs[sid]
        if where == "host":
            seq.own_cache()
            seq.move_to("cpu")
        else:
            seq.move_to(self.device)
        seq.location = where

    def _op_release(self, sid: int, path: str) -> None:
        """The cache was written to `path` (spill to disk): drop it here."""
        seq = self._seqs[sid]
        seq.disk_cached_length = seq.cached_length
        seq.release_cache()
        seq.snapshots, seq.last_logits = [], None
        seq.location, seq.spilled_to = "disk", Path(path)

    def _op_load(self, sid: int, path: str) -> None:
        self._install(sid, self.read_session_state(Path(path), check_budget=False))

    def _op_drop(self, sid: int) -> None:
        seq = self._seqs.pop(sid, None)
        if seq is not None:
            seq.release_cache()
            seq.snapshots, seq.last_logits, seq.closed = [], None, True

    def _install(self, sid: int, state: tuple[list[int], ModelCache, torch.Tensor | None]) -> None:
        tokens, cache, logits = state
        seq = self._seqs.get(sid)
        if seq is None:
            seq = self._seqs[sid] = Sequence(sid, None)
        seq.ref, seq.tokens, seq.last_logits = CacheRef(cache), tokens, logits
        seq.snapshots, seq.location, seq.spilled_to = [], "device", None

    # ---- sequence work (the scheduler's thread) -----------------------------------------------
    def create(self) -> Sequence:
        """A new, empty sequence (the scheduler admitted its cache's bytes)."""
        sid = next(self._sids)
        self._replicate("create", sid)
        return self._seqs[sid]

    def load(self, path: Path) -> Sequence:
        state = self.read_session_state(path, check_budget=True)
        sid = next(self._sids)
        if self.group is not None:
            self.group.send("load", (sid, str(path)))
        self._install(sid, state)
        return self._seqs[sid]

    def read_session_state(self, path: Path, check_budget: bool) -> tuple[list[int], ModelCache, torch.Tensor | None]:
        """(token ids, cache on the engine's device, last logits or None) of a saved session."""
        manifest, tensors = session_io.read_session(path, fingerprint=self.fingerprint, device="cpu")
        if manifest.get("kv_dtype") != self.kv_dtype:
            raise SessionMismatch(f"session {path} stores {manifest['kv_dtype']} KV; this engine "
                                  f"uses {self.kv_dtype} (Engine(kv_fp8=...))")
        logits = tensors.pop(_LAST_LOGITS, None)
        if check_budget:
            self.scheduler.make_room(sum(t.numel() * t.element_size() for t in tensors.values()))
        cache = ModelCache.from_state_tensors(self.cfg, tensors).to(self.device)
        if int(cache.length) != manifest["cache_length"]:
            raise SessionFormatError(f"{path}: cache holds {cache.length} tokens, manifest says "
                                     f"{manifest['cache_length']}")
        return list(manifest["token_ids"]), cache, None if logits is None else logits.to(self.device)

    def bring_back_bytes(self, seq: Sequence) -> int:
        """Device bytes that making `seq` resident takes."""
        if seq.location == "host":
            return seq.kv_bytes() + seq.snapshot_bytes()
        if seq.location == "disk":
            return (seq.spilled_to / session_io.TENSORS).stat().st_size
        return 0

    def make_resident(self, seq: Sequence) -> None:
        """Bring a spilled sequence back to the device (the caller made room)."""
        if seq.location == "host":
            self._replicate("move", seq.sid, "device")
        elif seq.location == "disk":
            path = seq.spilled_to
            state = self.read_session_state(path, check_budget=False)
            if self.group is not None:
                self.group.send("load", (seq.sid, str(path)))
            self._install(seq.sid, state)

    def prefill_bytes(self, seq: Sequence, end: int, points: int) -> int:
        """Device bytes feeding `seq` up to `end` tokens allocates, taking `points` roll-back
        snapshots on the way (its cache made private first if a fork shares it)."""
        cache = seq.cache
        if seq.shared:                          # copy-on-write: a private copy first
            growth = cache.clone_nbytes() + cache.growth_bytes(end, cloned=True)
        else:
            growth = cache.growth_bytes(end)
        kept, most = len(seq.snapshots), self.options.max_snapshots
        return growth + max(0, min(kept + points, most) - kept) * self.snapshot_bytes(seq)

    def snapshot_bytes(self, seq: Sequence) -> int:
        """What one roll-back snapshot of `seq` takes: the cache's fixed-size state and the logits."""
        return seq.cache.fixed_nbytes() + 4 * self.cfg.vocab_size

    def snapshot_points(self, start: int, end: int, restore_at: int | None) -> int:
        """Snapshots a prefill over (start, end] takes: multiples of snapshot_every, the restore
        point."""
        every = self.options.snapshot_every
        points = end // every - start // every
        if restore_at is not None and start < restore_at <= end and restore_at % every:
            points += 1
        return points

    def restore_point(self, start: int, ids: Seq[int]) -> int | None:
        """The position right after the last message-boundary token of `ids` (appended at `start`),
        or None."""
        boundary = self.restore_after
        for i in range(len(ids) - 1, -1, -1):
            if ids[i] in boundary:
                return start + i + 1
        return None

    def reserve(self, seq: Sequence, end: int) -> None:
        self._replicate("reserve", seq.sid, end)

    def next_chunk(self, seq: Sequence, budget: int, restore_at: int | None) -> int:
        """Where the next prefill forward of `seq` stops, feeding at most `budget` tokens: chunk
        ends fall on multiples of 128 where the chunk is longer than that, on every snapshot
        point and on the restore point, so snapshots sit where they are wanted."""
        start, end = seq.cached_length, len(seq.tokens)
        stop = min(end, start + min(self.options.prefill_chunk, budget))
        if stop - start > ALIGN and stop % ALIGN:
            stop = stop // ALIGN * ALIGN
        every = self.options.snapshot_every
        stop = min(stop, (start // every + 1) * every)
        if restore_at is not None and start < restore_at < stop:
            stop = restore_at
        return stop

    def feed(self, seqs: list[Sequence], stops: list[int], restore_at: list[int | None]) -> list[int]:
        """One prefill forward of each seqs[i].tokens[cached:stops[i]] (chunks of one length), and a
        snapshot where one is due; returns the bytes each row's snapshot took (0: none)."""
        self._replicate("forward", [s.sid for s in seqs], [s.tokens[s.cached_length:stop] for s, stop in zip(seqs, stops)])
        return [self.snapshot(s) if stop % self.options.snapshot_every == 0 or stop == restore else 0
                for s, stop, restore in zip(seqs, stops, restore_at)]

    def decode_forward(self, seqs: list[Sequence]) -> None:
        """Feed each sequence's newest (pending) token, all in one batched forward."""
        self._replicate("forward", [s.sid for s in seqs], [[s.tokens[-1]] for s in seqs])
        every = self.options.snapshot_every
        for s in seqs:
            if s.cached_length % every == 0:
                self.snapshot(s)

    def snapshot(self, seq: Sequence) -> int:
        """A roll-back point at the cached length (none twice at one length); returns its bytes."""
        if not self.options.max_snapshots or (seq.snapshots and seq.snapshots[-1].length == seq.cached_length):
            return 0
        self._replicate("snapshot", seq.sid)
        return seq.snapshots[-1].nbytes

    def truncate(self, seq: Sequence, n: int) -> None:
        """Keep the first n tokens: the cache rolls back to the newest snapshot at or before n (or
        to empty); the tokens between it and n become pending."""
        if n == len(seq.tokens):
            return
        del seq.tokens[n:]
        seq.finish_reason = None
        if n < seq.cached_length:
            self._replicate("rollback", seq.sid, n)

    def fork(self, seq: Sequence) -> Sequence:
        child = next(self._sids)
        self._replicate("fork", seq.sid, child)
        return self._seqs[child]

    def spill(self, seq: Sequence, to: str | os.PathLike) -> None:
        if seq.location == "disk":
            raise SessionStateError(f"session is already spilled to {seq.spilled_to}")
        if str(to) == "host":
            if seq.location == "device":
                self._replicate("move", seq.sid, "host")
            return
        self.save(seq, Path(to))
        self._replicate("release", seq.sid, str(to))

    def save(self, seq: Sequence, path: Path) -> Path:
        """Write the folder (rank 0 alone writes files; the other ranks re-read them)."""
        tensors = dict(seq.cache.state_tensors())
        if seq.last_logits is not None:  # kept with pending tokens too: truncate may drop them
            tensors[_LAST_LOGITS] = seq.last_logits
        return session_io.write_session(path, fingerprint=self.fingerprint, token_ids=seq.tokens,
                                        cache_length=seq.cached_length, tensors=tensors, kv_dtype=self.kv_dtype)

    def drop(self, seq: Sequence) -> None:
        self._replicate("drop", seq.sid)

    # ---- cache, model and memory --------------------------------------------------------------
    def new_cache(self) -> ModelCache:
        if self.kv_fp8:
            return ModelCache.empty(self.cfg, self.device, self.model.dtype, kv_fp8=True)
        return self.model.new_cache(device=self.device)

    def _forward(self, rows: list[list[int]], caches: list) -> torch.Tensor:
        """Feed rows[b] (all of one length) to caches[b]; returns last-position logits [B, V] fp32."""
        with torch.inference_mode():
            ids = torch.tensor(rows, dtype=torch.long, device=self.device)
            logits = self.model(ids, caches=caches, last_only=True, options=self.options.forward)
        return logits.reshape(len(rows), -1, logits.shape[-1])[:, -1].float()

    def resident_bytes(self) -> int:
        """KV + snapshots on the device, shared ones once."""
        seen: set[int] = set()
        return sum(self._unshared_bytes(s, seen) for s in list(self._seqs.values())
                   if s.location == "device" and not s.closed)

    @staticmethod
    def _unshared_bytes(seq: Sequence, seen: set[int]) -> int:
        if seq.ref is None:
            return 0
        size = 0
        if id(seq.ref) not in seen:
            seen.add(id(seq.ref))
            size += seq.kv_bytes()
        for snap in seq.snapshots:
            if id(snap) not in seen:
                seen.add(id(snap))
                size += snap.nbytes
        return size

    def sequences(self) -> list[Sequence]:
        return [s for s in list(self._seqs.values()) if not s.closed]



def kv_bytes_per_token(cfg: Any, elem_bytes: int = 2, fp8: bool = False) -> float:
    """Asymptotic cache growth per token over the main layers (sliding rings and compressor
    states are fixed-size): a CSA layer adds a main entry and an indexer key per 4 tokens, an HCA
    layer a main entry per 128 tokens. In the cache dtype a main entry is head_dim x elem_bytes
    (1024 in bf16) and a key index_head_dim x elem_bytes (256); quantised (`fp8`), 584 and 68.
    Flash: 6,880 B/token in bf16, 3,514 quantised."""
    entry, key = elem_bytes * cfg.head_dim, elem_bytes * cfg.index_head_dim
    if fp8:
        entry = Fp8KVLayout(cfg.head_dim, cfg.rope_head_dim).entry_bytes
        key = cfg.index_head_dim // 2 + cfg.index_head_dim // 32
    total = 0.0
    for spec in cfg.layers:
        if spec.compress_ratio:
            total += entry / spec.compress_ratio
        if spec.kind == "csa":
            total += key / spec.compress_ratio
    return total


def default_kv_budget(device: torch.device) -> int:
    """The KV budget `kv_budget_bytes="auto"` means: on CUDA what the device has free now (the
    weights are loaded) less max(2 GiB, 10 %) for activations and workspaces; on CPU half the host
    memory available now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, free - max(_GPU_RESERVE, free // 10))
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available // _CPU_BUDGET_SHARE


def _stop_group(scheduler: weakref.ref, group: spmd.TensorParallelGroup) -> None:
    """Stop the other ranks, once the scheduler's thread (the only one that talks to them) is idle."""
    running = scheduler()
    if running is not None:
        running.stop()
    group.shutdown()


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _tokenizer_beside(path: str | os.PathLike):
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return None
    from encoding import Tokenizer

    return Tokenizer.from_file(file)


def _follow_rank(rank: int, world: int, init_method: str, backend: str, timeout_s: float, path: Path,
                 device: Any, load: dict, engine_kwargs: dict, parent: int, threads: int) -> None:
    """A follower rank's process: load its part, build its engine, apply rank 0's operations."""
    launch.exit_with_parent(parent)
    torch.set_num_threads(threads)                 # as many as rank 0 uses
    tp = launch.init(rank, world, init_method, backend, timeout_s)
    control = launch.control_group()
    engine, error = None, None
    try:
        model = load_model(path, device=launch.device_for(rank, device), tp=tp, **load)
        engine = Engine(model, kv_budget_bytes=None, **engine_kwargs)
    except Exception as e:  # noqa: BLE001 - reported to rank 0, which raises it
        error = f"{type(e).__name__}: {e}"
    try:
        spmd.agree(control, error, world)
        if error is None:
            spmd.replay(engine, control)
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()
