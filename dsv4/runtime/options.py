"""How the engine runs: prefill chunking, the scheduler's per-step token budget, roll-back points,
the admission queue, and how each forward runs (`ForwardOptions`). One frozen object, given to
`Engine(options=...)` and passed down from there (to every rank of a tensor-parallel engine too);
nothing here changes what the model computes beyond rounding."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from dsv4.network.options import ForwardOptions


class RuntimeOptions(BaseModel):
    """prefill_chunk   tokens a prefill forward takes at most (chunk ends fall on multiples of 128
                    where the chunk is longer than that)
    step_tokens     the scheduler's per-step token budget: every running sequence decodes one
                    token a step, and waiting prompts are prefilled in chunks with what is left
                    (at least min(prefill_chunk, 128) tokens a step while any prompt waits), so a
                    long prefill delays the others' next token by one chunk at most
    snapshot_every  take a roll-back snapshot whenever a sequence's cache length hits a multiple
    max_snapshots   snapshots kept per sequence (the newest)
    restore_after   token ids after whose last occurrence in each appended run of tokens a
                    roll-back point is kept (message boundaries, so a client re-rendering its
                    history differently after the last message start loses nothing before it);
                    None = the tokenizer's `<｜User｜>` and `<｜Assistant｜>` when it has them
    max_waiting     requests that may wait for KV memory held by running ones (first come, first
                    served); those beyond are refused (`EngineBusy`): 0 = never wait
    forward         how each forward runs (attention kernel, score workspaces)"""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prefill_chunk: int = Field(2048, ge=1)
    step_tokens: int = Field(2048, ge=1)
    snapshot_every: int = Field(4096, ge=1)
    max_snapshots: int = Field(4, ge=0)
    restore_after: tuple[int, ...] | None = None
    max_waiting: int = Field(1024, ge=0)
    forward: ForwardOptions = ForwardOptions()
