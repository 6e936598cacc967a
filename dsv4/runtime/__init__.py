"""The engine and its sessions: the engine owns every sequence's state (`sequence`), one scheduler
thread runs all work on it (`scheduler`: batched decode, chunked prefill under a per-step token
budget, admission by KV bytes, cancellation), sessions are handles onto sequences (`session`),
saved with `session_io`; sampling, runtime options, and the processes of a tensor-parallel
engine (`launch`, `spmd`). Builds on loading/."""
