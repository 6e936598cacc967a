"""Errors the engine raises. Each is raised before the operation it refuses changes anything (a decode
that ends with one keeps the tokens it yielded), so nothing is lost."""
from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class ContextLengthExceeded(EngineError):
    """Appending would take a session past the model's (or the engine's) maximum length."""

    def __init__(self, current: int, adding: int, limit: int):
        self.current, self.adding, self.limit = current, adding, limit
        super().__init__(
            f"session holds {current} tokens; adding {adding} would reach {current + adding}, "
            f"past the maximum context length of {limit} tokens"
        )


class KVBudgetExceeded(EngineError):
    """Growing a session's KV cache would take the engine's resident KV past its byte budget."""

    def __init__(self, needed: int, resident: int, budget: int):
        self.needed, self.resident, self.budget = needed, resident, budget
        super().__init__(
            f"KV budget exceeded: {needed:,} more bytes needed with {resident:,} bytes resident, "
            f"budget {budget:,} bytes (spill or close a session, or raise Engine(kv_budget_bytes=...))"
        )


class SessionMismatch(EngineError):
    """A saved session was made by a different model (fingerprint or config differs)."""


class SessionFormatError(EngineError):
    """A saved session is missing files, has an unknown format version or inconsistent contents."""


class SessionStateError(EngineError):
    """An operation that the session's current state does not allow (closed, nothing to decode from...)."""


class EngineBusy(EngineError):
    """The request needs KV memory that running requests hold, and cannot wait for it: too many
    requests wait already (`RuntimeOptions.max_waiting`), or it is a call that never waits (a new
    or loaded session). Nothing was changed; try again later."""

    def __init__(self, detail: str):
        super().__init__(f"the engine is busy: the KV memory is held by running requests ({detail}); "
                         f"try again later")


class DeadlineExceeded(EngineError, TimeoutError):
    """A request's deadline passed before it finished; what it produced until then is kept."""
