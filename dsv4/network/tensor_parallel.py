"""Tensor + expert parallelism for DSV4 over torch.distributed (reference §6.1, as the official
inference code): one model-parallel group of W ranks (NCCL on GPUs, gloo on CPU).

What each rank holds (everything else is replicated: wq_a, q_norm, wkv, kv_norm, compressors,
norms, the MoE gate, the shared expert, hc_*; replicated parts compute the same values on every
rank, so the KV cache is the same on every rank too):
    embed.weight                    rows [r*V/W, (r+1)*V/W): masked lookup + all_reduce
    head.weight                     rows likewise: logits all_gather (every rank gets all of V)
    attn.wq_b, attn.attn_sink       heads [r*H/W, (r+1)*H/W) (rows)
    attn.wo_a                       output groups [r*G/W, (r+1)*G/W) (rows)
    attn.wo_b                       input columns of those groups: output all_reduce (fp32; each
                                    rank's partial is first rounded to the activation dtype)
    attn.indexer.wq_b, weights_proj indexer heads (rows): head-summed scores all_reduce (fp32)
                                    before the top-k, so every rank picks the same entries
    ffn.experts.{e}                 whole experts e in [r*E/W, (r+1)*E/W): MoE output all_reduce
                                    (fp32) of the routed sum; the shared expert is replicated and
                                    added after the reduce
Per layer that is 2 all_reduces (attention, MoE), 3 on CSA layers (indexer).
The KV cache is per rank: DSV4's single K=V head (MQA) and the compressed entries are needed by
every head, so each rank keeps the full cache of every session (bytes per rank = the
single-process figure; the whole group holds W copies).

Which checkpoint tensors are split how lives in dsv4/loading/sharding.py; starting the ranks'
processes in dsv4/runtime/launch.py; `dsv4.Engine(path, tp=N)` runs an engine over N ranks
(dsv4/runtime/spmd.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dsv4.network.linear import Linear


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the model-parallel group. `group` None = the default group.
    With world == 1 every collective is the identity and nothing is sharded."""

    rank: int = 0
    world: int = 1
    group: Any = None

    def __post_init__(self):
        if not 0 <= self.rank < self.world:
            raise ValueError(f"tensor parallel rank {self.rank} is not in [0, {self.world})")

    def local_range(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [lo, hi) of n items (n divisible by world)."""
        per = n // self.world
        return self.rank * per, (self.rank + 1) * per

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks, reduced in fp32, returned in x's dtype (identity on one rank)."""
        if self.world == 1:
            return x
        total = x.float().contiguous()
        if total is x:                  # fp32 input: reduce a copy, the caller's tensor stays as is
            total = x.clone()
        dist.all_reduce(total, group=self.group)
        return total.to(x.dtype)

    def gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' x concatenated along `dim`, rank order (identity on one rank)."""
        if self.world == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def check(self, cfg: Any) -> None:
        """Every sharded count of `cfg` must divide by the world size; ValueError names them."""
        if self.world == 1:
            return
        counts = {"n_heads": cfg.n_heads, "o_groups": cfg.o_groups, "index_n_heads": cfg.index_n_heads,
                  "n_routed_experts": cfg.n_routed_experts, "vocab_size": cfg.vocab_size}
        bad = [f"{k}={v}" for k, v in counts.items() if v % self.world]
        if bad:
            raise ValueError(f"tensor parallel over {self.world} ranks needs these divisible by "
                             f"{self.world}: {', '.join(bad)}")


SINGLE = TensorParallel()


# ---- sharded modules ------------------------------------------------------------------------
class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows of the embedding table; ids of other ranks' rows read as zeros, then the
    ranks' lookups are summed (exact: one non-zero term per id)."""

    def __init__(self, vocab_size: int, dim: int, tp: TensorParallel):
        super().__init__(vocab_size // tp.world, dim)
        self.tp = tp
        self.vocab_start = tp.local_range(vocab_size)[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.num_embeddings)
        rows = super().forward(torch.where(mine, local, 0)).masked_fill(~mine[..., None], 0)
        return self.tp.sum(rows)


class VocabParallelHead(Linear):
    """This rank's rows (vocab entries) of the output head; logits gathered over the vocab."""

    def __init__(self, dim: int, vocab_size: int, tp: TensorParallel):
        super().__init__(dim, vocab_size // tp.world)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.gather(super().forward(x), dim=-1)
