"""The embedded DSV4 inference engine: one model, many resident sessions.

    engine = dsv4.Engine(model_or_checkpoint_path, kv_budget_bytes=40 << 30)
    s = engine.new_session()
    s.append(prompt_ids)                      # chunked prefill, returns last-position logits
    async for tok in s.generate(max_tokens=512, temperature=1.0, stop=["</answer>"]): ...
    s.append(tool_result_ids)                 # the next turn prefills only the new tokens

The engine owns the model, the device, the limits (context length, KV byte budget), chunked
prefill, batched decode of several sessions (`generate_batch`) and session loading. Model calls
are serialised by a lock and run in worker threads from the async API, so the event loop keeps
running between (and during) steps.
"""
from __future__ import annotations

import os
import threading
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import torch

from dsv4.formats.kv_fp8 import Fp8KVLayout
from dsv4.loading.checkpoint import load_model
from dsv4.network.cache import ModelCache
from dsv4.runtime import session_io
from dsv4.runtime.errors import (
    ContextLengthExceeded,
    KVBudgetExceeded,
    SessionFormatError,
    SessionMismatch,
)
from dsv4.runtime.sampling import (
    DecodeState,
    SamplingParams,
    StopChecker,
    make_generator,
    sample_next,
)
from dsv4.runtime.session import _LAST_LOGITS, Session, tree_bytes

