"""dsv4/moe_dispatch.routed_experts (one host sync) == MoE's per-expert loop, bit for bit on CPU,
with hash routing (a token may pick an expert twice) and biased top-k routing."""
from __future__ import annotations

import pytest
import torch

from dsv4.config import ModelConfig
from dsv4.moe import MoE
from dsv4.moe_dispatch import routed_experts

CFG = ModelConfig.tiny()


@pytest.mark.parametrize("layer_id,tokens", [(0, 1), (0, 37), (2, 1), (2, 64)])
def test_routed_experts_equals_per_expert_loop(layer_id, tokens):
    torch.manual_seed(layer_id * 100 + tokens)
    moe = MoE(CFG, layer_id)
    with torch.no_grad():
        if moe.gate.bias is not None:
            moe.gate.bias.normal_()
        else:
            moe.gate.tid2eid[:, 1] = moe.gate.tid2eid[:, 0]        # repeated experts in a row
    x = torch.randn(1, tokens, CFG.dim)
    ids = torch.randint(0, CFG.vocab_size, (1, tokens))
    with torch.no_grad():
        want = moe(x, ids)
        flat = x.reshape(-1, CFG.dim)
        weights, experts = moe.gate(flat, ids.reshape(-1))
        got = routed_experts(flat, weights, experts, moe.experts) + moe.shared_experts(flat).float()
    assert torch.equal(got.to(x.dtype).view_as(x), want)
    # and against float64 arithmetic of the definition
    ref = torch.zeros(tokens, CFG.dim, dtype=torch.float64)
    for t in range(tokens):
        for slot in range(experts.shape[1]):
            e = int(experts[t, slot])
            ref[t] += moe.experts[e](flat[t:t + 1], weights[t:t + 1, slot:slot + 1])[0].double()
    torch.testing.assert_close(got - moe.shared_experts(flat).float(), ref.float(), atol=1e-5, rtol=0)
