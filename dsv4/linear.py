"""The one linear layer every projection of the model uses.

The model code only ever builds `Linear(in_features, out_features)` and calls it; how the weight is
stored (float, FP8 e4m3 with 128x128 block scales, packed FP4 experts with 1x32 scales) is the
loader's business (dsv4/checkpoint.py, dsv4/quant.py), so the layers stay readable.
Parameter names follow the official checkpoint: `<name>.weight` and, when quantised, `<name>.scale`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x @ W^T (no bias anywhere in DSV4). weight: [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        nn.init.normal_(self.weight, std=in_features**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))
