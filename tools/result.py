"""What a tool call gives back to the model, and the output cap every tool applies."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

# Default cap on what one tool result may put in the context: ~30 kB keeps a result to a few
# thousand tokens, the cap OpenHands and mini-swe-agent converged on (agent-anchors §1, §3).
DEFAULT_OUTPUT_CAP_BYTES = 30_000


class ToolResult(BaseModel):
    """The outcome of one tool call. Errors are results too: the model reads them and reacts."""

    content: str = Field(description="the text the model sees")
    is_error: bool = Field(default=False, description="the call failed; `content` says why")
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="for the trajectory, not the model: exit codes, timings, truncation"
    )

    @classmethod
    def error(cls, message: str, **metadata: Any) -> ToolResult:
        return cls(content=message, is_error=True, metadata=metadata)


def valid_unicode(text: str) -> str:
    """`text` with every lone surrogate as U+FFFD (and split surrogate pairs joined), so it encodes as
    UTF-8: a tool's str may come from bytes decoded with `surrogateescape` or from JSON `\\ud800` escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def cap_output(text: str, max_bytes: int = DEFAULT_OUTPUT_CAP_BYTES, head_fraction: float = 0.5) -> tuple[str, int]:
    """Keep the head and the tail of `text` within `max_bytes` of UTF-8, stating what was cut.

    Returns (text, elided_bytes); elided_bytes is 0 when nothing was cut. The cut is marked in the
    text itself as "... [N bytes elided] ..." so the model knows output is missing and where.
    Cuts never split a UTF-8 character.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text, 0
    # The marker's own length depends on N; budget for the widest N it can show.
    marker_budget = len(f"\n... [{len(data)} bytes elided] ...\n".encode())
    keep = max(max_bytes - marker_budget, 0)
    head_n = int(keep * head_fraction)
    tail_n = keep - head_n
    head = data[:head_n].decode("utf-8", errors="ignore")
    tail = data[len(data) - tail_n :].decode("utf-8", errors="ignore") if tail_n else ""
    elided = len(data) - len(head.encode()) - len(tail.encode())
    return f"{head}\n... [{elided} bytes elided] ...\n{tail}", elided
