"""Mixture of experts (reference §2.7): every DeepSeek-V4 FFN, MTP included.

Gate (fp32): s = sqrt(softplus(x Wg^T)) [T, E] (`score_func`; softmax / sigmoid also exist in
`ModelArgs`). Which experts: top-k of s + bias (the bias steers selection only), or on the first
`n_hash_layers` layers a fixed table `tid2eid[token id]`. How much: the *unbiased* scores of the
chosen experts, renormalised to sum 1 (not for softmax), times `route_scale`.
Experts and the one shared expert are SwiGLU with a clamp: up in [-limit, limit], gate <= limit;
the routing weight multiplies the activation before w2. Output = sum of routed + shared.

On CUDA, FP4 routed experts run the fused kernels of dsv4_kernels/fused_moe.py (`pack_experts`
stacks this rank's experts once, in the release layout, and re-points every expert's weights at
views of the stacks, so no memory is doubled); otherwise `moe_dispatch.routed_experts` runs the
experts one by one, the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.network.config import ModelConfig
from dsv4.network.linear import Linear, quant_kernels_enabled
from dsv4.network.moe_dispatch import routed_experts
from dsv4.network.tensor_parallel import SINGLE, TensorParallel


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack(tensors), without a copy when they already lie back to back in one storage (as
    after an earlier packing, or when built straight into stacks)."""
    first = tensors[0]
    storage, n = first.untyped_storage(), first.numel()
    if all(t.is_contiguous() and t.shape == first.shape and t.untyped_storage().data_ptr() == storage.data_ptr()
           and t.storage_offset() == first.storage_offset() + i * n for i, t in enumerate(tensors)):
        return first.new_empty(0).set_(storage, first.storage_offset(), (len(tensors), *first.shape))
    return torch.stack(tensors)


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
        self.n_routed, self.limit = cfg.n_routed_experts, cfg.swiglu_limit
        self._packed, self._packed_key = None, None

    def _local(self) -> list[Expert]:
        return [m for m in self.experts if m is not None]

    def _storage_key(self) -> tuple:
        """Identifies the tensors the packed stacks were made from: any re-storing of the
        experts (a device move, dequantize_, model.to(dtype)) changes it."""
        local = self._local()
        return tuple(getattr(m, w).weight.data_ptr() for m in (local[0], local[-1]) for w in ("w1", "w3", "w2"))

    @torch.no_grad()
    def pack_experts(self) -> bool:
        """Stack this rank's FP4 routed experts for the fused kernels (dsv4_kernels.Fp4Experts) and
        make every expert's weight and scale a view of the stacks. False (nothing packed) when the
        experts are not all FP4 or their dims are not whole 128-column groups."""
        from dsv4_kernels.fused_moe import GROUP, Fp4Experts
        local = self._local()
        layers = [getattr(m, w) for m in local for w in ("w1", "w3", "w2")]
        if not layers or any(layer.format != "fp4" or layer.weight.is_meta for layer in layers) \
                or len({layer.scale.dtype for layer in layers}) != 1 \
                or local[0].w1.in_features % GROUP or local[0].w1.out_features % GROUP:
            self._packed, self._packed_key = None, self._storage_key() if layers else None
            return False
        stacks = {}
        for name in ("w1", "w3", "w2"):
            w = _stacked([getattr(m, name).weight.detach() for m in local])
            s = _stacked([getattr(m, name).scale.detach() for m in local])
            for i, m in enumerate(local):     # the separate tensors go as soon as each is re-pointed
                getattr(m, name)._set_storage(w[i], s[i])
            stacks[name] = (w, s)
        lo = next(e for e, m in enumerate(self.experts) if m is not None)
        self._packed = Fp4Experts(*stacks["w1"], *stacks["w3"], *stacks["w2"], first=lo)
        self._packed_key = self._storage_key()
        return True

    def _fused_experts(self, x: torch.Tensor):
        """The packed experts when the fused kernels apply to x, else None."""
        if x.dtype not in (torch.bfloat16, torch.float16) or not quant_kernels_enabled(x):
            return None
        if self._packed_key != self._storage_key():
            self.pack_experts()
        return self._packed

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """x [B,S,D] (ffn_norm output), token_ids [B,S] -> [B,S,D]."""
        flat = x.reshape(-1, x.shape[-1])                                      # [T,D]
        weights, experts = self.gate(flat, token_ids.reshape(-1))            # [T,k]
        packed = self._fused_experts(flat)
        if packed is not None:
            import dsv4_kernels
            first = self._local()[0].w1
            y = dsv4_kernels.fused_moe(flat, weights, experts, packed, n_routed_experts=self.n_routed,
                                       swiglu_limit=self.limit, fp8_activations=first.quant_sim and first.quantised_gemm)
        else:
            y = routed_experts(flat, weights, experts, self.experts)          # [T,D] fp32, this rank's
        y = self.tp.sum(y)                                                     # fp32, over ranks
        y += self.shared_experts(flat).float()
        return y.to(x.dtype).view_as(x)
