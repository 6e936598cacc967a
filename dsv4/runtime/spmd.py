"""The engine over tensor-parallel ranks (SPMD): `dsv4.Engine(path, tp=N)`.

This process is rank 0: it loads its part of the model (dsv4/parallel.py) and serves the usual
`Engine` / `Session` API, so callers (the agent) see no difference. It spawns ranks 1..N-1
(followers); each loads its own part and runs an ordinary `Engine` that replays rank 0's commands.
Every rank holds a full copy of every session's KV cache (DSV4's K=V head is replicated), so
replaying the same operations in the same order keeps all ranks identical, and the collectives
inside their forwards line up.

    rank 0 (LeaderEngine / LeaderSession)          ranks 1..N-1 (serve)
    append(ids) -> broadcast ("append", sid, ids)  -> sessions[sid].append(ids)
                -> its own append (forwards with collectives, in step with the followers')

Commands (a gloo control group, objects): new_session, load_session, append, truncate, fork,
save, spill, unspill, close, and for generation start_decode, tokens, decode_step; shutdown.
Rules:
- Only the outermost operation is sent (the append inside new_session, the save inside spill
  are replayed by the follower's own call). One lock (the engine's) covers sending and executing,
  so commands from several threads never interleave with another command's collectives.
- Rank 0 alone samples: the drawn tokens are a command ("tokens"), so seeds, stop strings and
  logits processors exist on rank 0 only.
- An operation rank 0 refuses because the session is busy or closed is not sent. Every other
  check (ids, context, KV budget) sees the same state on every rank, so all ranks refuse alike.
- Followers write no files: rank 0 writes saved / spilled sessions, followers re-read them from
  the same path (one host; several hosts would need a shared filesystem).
- Sessions rank 0 drops without close() are dropped on the followers with the next command.
Limits: a rank that fails on its own (out of memory, a crash) is not recovered; rank 0 then
fails at the next collective after the process group's timeout. A session saved under tp=N
carries rank 0's fingerprint and loads only into a tp=N engine of the same checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
import os
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dsv4.loading.checkpoint import load_model
from dsv4.runtime import launch
from dsv4.runtime.engine import Engine, _tokenizer_beside
from dsv4.runtime.errors import EngineError
from dsv4.runtime.session import Session

log = logging.getLogger(__name__)

# Engine settings every rank must share: they decide chunking, snapshots and refusals
_REPLICATED = ("kv_budget_bytes", "max_context", "prefill_chunk", "snapshot_every", "max_snapshots",
               "kv_fp8")


class _Leader:
    """Rank 0's side of the command channel."""

    def __init__(self, group: Any, procs: list, lock: Any):
        self.group, self.procs, self.lock = group, procs, lock
        self.depth = 0              # > 0 while a command runs: nested operations are not sent
        self.next_sid = 0
        self.dropped: list[int] = []  # sessions garbage-collected on rank 0, sent with the next command
        self.closed = False

    @contextlib.contextmanager
    def command(self, op: str, *args: Any, session: Session | None = None):
        """Send (op, args) to the followers unless nested or refused for a busy / closed
        session, then run the body (rank 0's own execution) under the lock."""
        with self.lock:
            refused = session is not None and (session._busy or session._closed)
            if self.depth == 0 and not refused:
                self.send(op, *args)
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1

    def send(self, op: str, *args: Any) -> None:
        if self.closed:
            raise EngineError("this tensor-parallel engine was shut down")
        dropped, self.dropped = self.dropped, []
        dist.broadcast_object_list([(op, args, dropped)], src=0, group=self.group)

    def claim_sid(self) -> int:
        sid, self.next_sid = self.next_sid, self.next_sid + 1
        return sid

    def shutdown(self) -> None:
        """Stop the followers, join them (terminating any that hang) and leave the group."""
        if self.closed:
            return
        try:
            with self.lock:
                self.send("shutdown")
        except Exception as e:  # noqa: BLE001 - a follower already gone: terminated below
            log.warning("tensor parallel shutdown: %s", e)
        self.closed = True
        _stop(self.procs)
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop(procs: list, timeout_s: float = 30.0) -> None:
    for p in procs:
        p.join(timeout=timeout_s)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)


