"""The two errors this package raises on bad input. Both are `ValueError`s."""
from __future__ import annotations


class MessageError(ValueError):
    """A message that cannot be encoded. Names where it is (`messages[3].tool_calls[0]...`) and why."""

    def __init__(self, where: str, problem: str):
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}")


class DSMLParseError(ValueError):
    """Model output that breaks the DSV4 output grammar (strict parsing only).

    `position` is the character offset in the completion text where the problem was found.
    """

    def __init__(self, problem: str, position: int):
        self.problem = problem
        self.position = position
        super().__init__(f"{problem} (at character {position})")
