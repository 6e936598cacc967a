"""Next-token sampling: parameters, logits masks, the sampler and the stop rules.

Order per step (as vLLM/HF do): logits processors -> temperature -> top-k -> top-p -> draw.
A draw is the exponential-race form of multinomial sampling, argmax(p / E) with E ~ Exp(1), drawn
from a per-row torch.Generator so that a seed fixes the whole sequence of tokens of that row.
Temperature 0 is greedy (argmax of the processed logits).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

# (generated_ids, logits[V]) -> logits[V]; the hook for grammar constraints and biases.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is decoded. `stop` mixes stop strings (str) and stop token ids (int)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str | int, ...] = ()
    ignore_eos: bool = False
    logits_processors: tuple[LogitsProcessor, ...] = ()

    def __post_init__(self):
        if isinstance(self.stop, (str, int)):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "logits_processors", tuple(self.logits_processors or ()))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        for s in self.stop:
            if isinstance(s, bool) or not isinstance(s, (str, int)) or s == "":
                raise ValueError(f"stop entries must be non-empty strings or token ids, got {s!r}")
        for p in self.logits_processors:
            if not callable(p):
                raise ValueError(f"logits_processors must be callables, got {p!r}")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(s for s in self.stop if isinstance(s, str))

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return frozenset(s for s in self.stop if isinstance(s, int))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def top_k_mask(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k largest logits (ties with the k-th value kept too), -inf elsewhere.

    logits: [B, V] float; k: [B] int64, 0 = keep all. Returns a new [B, V] tensor.
    """
    vocab = logits.shape[-1]
    k = torch.where((k <= 0) | (k > vocab), torch.full_like(k, vocab), k)
    kth = torch.topk(logits, int(k.max()), dim=-1).values.gather(-1, (k - 1)[:, None])  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_mask(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Nucleus mask: keep the smallest set of most likely tokens whose probability reaches p.

    A token stays if the probability mass strictly before it (in descending order) is < p, so the
    most likely token always stays. logits: [B, V]; p: [B] float in (0, 1]. Returns [B, V].
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # [B, V]
    drop_sorted = mass_before >= p[:, None].float()
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator on `device`; seed None draws a fresh seed from the OS."""
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1 if seed is None else seed)
    return g


def sample_next(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    generated: Sequence[list[int]],
) -> list[int]:
    """One token per row. logits: [B, V] (any float dtype); row b follows params[b]."""
    logits = logits.float()
    if any(p.logits_processors for p in params):
        logits = torch.stack([process_logits(logits[b], p, generated[b]) for b, p in enumerate(params)])
    return draw(logits, params, generators)


def process_logits(row: torch.Tensor, params: SamplingParams, generated: list[int]) -> torch.Tensor:
    """One row's logits [V] through its logits processors, in order."""
    for proc in params.logits_processors:
        row = proc(generated, row)
    return row


def draw(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]) -> list[int]:
    """One token per row from logits [B, V] already through their processors: greedy rows take
    the argmax; the others go through temperature, top-k, top-p, then the draw (only they pay for it)."""
    logits = logits.float()
    device = logits.device
    chosen = torch.argmax(logits, dim=-1)
    rows = [b for b, p in enumerate(params) if not p.greedy]
    if not rows:
        return chosen.tolist()
    index = torch.tensor(rows, device=device)
    sub = [params[b] for b in rows]
    scaled = logits[index] / torch.tensor([p.temperature for p in sub], device=device)[:, None]
    if any(p.top_k > 0 for p in sub):
        scaled = top_k_mask(scaled, torch.tensor([p.top_k for p in sub], device=device))
    if any(p.top_p < 1 for p in sub):
        scaled = top_p_mask(scaled, torch.tensor([p.top_p for p in sub], device=device))
    probs = torch.softmax(scaled, dim=-1)  # [R, V]
    races = torch.stack([torch.empty_like(probs[i]).exponential_(generator=generators[b])
                         for i, b in enumerate(rows)])
    chosen[index] = torch.argmax(probs / races, dim=-1)
    return chosen.tolist()


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8.

    Each step decodes only the tokens since the last emitted boundary (with the previous chunk as
    context, so tokenizers that treat a leading piece specially decode it the same way).
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # start of the context chunk
        self._read = 0  # ids before this are already emitted as text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        context = self._decode(self.ids[self._prefix:self._read])
        full = self._decode(self.ids[self._prefix:])
        if len(full) <= len(context) or full.endswith("\ufffd"):
            return ""  # no complete character yet
        self._prefix, self._read = self._read, len(self.ids)
        return full[len(context):]


class StopChecker:
    """Decides after each generated token whether the sequence is finished, and why.

    finish reasons: "stop" (EOS, a stop token id, or a stop string completed by this token) and
    "length" (max_tokens reached). Stop strings are matched on the decoded text, so they are
    found even when split across token boundaries; the completing token is kept in the output.
    """

    def __init__(self, params: SamplingParams, eos_token_ids: Iterable[int],
                 decode: Callable[[list[int]], str] | None):
        self.params = params
        self.stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self.stop_ids |= set(eos_token_ids)
        self.stop_strings = params.stop_strings
        if self.stop_strings and decode is None:
            raise ValueError("stop strings need a tokenizer: pass Engine(..., tokenizer=...)")
        self._detok = IncrementalDetokenizer(decode) if self.stop_strings else None
        self._longest = max((len(s) for s in self.stop_strings), default=0)
        self.text = ""
        self.count = 0
        self.matched: str | int | None = None

    def push(self, token_id: int) -> str | None:
        """Record one generated token; return the finish reason or None to continue."""
        self.count += 1
        if token_id in self.stop_ids:
            self.matched = token_id
            return "stop"
        if self._detok is not None:
            delta = self._detok.push(token_id)
            if delta:
                start = max(0, len(self.text) - self._longest + 1)
                self.text += delta
                window = self.text[start:]
                for s in self.stop_strings:
                    if s in window:
                        self.matched = s
                        return "stop"
        if self.count >= self.params.max_tokens:
            return "length"
        return None


@dataclass
class DecodeState:
    """Per-row bookkeeping of one sequence being decoded."""

    params: SamplingParams
    generator: torch.Generator
    checker: StopChecker
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