class LeaderSession(Session):
    """A session on rank 0: every operation is first sent to the followers (see the module doc)."""

    def __init__(self, engine: LeaderEngine, cache: Any, tokens=()):
        super().__init__(engine, cache, tokens)
        leader = engine._leader
        self.sid = leader.claim_sid()
        weakref.finalize(self, leader.dropped.append, self.sid)

    def _command(self, op: str, *args: Any):
        return self.engine._leader.command(op, self.sid, *args, session=self)

    def append(self, token_ids):
        ids = self.engine.check_token_ids(token_ids)
        with self._command("append", ids):
            return super().append(ids)

    def truncate(self, n: int) -> None:
        with self._command("truncate", n):
            super().truncate(n)

    def fork(self) -> Session:
        with self._command("fork", self.engine._leader.next_sid):
            return super().fork()

    def save(self, path) -> Path:
        with self._command("save", str(path)):
            return super().save(path)

    def spill(self, to="host") -> None:
        with self._command("spill", str(to)):
            super().spill(to)

    def unspill(self) -> None:
        with self._command("unspill"):
            super().unspill()

    def close(self) -> None:
        with self.engine._leader.command("close", self.sid):
            super().close()


class FollowerSession(Session):
    """A session on ranks 1..N-1: rank 0 writes the files."""

    def save(self, path) -> Path:
        with self._exclusive():
            self._ensure_resident()            # what saving does to the session's state
        return Path(path)


class LeaderEngine(Engine):
    """`dsv4.Engine(path, tp=N, ...)`: rank 0 of N (see the module doc). Extra arguments:
    backend ("nccl" on CUDA, "gloo" on CPU by default) and timeout_s (bound on each collective).
    Device: cuda:r on rank r when `device` is a CUDA device (or None with CUDA present), else
    `device` on every rank.
    `shutdown()` (also on garbage collection and at exit, or leaving a `with` block) stops the
    other ranks."""

    session_class = LeaderSession

    def __init__(self, model_or_path: Any, *, tp: int, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, backend: str | None = None,
                 timeout_s: float = 1800.0, **kwargs: Any):
        if not isinstance(model_or_path, (str, os.PathLike)):
            raise TypeError("Engine(..., tp=N) needs a checkpoint path: every rank loads its own part")
        if dist.is_initialized():
            raise RuntimeError("Engine(tp=N) starts its own process group, but one is initialised already")
        path = Path(model_or_path)
        here = launch.device_for(0, device)
        if here.type == "cuda" and torch.cuda.device_count() < tp:
            raise ValueError(f"Engine(tp={tp}) on CUDA needs {tp} GPUs (one a rank), "
                             f"found {torch.cuda.device_count()}")
        backend = backend or launch.default_backend(here)
        load = {"dtype": dtype} if dtype is not None else {}
        init_method = f"tcp://127.0.0.1:{launch.free_port()}"
        follower_kwargs = {k: v for k, v in kwargs.items() if k in _REPLICATED}
        ctx = torch.multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_follow, daemon=True, name=f"dsv4-tp-rank{r}",
                             args=(r, tp, init_method, backend, timeout_s, path, device, load,
                                   follower_kwargs, os.getpid(), torch.get_num_threads()))
                 for r in range(1, tp)]
        for p in procs:
            p.start()
        try:
            rank0 = launch.init(0, tp, init_method, backend, timeout_s)
            control = launch.control_group()
            error = None
            try:
                model = load_model(path, device=here, tp=rank0, **load)
                kwargs.setdefault("tokenizer", _tokenizer_beside(path))
                super().__init__(model, **kwargs)
            except Exception as e:  # noqa: BLE001 - every rank hears of it, then it is raised
                error = e
            _agree(control, None if error is None else f"{type(error).__name__}: {error}", tp)
            if error is not None:
                raise error
        except BaseException:
            if dist.is_initialized():
                dist.destroy_process_group()
            for p in procs:
                p.terminate()
            _stop(procs, 5)
            raise
        self.tp = tp
        self._leader = _Leader(control, procs, self._lock)
        self._shutdown = weakref.finalize(self, self._leader.shutdown)
        self._leader.send("start", self.fingerprint)     # sessions carry rank 0's fingerprint

    def shutdown(self) -> None:
        self._shutdown()

    def __enter__(self) -> LeaderEngine:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def new_session(self, token_ids=()) -> Session:
        ids = self.check_token_ids(token_ids) if len(token_ids) else []
        with self._leader.command("new_session", self._leader.next_sid, ids):
            return super().new_session(ids)

    def load_session(self, path) -> Session:
        with self._leader.command("load_session", self._leader.next_sid, str(path)):
            return super().load_session(path)

    def _start_decode(self, sessions) -> None:
        with self._leader.command("start_decode", [s.sid for s in sessions]):
            super()._start_decode(sessions)

    def _push_tokens(self, sessions, tokens) -> None:
        with self._leader.command("tokens", [s.sid for s in sessions], list(tokens)):
            super()._push_tokens(sessions, tokens)

    def _decode_step(self, sessions) -> None:
        with self._leader.command("decode_step", [s.sid for s in sessions]):
            super()._decode_step(sessions)


