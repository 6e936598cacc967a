"""What the loop needs from whatever produces tokens: append ids to a resident session, decode new ones.

The loop speaks token ids, never messages: it appends only the ids of what is new since the last turn
(`AppendOnlyEncoder.append`), so a backend that keeps its KV cache never recomputes the history.
"""

from __future__ import annotations

from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterator,
    Protocol,
    Sequence,
    runtime_checkable,
)

if TYPE_CHECKING:
    from encoding import Tokenizer


class ContextFull(Exception):
    """The session cannot take more tokens: the model's context length or the KV memory budget is reached.
    The loop ends the run with status `context_full` (the trajectory keeps everything up to it)."""


@runtime_checkable
class Backend(Protocol):
    """A token-level session. Implementations: `EngineBackend` (embedded dsv4 engine), `ScriptedBackend`."""

    label: str  # an honest one-line description shown in the terminal and the trajectory
    tokens: Sequence[int]  # every id the session holds now (prefilled and decoded)

    async def start(self, tokenizer: Tokenizer) -> None:
        """Acquire resources (load weights, open a session); called once before the first prefill."""

    async def prefill(self, ids: Sequence[int]) -> tuple[int, int]:
        """Append `ids` to the session; returns (tokens computed now, tokens already resident and reused)."""

    def decode(self, max_tokens: int) -> AsyncIterator[int]:
        """Generate up to `max_tokens` ids after the session's tokens, stopping after EOS (yielded)."""

    def turn_info(self) -> dict[str, Any]:
        """Backend facts about the last turn for the trajectory (KV bytes, forced-token statistics...)."""

    async def restore(self, history: Sequence[int], turns_done: int, saved: Path | None = None) -> int:
        """Rebuild a run's session in a new one: `history` holds every id so far, `turns_done` counts the
        decoded turns, `saved` is a folder where the run's KV session may have been saved. Returns the
        tokens computed to do it."""

    async def close(self) -> None:
        """Release resources; safe to call twice."""

    # Optional, for a backend that can write its session to disk (EngineBackend):
    #   async def save_session(self, folder: Path, max_bytes: int) -> bool
    # saves the session into `folder` if it takes at most `max_bytes`; the loop calls it when a call
    # ends, and hands the folder back to `restore` as `saved`.
