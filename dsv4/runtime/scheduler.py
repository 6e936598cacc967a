"""One scheduler owns the engine: a thread that runs every operation on the engine's sequences.

Callers (sessions, `Engine.generate_batch`, from any thread or event loop) submit requests and wait
on them; the thread runs steps until no work is left, then ends (the next request starts a new one).
A step:
  1. ends requests whose caller cancelled them (a closed generator, a disconnected client) or
     whose deadline passed: their sequences are free again from this step on;
  2. runs the queued calls (truncate, fork, save, spill, load, close, ...) in order;
  3. admits waiting new sessions, prompts and decodes in arrival order while the KV budget allows
     (see below);
  4. decodes every running sequence together: one token each, drawn from their logits, then one
     batched forward of the drawn tokens;
  5. prefills waiting prompts in chunks with the rest of the per-step token budget
     (`RuntimeOptions.step_tokens`, at least min(prefill_chunk, 128) tokens while any prompt
     waits), oldest first; a decode whose prompt is fed starts drawing at the next step.
So a long prefill delays the running sequences' next token by one chunk at most. Each step leaves a
`StepRecord` (which sequences decoded, which prefill chunks ran, what finished) in `records`.

Admission by KV bytes: a request is admitted when what it will allocate (its prompt's KV, a
private copy of a forked cache, its roll-back snapshots) fits the engine's budget next to what is
resident and what admitted requests will still allocate. When it does not, idle sequences (no
request on them) are spilled to host memory, least recently used first, before anything is
refused; they come back on their next use. A request that could fit once running requests end
waits (at most `RuntimeOptions.max_waiting` of them; one more raises `EngineBusy`); one that
cannot fit even with every other sequence spilled raises `KVBudgetExceeded`. A running decode
whose next token needs memory that cannot be found ends with `KVBudgetExceeded` (its tokens kept).

Tokens reach the caller through a `Mailbox` as they are drawn. A caller that stops early
(cancel) keeps exactly the tokens it received: any drawn after them are cut from the sequence.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from dsv4.runtime.errors import (
    ContextLengthExceeded,
    DeadlineExceeded,
    EngineBusy,
    EngineError,
    KVBudgetExceeded,
    SessionStateError,
)
from dsv4.runtime.sampling import (
    DecodeState,
    SamplingParams,
    StopChecker,
    draw,
    make_generator,
    process_logits,
)
from dsv4.runtime.sequence import Sequence

if TYPE_CHECKING:
    from dsv4.runtime.engine import Engine

log = logging.getLogger(__name__)

ALIGN = 128  # the smallest prefill chunk a step gives a waiting prompt (when prefill_chunk allows)
RECORDS = 10_000  # step records kept (the newest)
END = object()  # the last item of a mailbox that ended without an error


class Mailbox:
    """Items from the scheduler's thread to one consumer, who waits in a thread (`get`) or in an
    asyncio event loop (`aget`). After `finish`, the remaining items, then END or the error."""

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._cond = threading.Condition()
        self._done = False
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None

    def put(self, item: Any) -> None:
        with self._cond:
            self._items.append(item)
            self._notify()

    def finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            if not self._done:
                self._done, self._error = True, error
                self._notify()

    def unread(self) -> list[Any]:
        with self._cond:
            return list(self._items)

    def _notify(self) -> None:
        self._cond.notify_all()
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._wakeup.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is waiting any more
                pass

    def _take(self) -> tuple[bool, Any]:
        if self._items:
            return True, self._items.popleft()
        if self._done:
            if self._error is not None:
                raise self._error
            return True, END
        return False, None

    def get(self) -> Any:
        with self._cond:
            while True:
                ready, item = self._take()
                if ready:
                    return item
                self._cond.wait()

    async def aget(self) -> Any:
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                ready, item = self._take()
                if ready:
                    return item
                if self._loop is not loop:
                    self._loop, self._wakeup = loop, asyncio.Event()
                self._wakeup.clear()
            await self._wakeup.wait()


@dataclass(frozen=True)
class StepRecord:
    """What one scheduler step did."""

    index: int
    decode: tuple[int, ...]  # sequences that drew a token this step (one batched forward)
    prefill: tuple[tuple[int, int], ...]  # (sequence, tokens fed) of each prefill chunk
    finished: tuple[tuple[int, str], ...]  # (sequence, why): stop, length, cancelled, deadline, refused, error
    cancelled: tuple[tuple[int, int], ...] = ()  # (sequence, index of the step current when cancel was asked)


class Request:
    """Work on some sequences, submitted by a caller who waits on its mailbox. `cancel()` (any
    thread) ends it at the next step; `cancelled_at` is the step index current when it was asked."""

    def __init__(self, scheduler: Scheduler, seqs: list[Sequence], deadline: float | None) -> None:
        self.scheduler, self.seqs, self.deadline = scheduler, seqs, deadline
        self.mailbox = Mailbox()
        self.cancelled_at: int | None = None
        self.done = False
        self.later_bytes = 0  # device bytes it will still allocate (its roll-back snapshots to come)

    def cancel(self) -> None:
        """(any thread) End the request at the next step; its caller stops waiting for it."""
        if not self.done and self.cancelled_at is None:
            self.cancelled_at = self.scheduler.step_index

    def wait(self) -> Any:
        return self.mailbox.get()

    async def await_result(self) -> Any:
        try:
            return await self.mailbox.aget()
        except asyncio.CancelledError:
            self.cancel()
            raise


class Call(Request):
    """A function run on the scheduler's thread between steps."""

    def __init__(self, scheduler: Scheduler, seqs: list[Sequence], fn: Callable, args: tuple) -> None:
        super().__init__(scheduler, seqs, None)
        self.fn, self.args = fn, args


