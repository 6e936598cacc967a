"""Lightning Indexer: picks, for every query of a CSA layer, the top-k compressed entries it
attends to (reference §2.5).

Own compressor (m = 4, overlap, head dim 128) builds index keys K_j; queries come from the
attention's low-rank q (`qr`): q_I = wq_b(qr) [.., 64 heads, 128], RoPE on the last rope dims.
  I[t, j] = sum_h w[t, h] * ReLU(q_I[t, h] . K_j),   w = weights_proj(x) * (128 * 64)^-1/2
over the visible entries j < (pos_t + 1) // 4; the top min(index_topk, visible) are kept, the
other slots are -1. With `quant_sim`, q_I and K_j are Hadamard-rotated and FP4-rounded, as in
training; the rotation alone would not change q . k.
Scores are computed one block of queries at a time, so the workspace stays bounded by
`ForwardOptions.workspace(device type)` elements whatever the context length. On CUDA (one rank),
the selection runs the fused Triton kernel of dsv4_kernels/indexer_topk.py
(`ForwardOptions.indexer_kernel`: scores
accumulated over heads in registers, then a top-k with the same tie-breaking); the torch path
below stays its reference.
"""
from __future__ import annotations

import torch
from torch import nn

from dsv4.formats.fakequant import fp4_fake_quant, hadamard_rotate
from dsv4.network.cache import LayerCache
from dsv4.network.compressor import Compressor
from dsv4.network.config import ModelConfig
from dsv4.network.host_ints import device_ints
from dsv4.network.linear import Linear
from dsv4.network.options import forward_options, kernel_enabled
from dsv4.network.rope import apply_rope
from dsv4.network.tensor_parallel import SINGLE, TensorParallel


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        # tensor parallel: this rank's indexer heads; the head-summed scores are summed over the
        # ranks before the top-k (the weight scale stays that of all heads)
        self.tp = tp
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads // tp.world, cfg.index_head_dim, cfg.index_topk
        self.ratio = 4
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim)
        self.weights_proj = Linear(cfg.dim, self.n_heads)
        self.compressor = Compressor(cfg, self.ratio, self.head_dim, rotate=True)
        self.weight_scale = (self.head_dim * cfg.index_n_heads) ** -0.5
        self.quant_sim = False

    def forward(self, x: torch.Tensor, qr: torch.Tensor, starts: list[int], caches: list[LayerCache],
                rope: tuple[torch.Tensor, torch.Tensor], inv_freq: torch.Tensor) -> torch.Tensor:
        """x [B,S,D], qr [B,S,q_lora_rank], rope = (cos, sin) [B,S,rd/2] of the query positions
        -> chosen entry indices [B, S, k] (int64, -1 = unused slot; k = the most any row has)."""
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))        # [B,S,Hi,di]
        q = apply_rope(q, *rope)
        if self.quant_sim:
            q = fp4_fake_quant(hadamard_rotate(q), 32)
        weights = self.weights_proj(x).float() * self.weight_scale            # [B,S,Hi]
        new_keys = self.compressor(x, starts, [c.indexer_compressor for c in caches], inv_freq)
        for cache, new in zip(caches, new_keys):
            if new.shape[0]:            # most decode steps add no key (an FP4 cache would still pack)
                cache.indexer_keys.append(new)
        return self._top_entries(q, weights, self._keys(caches), starts)

    @staticmethod
    def _keys(caches: list[LayerCache]) -> tuple[torch.Tensor, list[int]]:
        """Every row's index keys: ([B, N, di] padded with copies of real keys, per-row counts N_b).
        One row: its buffer as is. Several: their buffers joined, then gathered at per-row offsets
        (two ops whatever B; the padding is masked out by the caller)."""
        views = [c.indexer_keys.view() for c in caches]
        counts = [v.shape[0] for v in views]
        if len(views) == 1 or max(counts) == 0:
            return torch.stack(views) if len(views) > 1 else views[0][None], counts
        offsets = [sum(counts[:b]) for b in range(len(counts))]
        device = views[0].device
        joined = torch.cat(views)                                                # [sum N_b, di]
        index = device_ints(offsets, device)[:, None] + torch.arange(max(counts), device=device)
        return joined[index.clamp_(max=joined.shape[0] - 1)], counts

    def _top_entries(self, q: torch.Tensor, weights: torch.Tensor, keys: tuple[torch.Tensor, list[int]],
                     starts: list[int]) -> torch.Tensor:
        """q [B,S,Hi,di], weights [B,S,Hi], keys ([B,N,di], per-row counts) -> indices [B,S,k]
        (-1 = none; k = min(topk, the most keys any row has)); all rows at once."""
        keys, counts = keys
        B, S = q.shape[:2]
        k = min(self.topk, max(counts))
        if k == 0:
            return torch.empty(B, S, 0, dtype=torch.long, device=q.device)
        N = keys.shape[1]
        # entries visible to query t of row b: j < (starts[b] + t + 1) // m (<= counts[b])
        positions = device_ints(starts, q.device)[:, None] + torch.arange(1, S + 1, device=q.device)
        visible = (positions // self.ratio)[..., None]                           # [B,S,1]
        options = forward_options()
        workspace = options.workspace(q.device.type)
        if self.tp.world == 1 and kernel_enabled(options.indexer_kernel, q):
            return self._top_entries_kernel(q, weights, keys, visible[..., 0], k, workspace)
        block = max(1, workspace // (B * self.n_heads * N))
        keys = keys.float()
        out = []
        for t0 in range(0, S, block):
            t1 = min(S, t0 + block)
            n_vis = min(N, max(start + t1 for start in starts) // self.ratio)   # the most any row sees
            if n_vis == 0:
                out.append(torch.full((B, t1 - t0, k), -1, dtype=torch.long, device=q.device))
                continue
            scores = torch.einsum("bthd,bnd->bthn", q[:, t0:t1].float(), keys[:, :n_vis]).relu_()
            # tensor parallel: this rank's heads' sum, summed over the ranks before the top-k
            scores = self.tp.sum(torch.einsum("bthn,bth->btn", scores, weights[:, t0:t1]))   # [B,T,n_vis]
            hidden = torch.arange(n_vis, device=q.device) >= visible[:, t0:t1]
            # ReLU makes exact ties (all heads at 0) common: a stable sort breaks them towards the
            # older entry, so the choice does not depend on how the tokens were chunked; hidden
            # entries sort last (in index order), so the slots they take are the -1 ones
            order = scores.masked_fill(hidden, float("-inf")).sort(dim=-1, descending=True, stable=True)
            top = order.indices[..., :k]
            top = top.masked_fill(top >= visible[:, t0:t1], -1)
            out.append(nn.functional.pad(top, (0, k - top.shape[-1]), value=-1))
        return torch.cat(out, dim=1)

    @staticmethod
    def _top_entries_kernel(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor,
                            visible: torch.Tensor, k: int, workspace: int) -> torch.Tensor:
        """`_top_entries` through dsv4_kernels.indexer_topk, blocks of queries whose [B, T, N]
        int64 sort keys fit the score workspace. visible [B, S]."""
        import dsv4_kernels
        B, S, N = q.shape[0], q.shape[1], keys.shape[1]
        block = max(1, workspace // (2 * B * N))
        visible = visible.clamp(max=N)
        return torch.cat([dsv4_kernels.indexer_topk(q[:, t0:t0 + block], weights[:, t0:t0 + block], keys,
                                                     visible[:, t0:t0 + block], k)
                          for t0 in range(0, S, block)], dim=1)
