"""dsv4/moe_dispatch.routed_experts (one host sync a layer) against float64 arithmetic of the MoE
definition, with hash routing (a token may pick an expert twice) and biased top-k routing; and
expert parallel: the ranks' partial sums (other ranks' experts None) add up to the whole."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dsv4.network.config import ModelConfig
from dsv4.network.moe import MoE
from dsv4.network.moe_dispatch import routed_experts

CFG = ModelConfig.tiny()


def routed_inputs(layer_id: int, tokens: int):
    torch.manual_seed(layer_id * 100 + tokens)
    moe = MoE(CFG, layer_id)
    with torch.no_grad():
        if moe.gate.bias is not None:
            moe.gate.bias.normal_()
        else:
            moe.gate.tid2eid[:, 1] = moe.gate.tid2eid[:, 0]        # repeated experts in a row
    flat = torch.randn(tokens, CFG.dim)
    weights, experts = moe.gate(flat, torch.randint(0, CFG.vocab_size, (tokens,)))
    return moe, flat, weights, experts


@pytest.mark.parametrize("layer_id,tokens", [(0, 1), (0, 37), (2, 1), (2, 64)])
def test_routed_experts_equal_the_definition_in_float64(layer_id, tokens):
    moe, flat, weights, experts = routed_inputs(layer_id, tokens)
    with torch.no_grad():
        got = routed_experts(flat, weights, experts, moe.experts)
        ref = torch.zeros(tokens, CFG.dim, dtype=torch.float64)
        for t in range(tokens):
            for slot in range(experts.shape[1]):
                e = int(experts[t, slot])
                ref[t] += moe.experts[e](flat[t:t + 1], weights[t:t + 1, slot:slot + 1])[0].double()
    torch.testing.assert_close(got, ref.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("ranks", [2, 4])
def test_expert_parallel_partial_sums_add_up_to_the_whole(ranks):
    moe, flat, weights, experts = routed_inputs(3, 48)
    E = CFG.n_routed_experts
    with torch.no_grad():
        whole = routed_experts(flat, weights, experts, moe.experts)
        parts = []
        for r in range(ranks):
            lo, hi = r * E // ranks, (r + 1) * E // ranks
            mine = nn.ModuleList(m if lo <= e < hi else None for e, m in enumerate(moe.experts))
            parts.append(routed_experts(flat, weights, experts, mine))
    assert all(p.abs().sum() > 0 for p in parts)                  # every rank had work
    torch.testing.assert_close(sum(parts), whole, atol=1e-5, rtol=0)
