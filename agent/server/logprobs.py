"""`logprobs` / `top_logprobs`: what the model's distribution gave each generated token, in OpenAI's shapes.

`LogprobRecorder` is a logits processor placed last in the chain: it records each step's
log-probabilities after the constraints (a token a grammar forbids has none) and before temperature
and top_p, i.e. the distribution the token was drawn from at temperature 1 (vLLM's
"processed_logits" mode). The server takes one record per yielded token, in order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the most likely ids of that step, most likely first


class LogprobRecorder:
    def __init__(self, top: int) -> None:
        self.top = top
        self._steps: deque = deque()

    def start_turn(self) -> None:
        self._steps.clear()

    def __call__(self, generated: list[int], logits: Any) -> Any:  # (ids so far, logits[V]) -> logits[V]
        import torch

        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(logprobs, self.top) if self.top else None
        self._steps.append((logprobs, top))
        return logits

    def take(self, token: int) -> TokenLogprob:
        """The record of the step that drew `token` (the oldest one not taken yet)."""
        logprobs, top = self._steps.popleft()
        pairs = () if top is None else zip(top.values.tolist(), top.indices.tolist(), strict=True)
        alternatives = tuple((int(i), float(v)) for v, i in pairs if v != float("-inf"))
        # a token no constraint allowed cannot be drawn; -9999 (vLLM's floor) keeps the JSON finite regardless
        return TokenLogprob(token, max(float(logprobs[token]), -9999.0), alternatives)


class LogprobFormatter:
    """Token strings and bytes for the JSON shapes: a token's text is its own decoding (a piece of a
    multi-byte character reads as U+FFFD; `bytes` has the exact bytes)."""

    def __init__(self, tokenizer: Any) -> None:
        from encoding.constrain import token_bytes

        self.tokenizer = tokenizer
        self.bytes_of = token_bytes(tokenizer)

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def bytes(self, token: int) -> list[int]:
        raw = self.bytes_of[token] if 0 <= token < len(self.bytes_of) else None
        return list(raw if raw is not None else self.text(token).encode())

    def chat(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        """`choices[i].logprobs` of a chat completion (or of one chunk)."""
        def one(token: int, logprob: float) -> dict[str, Any]:
            return {"token": self.text(token), "logprob": logprob, "bytes": self.bytes(token)}

        content = [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]
        return {"content": content, "refusal": None}

    def completion(self, entries: list[TokenLogprob], offsets: list[int]) -> dict[str, Any]:
        """`choices[i].logprobs` of a (legacy) completion; `offsets`: each token's character offset."""
        return {"tokens": [self.text(e.token) for e in entries],
                "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self.text(t): lp for t, lp in e.top} for e in entries],
                "text_offset": offsets}