def _agree(group: Any, error: str | None, world: int) -> None:
    """Every rank reports whether it is ready; raise on all of them if any is not."""
    reports: list[Any] = [None] * world
    dist.all_gather_object(reports, error, group=group)
    failed = [f"rank {r}: {e}" for r, e in enumerate(reports) if e is not None]
    if failed and error is None:
        raise RuntimeError("tensor-parallel start-up failed on other ranks:\n  " + "\n  ".join(failed))


def _follow(rank: int, world: int, init_method: str, backend: str, timeout_s: float, path: Path,
            device: Any, load: dict, engine_kwargs: dict, parent: int, threads: int) -> None:
    """A follower rank's process: load its part, build its engine, replay rank 0's commands."""
    launch.exit_with_parent(parent)
    torch.set_num_threads(threads)                 # as many as rank 0 uses
    tp = launch.init(rank, world, init_method, backend, timeout_s)
    control = launch.control_group()
    engine, error = None, None
    try:
        model = load_model(path, device=launch.device_for(rank, device), tp=tp, **load)
        engine = Engine(model, **engine_kwargs)
        engine.session_class = FollowerSession
    except Exception as e:  # noqa: BLE001 - reported to rank 0, which raises it
        error = f"{type(e).__name__}: {e}"
    try:
        _agree(control, error, world)
        if error is None:
            serve(engine, control)
    finally:
        dist.destroy_process_group()


def serve(engine: Engine, group: Any) -> None:
    """Replay rank 0's commands on this rank's engine until shutdown."""
    sessions: dict[int, Session] = {}
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        op, args, dropped = box[0]
        for sid in dropped:
            gone = sessions.pop(sid, None)
            if gone is not None:
                gone.close()
        if op == "shutdown":
            return
        try:
            _replay(engine, sessions, op, args)
        except Exception as e:  # noqa: BLE001 - rank 0 met the same check on the same state and raised too
            log.debug("rank %d: %s refused, as on rank 0: %s", dist.get_rank(), op, e)


_SESSION_OPS = ("append", "truncate", "save", "spill", "unspill", "close")


def _replay(engine: Engine, sessions: dict[int, Session], op: str, args: tuple) -> None:
    if op in _SESSION_OPS:
        sid, *rest = args
        getattr(sessions[sid], op)(*rest)
    elif op == "fork":
        sid, child = args
        sessions[child] = sessions[sid].fork()
    elif op in ("new_session", "load_session"):
        sid, arg = args
        sessions[sid] = getattr(engine, op)(arg)
    elif op in ("start_decode", "decode_step"):
        getattr(engine, "_" + op)([sessions[s] for s in args[0]])
    elif op == "tokens":
        engine._push_tokens([sessions[s] for s in args[0]], args[1])
    elif op == "start":
        engine._fingerprint = args[0]
    else:
        raise ValueError(f"unknown tensor-parallel command {op!r}")
