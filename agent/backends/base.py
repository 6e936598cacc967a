"""What the loop needs from whatever produces tokens: append ids to a resident session, decode new ones.

The loop speaks token ids, never messages: it appends only the ids of what is new since the last turn
(`AppendOnlyEncoder.append`), so a backend that keeps its KV cache never recomputes the history.
"""

from __future__ import annotations

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

    async def start(self, tokenizer: Tokenizer) -> None:
        """Acquire resources (load weights, open a session); called once before the first prefill."""

    async def prefill(self, ids: Sequence[int]) -> tuple[int, int]:
        """Append `ids` to the session; returns (tokens computed now, tokens already resident and reused)."""

    def decode(self, max_tokens: int) -> AsyncIterator[int]:
        """Generate up to `max_tokens` ids after the session's tokens, stopping after EOS (yielded)."""

    def turn_info(self) -> dict[str, Any]:
        """Backend facts about the last turn for the trajectory (KV bytes, forced-token statistics...)."""

    async def restore(self, history: Sequence[int], turns_done: int) -> None:
        """Rebuild the session of an interrupted run: `history` holds every id so far, `turns_done` counts
        the decoded turns."""

    async def close(self) -> None:
        """Release resources; safe to call twice."""
