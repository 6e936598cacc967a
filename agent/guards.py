"""The loop's stop rules: budgets (steps, tokens, wall time), consecutive format errors, stuck detection.

Each rule raises `RunStopped` with its status; the loop catches it in one place.
"""

from __future__ import annotations

import json
import time

from agent.config import AgentConfig
from agent.status import ExitStatus, RunStopped
from agent.trajectory import ParsedCall, Usage


class Budget:
    """Steps, tokens and wall time. The wall-clock deadline is also enforced by a cancel scope in the loop.

    A run and a resume count every step and token of the run; a reply counts its own, past
    `steps_before` steps and `tokens_before` computed tokens.
    """

    def __init__(
        self, config: AgentConfig, started: float | None = None, *, steps_before: int = 0, tokens_before: int = 0
    ) -> None:
        self.config = config
        self.started = time.monotonic() if started is None else started
        self.steps_before = steps_before
        self.tokens_before = tokens_before

    @property
    def deadline(self) -> float | None:
        """A `time.monotonic()` deadline for the loop's cancel scope, or None."""
        return None if self.config.max_wall_s is None else self.started + self.config.max_wall_s

    def before_step(self, step: int, usage: Usage) -> None:
        if step - self.steps_before > self.config.max_steps:
            raise RunStopped(ExitStatus.max_steps, f"step budget spent ({self.config.max_steps} steps)")
        self.check_tokens(usage)

    def check_tokens(self, usage: Usage) -> None:
        limit = self.config.max_tokens
        spent = usage.processed - self.tokens_before
        if limit is not None and spent >= limit:
            raise RunStopped(ExitStatus.max_tokens, f"token budget spent ({spent} of {limit} tokens computed)")

    def decode_cap(self, usage: Usage) -> int:
        """How many tokens the next turn may decode: the per-turn cap, or what is left of the budget."""
        cap = self.config.max_turn_tokens
        if self.config.max_tokens is not None:
            cap = min(cap, self.config.max_tokens - (usage.processed - self.tokens_before))
        return max(cap, 0)


class FormatErrors:
    """Counts consecutive turns with a malformed call, an empty answer or a cut-off decode."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.consecutive = 0

    def record(self, turn_had_error: bool) -> None:
        self.consecutive = self.consecutive + 1 if turn_had_error else 0
        if self.consecutive >= self.limit:
            raise RunStopped(
                ExitStatus.format_error, f"{self.consecutive} consecutive turns with malformed or empty output"
            )


class StuckDetector:
    """Stops a run whose last `repeats` turns made exactly the same tool calls (names and arguments)."""

    def __init__(self, repeats: int) -> None:
        self.repeats = repeats
        self.history: list[str] = []

    def record(self, calls: list[ParsedCall]) -> None:
        signature = json.dumps([(c.name, c.arguments, c.error) for c in calls], sort_keys=True, default=str)
        self.history.append(signature)
        tail = self.history[-self.repeats :]
        if len(tail) == self.repeats and len(set(tail)) == 1:
            names = ", ".join(c.name for c in calls)
            raise RunStopped(ExitStatus.stuck, f"the same tool calls ({names}) repeated {self.repeats} turns in a row")
