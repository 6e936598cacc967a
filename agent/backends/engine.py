"""The embedded engine backend: one resident `dsv4.Session` for the whole run.

Each turn feeds the session only the ids the loop appends (tool results, notices): the KV cache of
everything before stays resident and is never recomputed. What `prefill` reports comes from the
session itself (`cached_length` before and after), so the counts are measured, not assumed.

Several backends over one `dsv4.Engine` (concurrent `Agent.run` in one process, sub-agents, a batch of
tasks) go through its one scheduler: their decode steps run as one batch, their prefills in chunks
between those steps, and when the engine's KV budget is full idle sessions wait in host memory.

`forced=[completion, ...]` makes the engine decode a given completion per turn: a logits processor
masks every logit but the next scripted token. The engine still runs every forward (prefill and one
decode step per token, with its KV cache); only the choice of token is overridden. This is how the
demo drives a real multi-turn task through a model with random weights, which could not write one.

`make_room` serves several backends on one engine (`dsv4-agent mcp`): when the engine's KV budget
refuses this session's prefill or the start of a decode, it is called to free device memory (the
owner spills an idle session) and the refused step is tried again; it returns False when nothing
can be freed, and the run then ends with context_full.

At the end of a call the loop saves the session (`save_session`), and `restore` loads it back when
its token ids are exactly the history's, instead of prefilling the history again.

`constrain=True` (the default) applies `encoding.DSMLConstraint` while decoding: tool calls can only
name the tools the prompt declares, with their parameters and string flags, and close properly
(`ConstrainedDecoding` masks the logits at those points; free text stays free). The tools are read
from the prompt's own "## Tools" block, so the grammar is exactly what the model was shown. Forced
turns are not constrained.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator, Sequence

import anyio

from agent.backends.base import ContextFull
from agent.backends.scripted import ScriptExhausted

if TYPE_CHECKING:
    from encoding import DSMLConstraint, JSONConstraint, Tokenizer


class ForcedTokens:
    """A logits processor that emits one scripted completion per turn, and measures the model on it."""

    def __init__(self, completions: Sequence[str | list[int]]) -> None:
        self.completions = list(completions)
        self.turn = 0
        self.ids: list[int] = []
        self.logprob_sum = 0.0
        self.model_agreed = 0  # steps where the model's own argmax was the forced token
        self.steps = 0

    def start_turn(self, tokenizer: Tokenizer) -> None:
        if self.turn >= len(self.completions):
            raise ScriptExhausted(
                f"the forced script holds {len(self.completions)} completions; turn {self.turn + 1} asked for another"
            )
        script = self.completions[self.turn]
        self.turn += 1
        self.ids = list(script) if isinstance(script, list) else tokenizer.encode(script)
        if not self.ids or self.ids[-1] != tokenizer.eos_id:
            self.ids.append(tokenizer.eos_id)
        self.logprob_sum, self.model_agreed, self.steps = 0.0, 0, 0

    def __call__(self, generated: list[int], logits):  # (ids so far, logits[V]) -> logits[V]
        import torch

        target = self.ids[min(len(generated), len(self.ids) - 1)]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        self.logprob_sum += float(logprobs[target])
        self.model_agreed += int(int(torch.argmax(logits)) == target)
        self.steps += 1
        forced = torch.full_like(logits, float("-inf"))
        forced[target] = 0.0
        return forced

    def info(self) -> dict[str, Any]:
        if not self.steps:
            return {}
        return {
            "forced_tokens": self.steps,
            "model_mean_logprob_of_forced": round(self.logprob_sum / self.steps, 3),
            "model_argmax_agreed": self.model_agreed,
        }


class ConstrainedDecoding:
    """A logits processor applying a `DSMLConstraint` (or a `JSONConstraint`, which has the same
    interface): -inf outside the allowed ids at choice points, the few grammar-breaking special
    tokens removed (or redirected) in free text."""

    def __init__(self, constraint: DSMLConstraint | JSONConstraint) -> None:
        self.constraint = constraint
        self._masks: dict[int, tuple[tuple[int, ...], Any]] = {}  # id(ids) -> (ids, index tensor)
        self.start_turn(thinking=True)

    def start_turn(self, thinking: bool) -> None:
        self.constraint.reset(thinking)
        self.fed = 0
        self.constrained_steps = 0

    def __call__(self, generated: list[int], logits):  # (ids so far, logits[V]) -> logits[V]
        import torch

        for token in generated[self.fed:]:
            self.constraint.feed(token)
        self.fed = len(generated)
        allowed = self.constraint.allowed()
        if allowed is not None:
            self.constrained_steps += 1
            index = self._index(allowed, logits.device)
            out = torch.full_like(logits, float("-inf"))
            out[index] = logits[index]
            return out
        rule = self.constraint.free_rule()
        if rule is None:
            return logits
        out = logits.clone()
        if rule.redirect:
            moved = self._index(rule.redirect, logits.device)
            mass = torch.logsumexp(torch.cat([logits[rule.redirect_to : rule.redirect_to + 1], logits[moved]]), dim=0)
            out[rule.redirect_to] = mass
            out[moved] = float("-inf")
        out[self._index(rule.banned, logits.device)] = float("-inf")
        return out

    def _index(self, ids: tuple[int, ...], device):
        # The constraint hands out the same cached tuples for the same point: one tensor per tuple.
        entry = self._masks.get(id(ids))
        if entry is None or entry[0] is not ids or entry[1].device != device:
            import torch

            entry = self._masks[id(ids)] = (ids, torch.tensor(ids, dtype=torch.long, device=device))
        return entry[1]

    def info(self) -> dict[str, Any]:
        return {
            "constrained_steps": self.constrained_steps,
            "constraint_released": self.constraint.released,
        }


class EngineBackend:
    """`EngineBackend(dsv4.Engine(...))`: Think Max decoding on one resident session.

    Sampling follows the model card (temperature 1.0, top_p 1.0) unless set; `seed` makes it
    reproducible. `forced` is for demos and tests only (see the module docstring). `constrain`
    turns DSML-constrained decoding on (when the prompt declares tools) or off.
    """

    def __init__(
        self,
        engine: Any,
        *,
        device: str = "cpu",
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        kv_fp8: bool = False,
        forced: Sequence[str | list[int]] | None = None,
        constrain: bool = True,
        label: str | None = None,
        tp: int = 1,
        make_room: Callable[[], bool] | None = None,
    ) -> None:
        # `engine` is a dsv4.Engine, or a checkpoint path loaded on `device` by start() (interruptible).
        self.engine = None if isinstance(engine, (str, os.PathLike)) else engine
        self.checkpoint = None if self.engine is not None else str(engine)
        self.device = device
        self.tp = tp  # tensor-parallel ranks for a checkpoint path (dsv4.Engine(path, tp=N))
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.kv_fp8 = kv_fp8  # for a checkpoint path; an Engine passed in keeps its own KV format
        self.forced = ForcedTokens(forced) if forced is not None else None
        self.constrain = constrain
        self.make_room = make_room
        self.constrained: ConstrainedDecoding | None = None  # built from the prompt's tools block
        where = f"on {self.engine.device}" if self.engine is not None else f"{self.checkpoint} on {device}"
        self.label = label or f"embedded dsv4 engine ({where}), one resident KV session"
        self.session = None
        self._tokenizer: Tokenizer | None = None
        self._turn = 0

    async def start(self, tokenizer: Tokenizer) -> None:
        if self.engine is None:
            self.engine = await anyio.to_thread.run_sync(self._load, abandon_on_cancel=True)
        if self.engine.cfg.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"the model's vocabulary ({self.engine.cfg.vocab_size}) is smaller than the tokenizer's "
                f"({tokenizer.vocab_size}): this checkpoint cannot read DSV4 chat tokens"
            )
        self._tokenizer = tokenizer
        self.session = await self._making_room(self._new_session)

    def _load(self) -> Any:
        return load_engine(self.checkpoint, device=self.device, kv_fp8=self.kv_fp8, tp=self.tp)

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.session.tokens if self.session is not None else ()

    async def prefill(self, ids: Sequence[int]) -> tuple[int, int]:
        if self.constrain and self.forced is None and len(self.session) == 0:
            self._constrain_to(ids)
        before = self.session.cached_length
        # The last token of the previous turn (drawn, never fed) is pending: it is computed here too.
        # A spilled session comes back to the device here.
        await self._making_room(lambda: self.session.aappend(list(ids)))
        return self.session.cached_length - before, before

    async def _new_session(self) -> Any:
        # in a worker thread: the engine's scheduler may make it wait (KV memory held by other runs)
        return await anyio.to_thread.run_sync(self.engine.new_session)

    async def _making_room(self, attempt: Callable[[], Any]) -> Any:
        """`await attempt()`, tried again after `make_room` while the KV budget refuses it (a refusal
        changes nothing); the engine's limits otherwise end the run as ContextFull."""
        from dsv4 import KVBudgetExceeded

        while True:
            try:
                with _context_full_on_limits():
                    return await attempt()
            except ContextFull as e:
                if not (isinstance(e.__cause__, KVBudgetExceeded) and self._room_made()):
                    raise

    def _room_made(self) -> bool:
        return self.make_room is not None and self.make_room()

    async def decode(self, max_tokens: int) -> AsyncIterator[int]:
        from contextlib import aclosing

        processors = ()
        if self.forced is not None:  # a scripted turn: nothing for the constraint to decide
            self.forced.start_turn(self._tokenizer)
            processors = (self.forced,)
        elif self.constrained is not None:
            self.constrained.start_turn(thinking=self.session.tokens[-1] == self._tokenizer.think_start_id)
            processors = (self.constrained,)
        from dsv4 import KVBudgetExceeded

        seed = None if self.seed is None else self.seed + self._turn  # reproducible, not the same draw each turn
        self._turn += 1
        drawn = 0
        while True:
            tokens = self.session.generate(
                max_tokens=max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                seed=seed,
                logits_processors=processors,
            )
            try:
                async with aclosing(tokens):  # releases the session even when the loop stops early
                    with _context_full_on_limits():
                        async for token in tokens:
                            drawn += 1
                            yield token
                return
            except ContextFull as e:  # refused before the first token, the session is unchanged: make room, retry
                if drawn or not (isinstance(e.__cause__, KVBudgetExceeded) and self._room_made()):
                    raise

    def turn_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"session_tokens": len(self.session), "kv_bytes": self.session.kv_bytes()}
        if self.forced is not None:
            info.update(self.forced.info())
        if self.constrained is not None:
            info.update(self.constrained.info())
        return info

    def _constrain_to(self, prompt: Sequence[int]) -> None:
        """Build the constraint from the tools the prompt renders (none: decoding stays free). Only the
        text before the first assistant turn counts: a tool result may quote a tools block."""
        from encoding import DSMLConstraint, tools_from_prompt

        prompt = list(prompt)
        if self._tokenizer.assistant_id in prompt:
            prompt = prompt[: prompt.index(self._tokenizer.assistant_id)]
        tools = tools_from_prompt(self._tokenizer.decode(prompt))
        self.constrained = ConstrainedDecoding(DSMLConstraint(self._tokenizer, tools)) if tools else None

    async def restore(self, history: Sequence[int], turns_done: int, saved: Path | None = None) -> int:
        if self.session is not None:
            self.session.close()
            self.session = None
        computed = 0
        if history:
            if self.constrain and self.forced is None:
                self._constrain_to(history)
            if saved is not None:
                self.session = await anyio.to_thread.run_sync(self._load_saved, saved, list(history))
        if self.session is None:
            self.session = await self._making_room(self._new_session)
            if history:
                await self.prefill(history)  # the one full prefill a resume costs
                computed = self.session.cached_length
        self._turn = turns_done
        if self.forced is not None:
            self.forced.turn = turns_done
        return computed

    def _load_saved(self, folder: Path, history: list[int]) -> Any | None:
        """The session saved in `folder` if it holds exactly `history` and fits this engine; else None."""
        from dsv4 import EngineError
        from dsv4.runtime.session_io import read_manifest

        try:
            if read_manifest(folder)["token_ids"] != history:
                return None
            return self.engine.load_session(folder)
        except (EngineError, OSError, ValueError):  # absent, another model or KV format, over the KV budget
            return None

    async def save_session(self, folder: Path, max_bytes: int) -> bool:
        """Write the session into `folder` (dsv4 `Session.save`) if it takes at most `max_bytes`."""
        session = self.session
        if session is None or not len(session) or session.kv_bytes() + session.snapshot_bytes() > max_bytes:
            return False
        await anyio.to_thread.run_sync(session.save, folder)
        return True

    async def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
        if self.checkpoint is not None and self.engine is not None and self.engine.tp > 1:
            # a tensor-parallel engine this backend loaded: stop its ranks (processes) now, not whenever
            # the engine happens to be collected; start() loads it again
            await anyio.to_thread.run_sync(self.engine.shutdown)
            self.engine = None


def load_engine(
    checkpoint: str, *, device: str, kv_fp8: bool = False, tp: int = 1, kv_budget_bytes: int | None = None
) -> Any:
    """A `dsv4.Engine` on a checkpoint, as the agent runs it: CPU in float32 (no fast bf16 matmuls
    there), GPUs in bfloat16 like the release."""
    import torch

    from dsv4 import Engine

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    return Engine(checkpoint, device=device, dtype=dtype, kv_fp8=kv_fp8, tp=tp, kv_budget_bytes=kv_budget_bytes)


@contextmanager
def _context_full_on_limits() -> Iterator[None]:
    """The engine's length and KV-budget errors, as the loop's `ContextFull` (the session is unchanged)."""
    from dsv4.runtime.errors import ContextLengthExceeded, KVBudgetExceeded

    try:
        yield
    except (ContextLengthExceeded, KVBudgetExceeded) as e:
        raise ContextFull(str(e)) from e
