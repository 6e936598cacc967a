"""The agent's backend over HTTP: an OpenAI-compatible server's `/v1/completions`: `dsv4-agent serve`, or
vLLM / SGLang serving DeepSeek-V4 (the servers people already scale out on).

The session's token list lives here. Each prefill sends the whole list; the server's prefix cache
(our resident sessions, vLLM's and SGLang's prefix caching) computes only what it has not seen, and
the answer's usage says how much it reused. Each decode sends the list again and streams the
completion back.

What the backend uses where the server offers it, and what it falls back to (found out from the
server's answers, once per backend, no configuration):
  * `prompt` as token ids: exact prompts, untrusted text stays text. Otherwise the prompt goes as text
    (`tokenizer.decode`, `add_special_tokens: false`) and the server tokenizes it.
  * `token_ids` in each streamed chunk (`return_token_ids`): the exact drawn ids, token by token.
    Otherwise the text comes back (`skip_special_tokens: false`) and is tokenized here at the end of
    the turn; EOS is appended when the server stopped on it (its text is never in the output).
  * `max_tokens: 0` (prefill only): a prefill that draws nothing. Otherwise `max_tokens: 1`, the drawn
    token dropped.
  * reuse reported (`usage.prompt_tokens_reused`, or `usage.prompt_tokens_details.cached_tokens`: vLLM
    `--enable-prompt-tokens-details`, SGLang `--enable-cache-report`): `prefill`'s reused count.
    Otherwise every prefill is reported as computed in full.

`dsv4-agent serve` and vLLM (>= 0.10.2) offer all four; SGLang takes token-id prompts and returns
`token_ids` in recent versions. With text prompts the remote server tokenizes the content itself: a
special-token string inside a tool result or a user message (`<｜end▁of▁sentence｜>`, `｜DSML｜`)
becomes the special token, so the protection of untrusted text holds only with token-id prompts.
The server does not apply the DSML constraint.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.backends.base import ContextFull

if TYPE_CHECKING:
    from encoding import Tokenizer

# What vLLM and SGLang say when a prompt does not fit (they have no error code for it).
_CONTEXT_FULL = re.compile(r"context length|maximum context|context window|longer than the model", re.IGNORECASE)


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
        self.label = f"remote server {self.base_url} (/v1/completions, its prefix cache)"
        self.tokens: list[int] = []  # the session as the server should hold it
        self.client: Any = None
        self.tokenizer: Tokenizer | None = None
        # What the server turned out to accept; see the module docstring.
        self.token_prompts = True
        self.token_ids_out: bool | None = None  # known after the first decode
        self.prefill_max_tokens = 0
        self._turn = 0
        self._last: dict[str, Any] = {}

    async def start(self, tokenizer: Tokenizer) -> None:
        import httpx2

        self.tokenizer = tokenizer
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
        while True:
            body = self._body(tokens, max_tokens=self.prefill_max_tokens)
            response = await self._send("POST", "/v1/completions", json=body)
            if response.status_code == 200:
                break
            self._adapt_or_raise(response.status_code, _error_of(response), body)
        self.tokens = tokens  # only once the server holds them
        reused = _reused(response.json().get("usage") or {})
        self._last = {"prompt_tokens_reused": reused}
        return len(tokens) - (reused or 0), reused or 0

    async def decode(self, max_tokens: int) -> AsyncIterator[int]:
        seed = None if self.seed is None else self.seed + self._turn  # as EngineBackend
        self._turn += 1
        try:
            while True:
                body = {**self._body(self.tokens, max_tokens=max_tokens), "stream": True,
                        "temperature": self.temperature, "top_p": self.top_p, "seed": seed}
                async with self.client.stream("POST", "/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        await response.aread()
                        self._adapt_or_raise(response.status_code, _error_of(response), body)
                        continue
                    async for token in self._read_stream(response):
                        self.tokens.append(token)
                        yield token
                    return
        except _transport_errors() as e:
            raise RemoteError(f"{self.base_url}: {type(e).__name__}: {e}") from e

    async def _read_stream(self, response: Any) -> AsyncIterator[int]:
        """The drawn ids from the SSE chunks: as they come (`token_ids`), or from the text at the end."""
        texts: list[str] = []
        finish = None
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk or chunk.get("object") == "error":
                self._raise(response.status_code, chunk.get("error", chunk))
            if not chunk.get("choices"):  # a usage chunk
                continue
            choice = chunk["choices"][0]
            if self.token_ids_out is None:
                self.token_ids_out = choice.get("token_ids") is not None
            finish = choice.get("finish_reason") or finish
            if self.token_ids_out:
                for token in choice.get("token_ids") or ():
                    yield token
            else:
                texts.append(choice.get("text") or "")
        if not self.token_ids_out:
            ids = self.tokenizer.encode("".join(texts))
            if finish == "stop" and (not ids or ids[-1] != self.tokenizer.eos_id):
                ids.append(self.tokenizer.eos_id)  # the server stopped on EOS and left its text out
            for token in ids:
                yield token

    def turn_info(self) -> dict[str, Any]:
        return {"session_tokens": len(self.tokens), "server": self.base_url,
                "prompts": "token_ids" if self.token_prompts else "text",
                "output": {True: "token_ids", False: "text", None: "unknown"}[self.token_ids_out], **self._last}

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
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "return_token_ids": True,
                                "skip_special_tokens": False, "spaces_between_special_tokens": False}
        if self.token_prompts:
            body["prompt"] = tokens
        else:  # the same encoding as text; the server must not add a BOS of its own
            body.update(prompt=self.tokenizer.decode(tokens), add_special_tokens=False)
        return body

    def _adapt_or_raise(self, status: int, error: dict[str, Any], body: dict[str, Any]) -> None:
        """Fall back on what a refusal says the server does not take (then the caller retries), or raise."""
        said = f"{error.get('param') or ''} {error.get('message') or ''}"
        if status in (400, 422) and not _context_full(error):
            if body["max_tokens"] == 0 and "max_tokens" in said:
                self.prefill_max_tokens = 1
                return
            if isinstance(body["prompt"], list) and "prompt" in said:
                self.token_prompts = False
                return
        self._raise(status, error)

    async def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return await self.client.request(method, path, **kwargs)
        except _transport_errors() as e:
            raise RemoteError(f"{self.base_url}{path}: {type(e).__name__}: {e}") from e

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = await self._send(method, path, **kwargs)
        if response.status_code != 200:
            self._raise(response.status_code, _error_of(response))
        return response.json()

    def _raise(self, status: int, error: dict[str, Any]) -> None:
        message = f"{self.base_url} answered {status}: {error.get('message', error)}"
        if _context_full(error):
            raise ContextFull(message)
        raise RemoteError(message)


def _error_of(response: Any) -> dict[str, Any]:
    """The error object of a refusal: OpenAI's and vLLM's `{"error": {...}}`, SGLang's top-level one, or text."""
    try:
        body = response.json()
    except ValueError:
        return {"message": response.text[:500]}
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"]
    return body if isinstance(body, dict) else {"message": str(body)[:500]}


def _context_full(error: dict[str, Any]) -> bool:
    return error.get("code") in ("context_length_exceeded", "kv_budget_exceeded") or bool(
        _CONTEXT_FULL.search(str(error.get("message") or "")))


def _reused(usage: dict[str, Any]) -> int | None:
    """Prompt tokens the server had cached, as ours, vLLM and SGLang report it; None when it does not say."""
    if "prompt_tokens_reused" in usage:
        return int(usage["prompt_tokens_reused"])
    details = usage.get("prompt_tokens_details") or {}
    return int(details["cached_tokens"]) if details.get("cached_tokens") is not None else None


def _transport_errors() -> tuple[type[Exception], ...]:
    import httpx2

    return (httpx2.TransportError,)
