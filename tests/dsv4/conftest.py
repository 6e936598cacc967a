"""dsv4 model tests share two CPU cores with other work: one torch thread.

`make_model(cfg, seed)` builds a Transformer whose every parameter is random and non-trivial
(norm weights != 1, non-zero ape / sinks / gate biases / hc bases), so no term of the network
can vanish from a comparison unnoticed."""
from __future__ import annotations

import pytest
import torch

from dsv4.network.config import ModelConfig
from dsv4.network.model import Transformer

torch.set_num_threads(1)


def randomize_(model: Transformer, seed: int) -> Transformer:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(("ape", "attn_sink", "_base", "gate.bias")):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("_scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.randint(0, model.cfg.n_routed_experts, b.shape, generator=g))
    return model


@pytest.fixture(scope="session")
def make_model():
    def make(cfg: ModelConfig | None = None, seed: int = 0) -> Transformer:
        torch.manual_seed(seed)
        return randomize_(Transformer(cfg or ModelConfig.tiny()), seed).eval()
    return make