class Open(Request):
    """A new, empty sequence (its cache is allocated when admitted); the result is the sequence."""

    def __init__(self, scheduler: Scheduler) -> None:
        super().__init__(scheduler, [], None)


class Prefill(Request):
    """Append `ids` to a sequence and feed them (chunked); the result is the last logits."""

    def __init__(self, scheduler: Scheduler, seq: Sequence, ids: list[int], deadline: float | None) -> None:
        super().__init__(scheduler, [seq], deadline)
        self.seq, self.ids = seq, ids
        self.restore_at: int | None = None


@dataclass(eq=False)
class Row:
    """One sequence of a decode request."""

    request: Decode
    index: int
    seq: Sequence
    state: DecodeState
    restore_at: int | None = None  # feeding a decode's pending tokens keeps no restore point
    decoding: bool = False  # False while its pending tokens are fed


class Decode(Request):
    """Decode rows together; the mailbox gets (row index, token) as tokens are drawn."""

    def __init__(self, scheduler: Scheduler, seqs: list[Sequence], states: list[DecodeState],
                 deadline: float | None) -> None:
        super().__init__(scheduler, seqs, deadline)
        self.rows = [Row(self, i, seq, st) for i, (seq, st) in enumerate(zip(seqs, states))]
        self.left = len(self.rows)


@dataclass
class _StepLog:
    decode: list[int] = field(default_factory=list)
    prefill: list[tuple[int, int]] = field(default_factory=list)
    finished: list[tuple[int, str]] = field(default_factory=list)
    cancelled: list[tuple[int, int]] = field(default_factory=list)


