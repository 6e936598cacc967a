"""The agent's backend over HTTP: a `dsv4-agent serve` server (or another OpenAI-compatible one that
takes token-id prompts and returns token ids), through `/v1/completions`.

The session's token list lives here. Each prefill sends the whole list with `max_tokens: 0`; the
server finds its resident session by token-id prefix and computes only the new suffix, and says so
in `usage.prompt_tokens_reused`, which is what `prefill` reports as reused. Each decode sends the
same list again (fully resident by then) and streams the drawn token ids back over SSE.

What another server needs: `prompt` as a list of token ids, `return_token_ids: true` answered with
`choices[0].token_ids` in each streamed chunk (vLLM's field), `max_tokens: 0` accepted as prefill
only, the DSV4 tokenizer. Without `usage.prompt_tokens_reused` every prefill is reported as computed
in full.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.backends.base import ContextFull

if TYPE_CHECKING:
    from encoding import Tokenizer


class RemoteError(RuntimeError):
    """The server refused a request or could not be reached; the message says which and why."""


class RemoteBackend:
    """`RemoteBackend("http://host:8000")`: decode on a remote server; sampling as in `EngineBackend`."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.timeout_s = timeout_s  # per read: a long prefill answers only when it is done
        self.label = f"remote server {self.base_url} (token ids over /v1/completions, prefix-reused sessions)"
        self.tokens: list[int] = []  # the session as the server should hold it
        self.client: Any = None
        self._turn = 0
        self._last: dict[str, Any] = {}

    async def start(self, tokenizer: Tokenizer) -> None:
        import httpx2

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.client = httpx2.AsyncClient(base_url=self.base_url, headers=headers,
                                         timeout=httpx2.Timeout(self.timeout_s, connect=10.0))
        if self.model is None:  # the server's (first) model
            models = await self._call("GET", "/v1/models")
            if not models.get("data"):
                raise RemoteError(f"{self.base_url}/v1/models lists no model")
            self.model = models["data"][0]["id"]

    async def prefill(self, ids: Sequence[int]) -> tuple[int, int]:
        tokens = self.tokens + list(ids)
        answer = await self._call("POST", "/v1/completions", json=self._body(tokens, max_tokens=0))
        self.tokens = tokens  # only once the server holds them
        reused = int(answer.get("usage", {}).get("prompt_tokens_reused", 0))
        self._last = {"prompt_tokens_reused": reused}
        return len(tokens) - reused, reused

    async def decode(self, max_tokens: int) -> AsyncIterator[int]:
        seed = None if self.seed is None else self.seed + self._turn  # as EngineBackend
        self._turn += 1
        body = {**self._body(self.tokens, max_tokens=max_tokens), "stream": True, "temperature": self.temperature,
                "top_p": self.top_p, "seed": seed}
        try:
            async with self.client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    self._raise_for(response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        self._raise_error(chunk["error"], response.status_code)
                    choice = chunk["choices"][0]
                    if "token_ids" not in choice:
                        raise RemoteError(f"{self.base_url} does not return token ids (return_token_ids)")
                    for token in choice["token_ids"]:
                        self.tokens.append(token)
                        yield token
        except _transport_errors() as e:
            raise RemoteError(f"{self.base_url}: {type(e).__name__}: {e}") from e

    def turn_info(self) -> dict[str, Any]:
        return {"session_tokens": len(self.tokens), "server": self.base_url, **self._last}

    async def restore(self, history: Sequence[int], turns_done: int, saved: Path | None = None) -> int:
        self.tokens, self._turn = [], turns_done
        if not history:
            return 0
        computed, _ = await self.prefill(history)  # the server may still hold it: then nothing is recomputed
        return computed

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    # ---- HTTP -------------------------------------------------------------------------------
    def _body(self, tokens: list[int], max_tokens: int) -> dict[str, Any]:
        return {"model": self.model, "prompt": tokens, "max_tokens": max_tokens, "return_token_ids": True}

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self.client.request(method, path, **kwargs)
        except _transport_errors() as e:
            raise RemoteError(f"{self.base_url}{path}: {type(e).__name__}: {e}") from e
        if response.status_code != 200:
            self._raise_for(response)
        return response.json()

    def _raise_for(self, response: Any) -> None:
        try:
            error = response.json().get("error") or {}
        except ValueError:
            error = {"message": response.text[:500]}
        self._raise_error(error, response.status_code)

    def _raise_error(self, error: dict[str, Any], status: int) -> None:
        message = f"{self.base_url} answered {status}: {error.get('message', error)}"
        if error.get("code") in ("context_length_exceeded", "kv_budget_exceeded"):
            raise ContextFull(message)
        raise RemoteError(message)


def _transport_errors() -> tuple[type[Exception], ...]:
    import httpx2

    return (httpx2.TransportError,)
