"""Mixture of experts (reference §2.7): every DeepSeek-V4 FFN, MTP included.

Gate (fp32): s = sqrt(softplus(x Wg^T)) [T, E] (`score_func`; softmax / sigmoid also exist in
`ModelArgs`). Which experts: top-k of s + bias (the bias steers selection only), or on the first
`n_hash_layers` layers a fixed table `tid2eid[token id]`. How much: the *unbiased* scores of the
chosen experts, renormalised to sum 1 (not for softmax), times `route_scale`.
Experts and the one shared expert are SwiGLU with a clamp: up in [-limit, limit], gate <= limit;
the routing weight multiplies the activation before w2. Output = sum of routed + shared.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.network.config import ModelConfig
from dsv4.network.linear import Linear
from dsv4.network.moe_dispatch import routed_experts
from dsv4.network.tensor_parallel import SINGLE, TensorParallel


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.topk, self.score_func, self.route_scale = cfg.n_activated_experts, cfg.score_func, cfg.route_scale
        self.hash_routed = cfg.layer_spec(layer_id).hash_routed
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        nn.init.normal_(self.weight, std=cfg.dim ** -0.5)
        if self.hash_routed:
            table = torch.randint(0, cfg.n_routed_experts, (cfg.vocab_size, self.topk))
            self.register_buffer("tid2eid", table)           # [V, k] expert ids per token id
            self.bias = None
        else:
            self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T,D], token_ids [T] -> routing weights [T,k] fp32, expert ids [T,k] int64."""
        logits = F.linear(x.float(), self.weight.float())                    # [T,E]
        if self.score_func == "softmax":
            scores = logits.softmax(-1)
        elif self.score_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = F.softplus(logits).sqrt()
        if self.hash_routed:
            experts = self.tid2eid[token_ids].long()
        else:
            experts = (scores + self.bias.float()).topk(self.topk, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.score_func != "softmax":
            weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.route_scale, experts


class Expert(nn.Module):
    """SwiGLU FFN: w2(silu(clamp(w1 x)) * clamp(w3 x)), activation math in fp32."""

    def __init__(self, dim: int, inter_dim: int, swiglu_limit: float):
        super().__init__()
        self.w1, self.w2, self.w3 = Linear(dim, inter_dim), Linear(inter_dim, dim), Linear(dim, inter_dim)
        self.limit = swiglu_limit

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        gate, up = self.w1(x).float(), self.w3(x).float()                    # [T,I]
        if self.limit > 0:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        act = F.silu(gate) * up
        if weights is not None:
            act = act * weights                                               # [T,1] routing weight
        return self.w2(act.to(x.dtype))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.gate = Gate(cfg, layer_id)
        # expert parallel (dsv4/parallel.py): this rank holds experts [lo, hi) whole, the other
        # slots are None (checkpoint names keep their global index); routed sums are all-reduced
        self.tp = tp
        lo, hi = tp.local_range(cfg.n_routed_experts)
        self.experts = nn.ModuleList(Expert(cfg.dim, cfg.moe_inter_dim, cfg.swiglu_limit) if lo <= e < hi
                                     else None for e in range(cfg.n_routed_experts))
        self.shared_experts = Expert(cfg.dim, cfg.moe_inter_dim, cfg.swiglu_limit)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """x [B,S,D] (ffn_norm output), token_ids [B,S] -> [B,S,D]."""
        flat = x.reshape(-1, x.shape[-1])                                      # [T,D]
        weights, experts = self.gate(flat, token_ids.reshape(-1))            # [T,k]
        y = routed_experts(flat, weights, experts, self.experts)              # [T,D] fp32, this rank's
        y = self.tp.sum(y)                                                     # fp32, over ranks
        y += self.shared_experts(flat).float()
        return y.to(x.dtype).view_as(x)