class Scheduler:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # the inbox, the thread's life, sequence ownership; re-entrant: a session collected while
        # this thread holds it is forgotten from inside
        self._lock = threading.RLock()
        self._inbox: deque[Request] = deque()
        self._thread: threading.Thread | None = None
        self._calls: deque[Call] = deque()
        self._waiting: deque[Request] = deque()  # prefills and decodes not yet admitted
        self._active: list[Request] = []  # admitted prefills and decodes
        self._feeding: list[Prefill | Row] = []  # admitted, with tokens to feed (oldest first)
        self._decoding: list[Row] = []
        self.records: deque[StepRecord] = deque(maxlen=RECORDS)
        self.step_index = 0
        self._stopping = False
        _SCHEDULERS.add(self)

    # ---- submitting (any thread) --------------------------------------------------------------
    def call(self, fn: Callable, *args: Any, claim: Seq[int] = ()) -> Any:
        """Run fn(*args) on the scheduler's thread between steps and return its result; the
        sequences `claim`ed are busy meanwhile (sequence ids)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("engine operations cannot run from inside a step (a logits processor?)")
        return self._submit(Call(self, self._claim(claim), fn, args)).wait()

    def forget(self, sid: int) -> None:
        """Drop a sequence (its session was closed or garbage-collected), ending any request on it.
        Returns at once; the memory is freed at the next step."""
        if sys.is_finalizing():  # sessions collected at exit: no thread may start any more
            return
        with self._lock:
            seq = self.engine.find(sid)
            if seq is None or seq.closed:
                return
            seq.closed = True
            owner = seq.owner
        if isinstance(owner, Request):
            owner.cancel()
        self._submit(Call(self, [], self.engine.drop, (seq,)))

    def open(self) -> Sequence:
        """A new, empty sequence, admitted like a prompt (it may wait for KV memory)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("engine operations cannot run from inside a step (a logits processor?)")
        return self._submit(Open(self)).wait()

    def prefill(self, sid: int, ids: Seq[int], deadline: float | None = None) -> Prefill:
        """Queue appending `ids` to a sequence; wait on the request for the last logits."""
        ids = self.engine.check_token_ids(ids)
        (seq,) = seqs = self._claim([sid])
        if len(seq.tokens) + len(ids) > self.engine.max_context:
            self._release(seqs)
            raise ContextLengthExceeded(len(seq.tokens), len(ids), self.engine.max_context)
        return self._submit(Prefill(self, seq, ids, deadline))

    async def decode(self, sids: Seq[int], params: Seq[SamplingParams],
                     deadline: float | None = None) -> AsyncIterator[tuple[int, int]]:
        """Decode sequences together: (row index, token) as drawn; closing the iterator early
        cancels the rest (each sequence keeps the tokens yielded)."""
        engine = self.engine
        decode = engine.tokenizer.decode if any(p.stop_strings for p in params) and engine.tokenizer else None
        states = [DecodeState(p, make_generator(p.seed, engine.device), StopChecker(p, engine.eos_token_ids, decode))
                  for p in params]
        seqs = self._claim(sids)
        if any(not seq.tokens for seq in seqs):
            self._release(seqs)
            raise SessionStateError("the session is empty: append tokens before generating")
        request = self._submit(Decode(self, seqs, states, deadline))
        try:
            while True:
                item = await request.mailbox.aget()
                if item is END:
                    return
                yield item
        finally:
            request.cancel()

    def _claim(self, sids: Seq[int]) -> list[Sequence]:
        seqs = [self.engine.sequence(sid) for sid in sids]
        with self._lock:
            for seq in seqs:
                if seq.closed:
                    raise SessionStateError("session is closed")
                if seq.owner is not None:
                    raise SessionStateError("session is busy (another call on it is still running)")
            for seq in seqs:
                seq.owner = True  # replaced by the request object when it is built
        return seqs

    def _release(self, seqs: list[Sequence]) -> None:
        with self._lock:
            for seq in seqs:
                seq.owner = None
                seq.last_used = self.step_index

    def _submit(self, request: Request) -> Any:
        with self._lock:
            for seq in request.seqs:
                seq.owner = request
            self._inbox.append(request)
            self._start()
        return request

    def stop(self, timeout_s: float = 30.0) -> None:
        """End every queued and running request (`EngineError`) and wait for the thread to end; a
        no-op from the thread itself or while idle."""
        with self._lock:
            thread = self._thread
            if thread is None or thread is threading.current_thread():
                return
            self._stopping = True
        thread.join(timeout_s)

    def _start(self) -> None:
        """(under the lock) A thread to run the queued work, unless one runs."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dsv4-scheduler", daemon=True)
            self._thread.start()

    # ---- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        if self.engine.device.type == "cuda":
            torch.cuda.set_device(self.engine.device)
        while True:
            with self._lock:
                while self._inbox:
                    request = self._inbox.popleft()
                    (self._calls if isinstance(request, Call) else self._waiting).append(request)
                if self._stopping:
                    self._stop_all_work()
                if not (self._calls or self._waiting or self._active):
                    self._thread, self._stopping = None, False
                    return
            try:
                self._step()
            except BaseException as e:
                log.exception("scheduler step failed")
                for request in list(self._active):
                    self._end(request, error=e, why="error")

    def _stop_all_work(self) -> None:
        stopped = EngineError("the engine is shutting down")
        for request in [*self._calls, *self._waiting, *self._active]:
            if isinstance(request, Call):
                self._release(request.seqs)
                request.done = True
                request.mailbox.finish(stopped)
            else:
                self._end(request, stopped, "error")
        self._calls.clear()

    def _step(self) -> None:
        self.step_index += 1
        done = _StepLog()
        now = time.monotonic()
        for request in list(self._waiting) + list(self._active):
            if request.cancelled_at is not None:
                self._cancel(request, done)
            elif request.deadline is not None and now >= request.deadline:
                self._end(request, DeadlineExceeded("the request's deadline passed"), "deadline", done)
        while self._calls:
            self._run_call(self._calls.popleft())
        self._admit(done)
        rows = self._decode_step(done)
        self._prefill_step(self.engine.options.step_tokens - rows, done)
        if done.decode or done.prefill or done.finished:
            self.records.append(StepRecord(self.step_index, tuple(done.decode), tuple(done.prefill),
                                           tuple(done.finished), tuple(done.cancelled)))

    def _run_call(self, call: Call) -> None:
        try:
            result = call.fn(*call.args)
        except BaseException as e:  # noqa: BLE001 - raised in the caller
            self._release(call.seqs)
            call.done = True
            call.mailbox.finish(e)
            return
        self._release(call.seqs)
        call.done = True
        call.mailbox.put(result)
        call.mailbox.finish()

    # ---- admission ------------------------------------------------------------------------------
    def _admit(self, done: _StepLog) -> None:
        while self._waiting:
            request = self._waiting[0]
            try:
                admitted = self._try_admit(request)
            except BaseException as e:  # noqa: BLE001 - refused: the caller hears why
                self._waiting.popleft()
                self._end(request, e, "refused", done)
                continue
            if not admitted:  # first come, first served: it and those behind it wait for running ones
                busy = EngineBusy(f"{self.engine.options.max_waiting} requests may wait for it")
                while len(self._waiting) > self.engine.options.max_waiting:
                    self._end(self._waiting[-1], busy, "refused", done)
                return
            if request.done:  # nothing to run after admission (a new sequence): out of the queue already
                continue
            self._waiting.popleft()
            self._active.append(request)

    def _try_admit(self, request: Request) -> bool:
        engine = self.engine
        if any(seq.closed for seq in request.seqs):
            raise SessionStateError("session is closed")
        if isinstance(request, Open):
            if not self._room(engine.empty_cache_bytes, request):
                return False
            request.mailbox.put(engine.create())
            self._end(request, None, None)
            return True
        for seq in request.seqs:
            if seq.location != "device":
                if not self._room(engine.bring_back_bytes(seq), request):
                    return False
                engine.make_resident(seq)
        if isinstance(request, Prefill):
            seq = request.seq
            start, end = len(seq.tokens), len(seq.tokens) + len(request.ids)
            restore_at = engine.restore_point(start, request.ids)
            points = engine.snapshot_points(seq.cached_length, end, restore_at)
            need = engine.prefill_bytes(seq, end, points)
            snapshots = need - engine.prefill_bytes(seq, end, 0)
            if not self._room(need, request):
                return False
            seq.tokens.extend(request.ids)
            seq.finish_reason = None
            request.restore_at = restore_at
            engine.reserve(seq, end)           # the rows are allocated now, the snapshots later
            request.later_bytes = snapshots
            self._feeding.append(request)
            return True
        for row in request.rows:
            if not row.seq.pending and row.seq.last_logits is None:
                raise SessionStateError("the session is empty: append tokens before generating")
        need = snapshots = 0
        for row in request.rows:              # pending tokens are fed first, then the turn snapshot
            seq, end = row.seq, len(row.seq.tokens)
            points = engine.snapshot_points(seq.cached_length, end, None) + 1
            need += engine.prefill_bytes(seq, end, points)
            snapshots += engine.prefill_bytes(seq, end, points) - engine.prefill_bytes(seq, end, 0)
        if not self._room(need, request):
            return False
        request.later_bytes = snapshots
        for row in request.rows:
            row.seq.finish_reason = None
            if row.seq.pending:
                engine.reserve(row.seq, len(row.seq.tokens))
                self._feeding.append(row)
            else:
                self._start_decoding(row)
        return True

    def _room(self, need: int, request: Request | None) -> bool:
        """True when `need` more device bytes fit (spilling idle sequences, least recently used
        first, if that makes them fit); False when the request should wait for running ones;
        raises KVBudgetExceeded when it can never fit."""
        budget = self.engine.kv_budget_bytes
        if budget is None:
            return True
        resident = self.engine.resident_bytes()
        committed = sum(r.later_bytes for r in self._active if r is not request)
        if resident + committed + need <= budget:
            return True
        # spillable: on the device, not shared, not used by an admitted request (one still waiting
        # brings its sequence back when admitted)
        mine = set() if request is None else {id(s) for s in request.seqs}
        running = {id(r) for r in self._active}
        with self._lock:
            idle = sorted((s for s in self.engine.sequences()
                           if s.location == "device" and not s.shared and id(s) not in mine
                           and (s.owner is None or isinstance(s.owner, Request) and id(s.owner) not in running)),
                          key=lambda s: s.last_used)
        sizes = [s.kv_bytes() + s.snapshot_bytes() for s in idle]
        if resident - sum(sizes) + committed + need <= budget:
            for seq, size in zip(idle, sizes):
                self.engine.spill(seq, "host")
                resident -= size
                if resident + committed + need <= budget:
                    return True
        own = sum(s.kv_bytes() + s.snapshot_bytes() for s in (request.seqs if request else ()) if s.location == "device")
        if own + need <= budget and any(r is not request for r in self._active):
            return False
        raise KVBudgetExceeded(need, resident, budget)

    def make_room(self, need: int) -> None:
        """(on the thread) Make `need` device bytes free now, spilling idle sequences, or raise:
        `EngineBusy` when running requests hold the memory, `KVBudgetExceeded` when it never fits."""
        if not self._room(need, None):
            raise EngineBusy("a call does not wait for it")

    def ensure_resident(self, seq: Sequence) -> None:
        """(on the thread) Bring a spilled sequence back for a call on it."""
        if seq.location != "device":
            self.make_room(self.engine.bring_back_bytes(seq))
            self.engine.make_resident(seq)

    # ---- decoding -------------------------------------------------------------------------------
    def _start_decoding(self, row: Row) -> None:
        taken = self.engine.snapshot(row.seq)  # the turn's roll-back point: the end of its prompt
        row.request.later_bytes = max(0, row.request.later_bytes - taken)
        row.decoding = True
        self._decoding.append(row)

    def _decode_step(self, done: _StepLog) -> int:
        """Draw a token for every decoding row and feed the drawn tokens in one forward; returns
        how many rows were fed."""
        engine = self.engine
        rows = list(self._decoding)
        if not rows:
            return 0
        planned = 0  # bytes the rows checked so far will allocate in this step's forward
        for request in _requests(rows):  # the drawn token joins the sequence: it must fit
            mine = [r for r in rows if r.request is request]
            full = next((r.seq for r in mine if len(r.seq.tokens) + 1 > engine.max_context), None)
            try:
                if full is not None:
                    raise ContextLengthExceeded(len(full.tokens), 1, engine.max_context)
                need = sum(self._token_bytes(r.seq) for r in mine)
                if need and not self._room(planned + need, request):
                    raise KVBudgetExceeded(need, engine.resident_bytes(), engine.kv_budget_bytes)
                planned += need
            except BaseException as e:  # noqa: BLE001 - this request ends with it, the others go on
                self._end(request, e, "error", done)
        ready = []
        for row in rows:
            if row.request.done:
                continue
            try:
                ready.append((row, process_logits(row.seq.last_logits, row.state.params, row.state.generated)))
            except BaseException as e:  # noqa: BLE001 - a failing logits processor ends its request
                self._end(row.request, e, "error", done)
        ready = [(row, logits) for row, logits in ready if not row.request.done]
        if not ready:
            return 0
        rows = [row for row, _ in ready]
        drawn = draw(torch.stack([logits for _, logits in ready]), [r.state.params for r in rows],
                     [r.state.generator for r in rows])
        feed = []
        for row, token in zip(rows, drawn):
            seq, st = row.seq, row.state
            seq.tokens.append(token)
            st.generated.append(token)
            reason = st.checker.push(token)
            row.request.mailbox.put((row.index, token))
            done.decode.append(seq.sid)
            if reason is None:
                feed.append(row)
            else:
                seq.finish_reason = reason
                self._finish_row(row, reason, done)
        if feed:
            engine.decode_forward([r.seq for r in feed])
        return len(feed)

    def _token_bytes(self, seq: Sequence) -> int:
        """Device bytes feeding one more token to `seq` allocates (a private copy of a shared
        cache, buffer growth, a periodic snapshot)."""
        end = len(seq.tokens) + 1
        points = 1 if end % self.engine.options.snapshot_every == 0 else 0
        return self.engine.prefill_bytes(seq, end, points)

    def _finish_row(self, row: Row, reason: str, done: _StepLog) -> None:
        self._decoding.remove(row)
        done.finished.append((row.seq.sid, reason))
        request = row.request
        request.left -= 1
        if request.left == 0:
            self._end(request, None, None, done)

    # ---- prefilling -----------------------------------------------------------------------------
    def _prefill_step(self, budget: int, done: _StepLog) -> None:
        """Chunks of the waiting prompts, oldest first, within `budget` tokens; chunks of one length
        share a forward."""
        engine = self.engine
        if self._feeding:
            budget = max(budget, min(engine.options.prefill_chunk, ALIGN))
        by_length: dict[int, list[tuple[Prefill | Row, int]]] = {}
        for item in self._feeding:
            if budget <= 0:
                break
            start = item.seq.cached_length
            stop = engine.next_chunk(item.seq, budget, item.restore_at)
            by_length.setdefault(stop - start, []).append((item, stop))
            budget -= stop - start
        for length, chunks in by_length.items():
            taken = engine.feed([item.seq for item, _ in chunks], [stop for _, stop in chunks],
                                [item.restore_at for item, _ in chunks])
            for (item, _), nbytes in zip(chunks, taken):
                done.prefill.append((item.seq.sid, length))
                request = item if isinstance(item, Prefill) else item.request
                request.later_bytes = max(0, request.later_bytes - nbytes)
                if item.seq.cached_length == len(item.seq.tokens):
                    self._fed(item, done)

    def _fed(self, item: Prefill | Row, done: _StepLog) -> None:
        """All of an item's tokens are in the cache: a prefill is done, a decode starts drawing."""
        self._feeding.remove(item)
        if isinstance(item, Prefill):
            item.mailbox.put(item.seq.last_logits.clone())
            self._end(item, None, None, done)
        else:
            self._start_decoding(item)

    # ---- ending -----------------------------------------------------------------------------------
    def _cancel(self, request: Request, done: _StepLog) -> None:
        """The caller stopped waiting: keep only the tokens it received, free the sequences."""
        if isinstance(request, Decode):
            unread: dict[int, int] = {}
            for index, _ in request.mailbox.unread():
                unread[index] = unread.get(index, 0) + 1
            for row in request.rows:
                if unread.get(row.index) and not row.seq.closed:
                    self.engine.truncate(row.seq, len(row.seq.tokens) - unread[row.index])
        done.cancelled.extend((seq.sid, request.cancelled_at) for seq in request.seqs)
        self._end(request, None, "cancelled", done)

    def _end(self, request: Request, error: BaseException | None, why: str | None,
             done: _StepLog | None = None) -> None:
        """Take a request out of every queue, free its sequences and tell its caller."""
        if request.done:
            return
        request.done = True
        for queue in (self._waiting, self._active):
            if request in queue:
                queue.remove(request)
        items = request.rows if isinstance(request, Decode) else [request]
        self._feeding = [f for f in self._feeding if f not in items]
        self._decoding = [r for r in self._decoding if r.request is not request]
        if why is not None and done is not None:
            done.finished.extend((seq.sid, why) for seq in request.seqs)
        self._release(request.seqs)
        request.mailbox.finish(error)


_SCHEDULERS: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _stop_schedulers() -> None:
    """At exit, every scheduler's thread ends first: a thread still inside torch while the
    interpreter finalises would abort the process."""
    for scheduler in list(_SCHEDULERS):
        scheduler.stop()


def _requests(rows: list[Row]) -> list[Decode]:
    seen: dict[int, Decode] = {}
    for row in rows:
        seen.setdefault(id(row.request), row.request)
    return list(seen.values())
