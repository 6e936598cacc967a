"""A backend that "decodes" pre-written completions: reproducible tests, demos and `replay`.

Each turn takes the next completion text, tokenizes it with the real DSV4 tokenizer and yields the ids
one by one, so the loop runs its real path: incremental detokenization, the streaming DSML parser,
token accounting, `AppendOnlyEncoder.record_completion`. No model is involved, and the label says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Sequence

import anyio

if TYPE_CHECKING:
    from encoding import Tokenizer

EOS_TEXT = "<｜end▁of▁sentence｜>"


class ScriptExhausted(RuntimeError):
    """The loop asked for more turns than the script holds."""


class ScriptedBackend:
    """`ScriptedBackend(["reasoning</think>answer", ...])`: turn i decodes completion i (EOS added if missing).

    A completion is what the model writes after the prompt's `<think>`: reasoning, `</think>`, content,
    then optionally a `<｜DSML｜tool_calls>` block (see `completion()`). A completion may also be a list
    of token ids, decoded exactly as given: `replay` feeds a run's recorded ids back this way.
    `token_delay_s` paces the stream for demos.
    """

    def __init__(self, completions: Sequence[str | list[int]], *, token_delay_s: float = 0.0) -> None:
        if isinstance(completions, str):
            raise TypeError("ScriptedBackend takes a list of completion texts, not one string")
        self.completions = list(completions)
        self.token_delay_s = token_delay_s
        self.label = f"scripted backend ({len(self.completions)} pre-written completions; no model)"
        self.turn = 0
        self.tokens: list[int] = []  # what a real session would hold: its length is what `prefill` reports as reused
        self._tokenizer: Tokenizer | None = None

    async def start(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    async def prefill(self, ids: Sequence[int]) -> tuple[int, int]:
        reused = len(self.tokens)
        self.tokens += ids
        await anyio.lowlevel.checkpoint()
        return len(ids), reused

    def turn_info(self) -> dict:
        return {}

    async def decode(self, max_tokens: int) -> AsyncIterator[int]:
        if self._tokenizer is None:
            raise RuntimeError("ScriptedBackend.decode before start()")
        if self.turn >= len(self.completions):
            raise ScriptExhausted(
                f"the script holds {len(self.completions)} completions; turn {self.turn + 1} asked for another"
            )
        script = self.completions[self.turn]
        self.turn += 1
        ids = list(script) if isinstance(script, list) else self._tokenizer.encode(script)
        if not ids or ids[-1] != self._tokenizer.eos_id:
            ids.append(self._tokenizer.eos_id)
        for token in ids[:max_tokens]:
            if self.token_delay_s:
                await anyio.sleep(self.token_delay_s)
            else:
                await anyio.lowlevel.checkpoint()
            self.tokens.append(token)
            yield token

    async def restore(self, history: Sequence[int], turns_done: int, saved: Path | None = None) -> int:
        self.tokens = list(history)
        self.turn = turns_done
        return len(history)

    async def close(self) -> None:
        return None


def completion(
    reasoning: str = "", *, content: str = "", calls: Sequence[tuple[str, dict]] = (), thinking: bool = True
) -> str:
    """A completion text in the DSV4 format: `reasoning</think>content` plus a DSML tool-call block.

    `calls` are (tool name, arguments) pairs, rendered by the encoding package exactly as the model
    writes them. With `thinking=False` (chat mode, effort "none") there is no reasoning part.
    """
    from encoding.dsml import render_tool_calls

    head = f"{reasoning}</think>" if thinking else ""
    return head + content + (render_tool_calls(list(calls)) if calls else "")