ALIGN = 128  # compression boundary shared by every layer type (lcm of the ratios 4 and 128)


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
    kv_budget_bytes cap on resident KV + snapshots over all sessions (None = no cap)
    max_context     cap on a session's length (default and upper bound: the model's max_seq_len)
    prefill_chunk   tokens per prefill forward (chunk ends fall on multiples of 128); with the
                    model's blocked attention and indexer, memory stays bounded at any length
    snapshot_every  take a roll-back snapshot whenever a session's cache length hits a multiple
    max_snapshots   snapshots kept per session (the newest)
    kv_fp8          quantised KV storage: compressed main entries in the 584-byte FP8 layout,
                    indexer keys in MXFP4 (68 bytes); lossless when the model's quantisation
                    simulation is on (as it is for FP8 checkpoints on GPU)
    tp              tensor-parallel ranks: `Engine(path, tp=N)` is a `dsv4.runtime.spmd.LeaderEngine`
                    (this process is rank 0 and runs the API; N - 1 spawned ranks follow it)
    """

    session_class = Session    # what sessions are made of (tensor parallel: dsv4/spmd.py's)

    def __new__(cls, *args: Any, tp: int = 1, **kwargs: Any):
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tp must be an int >= 1, got {tp!r}")
        if tp > 1 and cls is Engine:                # tensor parallel over tp ranks
            from dsv4.runtime.spmd import LeaderEngine
            cls = LeaderEngine
        return super().__new__(cls)

    def __init__(self, model_or_path: Any, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, tokenizer: Any = None,
                 kv_budget_bytes: int | None = None, max_context: int | None = None,
                 prefill_chunk: int = 2048,
                 snapshot_every: int = 4096, max_snapshots: int = 4, kv_fp8: bool = False,
                 eos_token_ids: Iterable[int] | None = None, tp: int = 1):
        if tp != 1:     # Engine(path, tp=N) is built by __new__ as a LeaderEngine, which passes none
            raise ValueError("tp > 1 is served by dsv4.Engine(path, tp=N) (dsv4.runtime.spmd.LeaderEngine)")
        if isinstance(model_or_path, (str, os.PathLike)):
            model = load_model(model_or_path, device=device or "cuda",
                               **({"dtype": dtype} if dtype is not None else {}))
            tokenizer = tokenizer if tokenizer is not None else _tokenizer_beside(model_or_path)
        else:
            model = model_or_path
        if prefill_chunk < 1 or snapshot_every < 1 or max_snapshots < 0:
            raise ValueError("prefill_chunk and snapshot_every must be >= 1, max_snapshots >= 0")
        self.model = model.eval()
        self.cfg = model.cfg
        self.device = _model_device(model)  # `device` only says where a checkpoint is loaded
        self.kv_fp8 = kv_fp8
        model_max = int(self.cfg.max_seq_len)
        if max_context is not None and not 1 <= max_context <= model_max:
            raise ValueError(f"max_context must be in [1, {model_max}] (the model's max_seq_len), "
                             f"got {max_context}")
        self.max_context = max_context or model_max
        self.kv_budget_bytes = kv_budget_bytes
        self.prefill_chunk = prefill_chunk
        self.snapshot_every = snapshot_every
        self.max_snapshots = max_snapshots
        self._tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids) if eos_token_ids is not None else \
            (int(getattr(tokenizer, "eos_id", 1)),)
        self._sessions: weakref.WeakSet[Session] = weakref.WeakSet()
        self._lock = threading.RLock()
        self._fingerprint: str | None = None
        cache_dtype = self.new_cache().dtype
        self.kv_dtype = "fp8" if kv_fp8 else str(cache_dtype).removeprefix("torch.")  # in saved sessions
        self.kv_bytes_per_token = kv_bytes_per_token(self.cfg, cache_dtype.itemsize, fp8=kv_fp8)

    # ---- sessions ---------------------------------------------------------------------------
    def new_session(self, token_ids: Sequence[int] = ()) -> Session:
        """An empty session (or one with `token_ids` fed at once)."""
        cache = self.new_cache()
        self._check_budget(cache.nbytes())
        session = self.session_class(self, cache)
        self.register(session)
        if token_ids:
            session.append(token_ids)
        return session

    def load_session(self, path: str | os.PathLike) -> Session:
        """A session saved with `session.save(path)`; it must come from this very model."""
        session = self.session_class(self, None)
        tokens, cache, logits = self.read_session_state(path)
        session._ref.cache = cache
        session._tokens, session._last_logits = tokens, logits
        self.register(session)
        return session

    def read_session_state(self, path: str | os.PathLike) -> tuple[list[int], ModelCache, torch.Tensor | None]:
        """(token ids, cache on the engine's device, last logits or None) of a saved session."""
        manifest, tensors = session_io.read_session(path, fingerprint=self.fingerprint, device="cpu")
        if manifest.get("kv_dtype") != self.kv_dtype:
            raise SessionMismatch(f"session {path} stores {manifest['kv_dtype']} KV; this engine "
                                  f"uses {self.kv_dtype} (Engine(kv_fp8=...))")
        logits = tensors.pop(_LAST_LOGITS, None)
        needed = sum(t.numel() * t.element_size() for t in tensors.values())
        self._check_budget(needed)
        cache = ModelCache.from_state_tensors(self.cfg, tensors).to(self.device)
        if int(cache.length) != manifest["cache_length"]:
            raise SessionFormatError(f"{path}: cache holds {cache.length} tokens, manifest says "
                                     f"{manifest['cache_length']}")
        return list(manifest["token_ids"]), cache, None if logits is None else logits.to(self.device)

    def register(self, session: Session) -> None:
        self._sessions.add(session)

    def unregister(self, session: Session) -> None:
        self._sessions.discard(session)

    # ---- cache and model --------------------------------------------------------------------
    def new_cache(self):
        if self.kv_fp8:
            return ModelCache.empty(self.cfg, self.device, self.model.dtype, kv_fp8=True)
        return self.model.new_cache(device=self.device)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = session_io.model_fingerprint(self.model, self.cfg)
        return self._fingerprint

    def forward(self, rows: list[list[int]], caches: list) -> torch.Tensor:
        """Feed rows[b] (all of one length) to caches[b]; returns last-position logits [B, V] fp32."""
        with self._lock, torch.inference_mode():
            ids = torch.tensor(rows, dtype=torch.long, device=self.device)
            logits = self.model(ids, caches=caches, last_only=True)
        return logits.reshape(len(rows), -1, logits.shape[-1])[:, -1].float()

    def chunk_bounds(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """Prefill chunks covering [start, end): ends fall on multiples of 128 where the chunk is
        longer than that, and on every snapshot point, so snapshots sit on compression boundaries."""
        while start < end:
            stop = min(end, start + self.prefill_chunk)
            if stop - start > ALIGN and stop % ALIGN:
                stop = stop // ALIGN * ALIGN
            stop = min(stop, (start // self.snapshot_every + 1) * self.snapshot_every)
            yield start, stop
            start = stop

    def prefill(self, session: Session) -> None:
        """Feed a session's pending tokens, chunk by chunk."""
        tokens = session._tokens
        for start, stop in self.chunk_bounds(session.cached_length, len(tokens)):
            session._feed_chunk(tokens[start:stop])

    # ---- limits -----------------------------------------------------------------------------
    def check_token_ids(self, token_ids: Sequence[int]) -> list[int]:
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

    def reserve(self, session: Session, new_tokens: int, extra_bytes: int = 0) -> None:
        """Raise (changing nothing) if adding `new_tokens` to `session` would pass the context
        length or the KV budget; extra_bytes: other device bytes the operation will allocate."""
        if len(session) + new_tokens > self.max_context:
            raise ContextLengthExceeded(len(session), new_tokens, self.max_context)
        if self.kv_budget_bytes is None or session._ref is None:
            return
        cache = session._ref.cache
        growth = cache_growth_bytes(cache, self.chunk_bounds(cache.length, len(session) + new_tokens))
        if session._ref.sharers > 1:
            growth += session.kv_bytes()  # copy-on-write will copy the shared cache
        end = len(session) + new_tokens
        points = end // self.snapshot_every - cache.length // self.snapshot_every
        kept = len(session._snapshots)
        snapshot_bytes = cache.fixed_nbytes() + 4 * self.cfg.vocab_size  # + its logits
        growth += (min(kept + points, self.max_snapshots) - kept) * snapshot_bytes
        self._check_budget(growth + extra_bytes)

    def _check_budget(self, needed: int) -> None:
        if self.kv_budget_bytes is None:
            return
        resident = self.memory().resident_bytes
        if resident + needed > self.kv_budget_bytes:
            raise KVBudgetExceeded(needed, resident, self.kv_budget_bytes)

    def memory(self) -> EngineMemory:
        """Bytes by place; a cache or snapshot shared by forks counts once."""
        resident = host = tokens = n_resident = 0
        seen: set[int] = set()
        sessions = list(self._sessions)
        for s in sessions:
            tokens += len(s)
            if s._ref is None:
                continue
            size = 0
            for obj, nbytes in [(s._ref, s.kv_bytes)] + [(snap, partial(tree_bytes, snap))
                                                        for snap in s._snapshots]:
                if id(obj) not in seen:
                    seen.add(id(obj))
                    size += nbytes()
            if s.location == "device":
                resident += size
                n_resident += 1
            else:
                host += size
        return EngineMemory(resident, host, self.kv_budget_bytes, len(sessions), n_resident, tokens,
                            self.kv_bytes_per_token)

    # ---- decoding ---------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None and self.cfg.vocab_size == 129280:
            try:
                from encoding import Tokenizer

                self._tokenizer = Tokenizer.default()
            except ImportError:
                pass
        return self._tokenizer

    async def generate_batch(self, sessions: Sequence[Session],
                             params: SamplingParams | Sequence[SamplingParams] | None = None,
                             **sampling: Any) -> AsyncIterator[tuple[int, int]]:
        """Decode several sessions together, one batched forward per step; yields
        (index into `sessions`, token id) as tokens are drawn. `params` is one SamplingParams for
        all, one per session, or given as keyword arguments (max_tokens=, temperature=, ...).
        The sessions are busy until the iterator ends: to stop early, close it
        (`async with contextlib.aclosing(it)`)."""
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
        decode = self.tokenizer.decode if any(p.stop_strings for p in plist) and self.tokenizer else None
        with ExitStack() as guards:
            for s in sessions:
                guards.enter_context(s._exclusive())
            await anyio.to_thread.run_sync(self._start_decode, sessions)
            states = [DecodeState(p, make_generator(p.seed, self.device),
                                  StopChecker(p, self.eos_token_ids, decode)) for p in plist]
            active = list(range(len(sessions)))
            while active:
                for i in active:  # the drawn token joins the session: it must fit
                    self.reserve(sessions[i], 1)
                logits = torch.stack([sessions[i]._last_logits for i in active])
                drawn = sample_next(logits, [states[i].params for i in active],
                                    [states[i].generator for i in active],
                                    [states[i].generated for i in active])
                still = []
                self._push_tokens([sessions[i] for i in active], drawn)
                for i, token in zip(active, drawn):
                    st, s = states[i], sessions[i]
                    st.generated.append(token)
                    st.finish_reason = s.finish_reason = st.checker.push(token)
                    if st.finish_reason is None:
                        still.append(i)
                for i, token in zip(active, drawn):
                    yield i, token
                active = still
                if active:
                    await anyio.to_thread.run_sync(self._decode_step, [sessions[i] for i in active])

    def _push_tokens(self, sessions: Sequence[Session], tokens: Sequence[int]) -> None:
        """The drawn tokens join their sessions (pending until fed). A method of its own because
        tensor parallel rank 0 sends them to the other ranks here (dsv4/spmd.py)."""
        for s, token in zip(sessions, tokens):
            s._tokens.append(token)

    def _start_decode(self, sessions: Sequence[Session]) -> None:
        """Bring every session to 'nothing pending, last logits known' and snapshot the turn."""
        for s in sessions:
            s._ensure_resident()
            turn_snapshot = s._ref.cache.fixed_nbytes() + 4 * self.cfg.vocab_size
            self.reserve(s, 1, extra_bytes=turn_snapshot)
        for s in sessions:
            s._flush()
            s._maybe_snapshot(force=True)

    def _decode_step(self, sessions: Sequence[Session]) -> None:
        """Feed each session's newest (pending) token in one batched forward."""
        for s in sessions:
            s._own_cache()
        logits = self.forward([[s._tokens[-1]] for s in sessions], [s._ref.cache for s in sessions])
        for s, row in zip(sessions, logits):
            s._last_logits = row
            s._maybe_snapshot()


def cache_growth_bytes(cache: Any, chunks: Iterable[tuple[int, int]]) -> int:
    """Bytes the cache's growing buffers will add when fed these chunks: each buffer grows as
    `GrowingRows.append` does (capacity doubles, at least to the rows needed)."""
    buffers = []
    for layer, ratio in zip(cache.layers, cache.cfg.compress_ratios):
        for rows in (layer.compressed, layer.indexer_keys):
            if rows is not None:
                buffers.append([rows, ratio, rows.data.shape[0]])
    grown = 0
    for _, stop in chunks:
        for buf in buffers:
            rows, ratio, capacity = buf
            need = stop // ratio
            if need > capacity:
                new = min(rows.max_rows, max(need, 2 * capacity, 16))
                grown += (new - capacity) * rows.width * rows.data.element_size()
                buf[2] = new
    return grown


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
