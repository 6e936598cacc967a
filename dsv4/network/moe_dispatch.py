"""Routed-expert dispatch with one host sync, whatever the number of experts used.

`MoE.forward` used to find each used expert's rows with `experts.unique().tolist()` and a
`torch.where(experts == e)` per expert: 2 + (used experts) host syncs and ~5 extra ops per expert
a layer. Here the (token, slot) assignments are sorted by expert once (stable, so each expert's
rows stay in token order), the per-expert counts come to the host in one `.tolist()`, every
expert reads a contiguous slice of one gathered input, and one `index_add_` sums the outputs.
The sums run in the same order as before (ascending expert per token), so on CPU the result is
bit-identical to the per-expert loop.
"""
from __future__ import annotations

import torch
from torch import nn


def routed_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                   modules: nn.ModuleList) -> torch.Tensor:
    """x [T,D], routing weights [T,k] fp32, expert ids [T,k] int64 -> sum over the k chosen
    experts of weight * expert(x), [T,D] fp32. `modules[e](x_rows, w_rows [n,1])` is expert e;
    None marks another rank's expert (expert parallel: this rank's experts are one contiguous
    range, so after the sort their assignments are one contiguous slice, the only rows gathered)."""
    k = experts.shape[1]
    flat = experts.flatten()                                              # [T*k]
    order = flat.argsort(stable=True)                                     # grouped by expert
    counts = torch.bincount(flat, minlength=len(modules)).tolist()        # the one host sync
    local = [e for e, m in enumerate(modules) if m is not None]
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    first, stop = sum(counts[:local[0]]), sum(counts[:local[-1] + 1])
    if first == stop:                                                     # none of ours was chosen
        return y
    rows = order[first:stop] // k                                         # token of each assignment
    inputs, w = x[rows], weights.flatten()[order[first:stop], None]       # [n, D], [n, 1]
    outputs, start = [], 0
    for e in range(local[0], local[-1] + 1):
        if counts[e]:
            outputs.append(modules[e](inputs[start:start + counts[e]], w[start:start + counts[e]]))
            start += counts[e]
    return y.index_add_(0, rows, torch.cat(outputs).float())              # one cast for all experts
