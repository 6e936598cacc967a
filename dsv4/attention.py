"""DeepSeek-V4 attention: one shared K=V head, sliding window + compressed entries + sink
(reference §2.3, §2.6).

  q   = wq_b(q_norm(wq_a(x)))  [.., H, d], per-head weightless RMS norm, RoPE on the last rd dims
  kv  = kv_norm(wkv(x))        [.., d], RoPE on the last rd dims (K = V: one 512-d vector/token)
Each query attends, in ONE softmax (scale d^-1/2) that also holds a learned per-head sink logit
(a key with no value), to
  - its sliding window: the last `window_size` tokens including itself;
  - CSA layers: the compressed entries the Lightning Indexer picked (top-k);
  - HCA layers: every visible compressed entry (j < (pos + 1) // m).
Since V carries the keys' rotation, the output gets the inverse rotation at the query position;
then the grouped low-rank output: heads split into `o_groups` groups, each projected by its slice
of wo_a to o_lora_rank, and wo_b mixes the groups back to `dim`.

RoPE: sliding-only layers plain theta=rope_theta; compressed layers (and their compressors and
indexer) YaRN with compress_rope_theta. With `quant_sim`, the NoPE dims of the window K=V are
rounded to FP8 (the compressor does the same for its entries).
Queries are processed in blocks so the score workspace never grows with the square of the
context: window keys per block <= block + window, compressed keys per query <= top-k (CSA) or
the visible entries (HCA).
"""
from __future__ import annotations

import torch
from torch import nn

from dsv4.cache import LayerCache
from dsv4.compressor import Compressor
from dsv4.config import ModelConfig
from dsv4.fakequant import fp8_fake_quant
from dsv4.indexer import Indexer
from dsv4.linear import Linear
from dsv4.norm import RMSNorm, rms_normalize
from dsv4.rope import apply_rope, inv_frequencies, rope_angles

LOGIT_BUDGET = 1 << 24          # fp32 elements of one query block's [queries, heads, keys] logits


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        spec = cfg.layer_spec(layer_id)
        self.ratio, self.kind = spec.compress_ratio, spec.kind
        self.n_heads, self.head_dim, self.rope_head_dim = cfg.n_heads, cfg.head_dim, cfg.rope_head_dim
        self.window, self.eps, self.n_groups = cfg.window_size, cfg.norm_eps, cfg.o_groups
        self.o_lora_rank = cfg.o_lora_rank
        self.scale = self.head_dim ** -0.5
        # a plain attribute, not a buffer: model.to(bf16) must not round the frequencies
        self.inv_freq = inv_frequencies(cfg, compressed=self.ratio > 0)
        self.quant_sim = False

        self.wq_a = Linear(cfg.dim, cfg.q_lora_rank)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim)
        self.wkv = Linear(cfg.dim, self.head_dim)
        self.kv_norm = RMSNorm(self.head_dim, cfg.norm_eps)
        # wo_a is read as [G, R, H*d/G] weight slices (grouped projection), so it must hold a
        # float weight: the official convert.py dequantises it to bf16 as well.
        self.wo_a = Linear(self.n_heads * self.head_dim // self.n_groups, self.n_groups * self.o_lora_rank)
        self.wo_b = Linear(self.n_groups * self.o_lora_rank, cfg.dim)
        self.attn_sink = nn.Parameter(torch.zeros(self.n_heads, dtype=torch.float32))
        if self.ratio:
            self.compressor = Compressor(cfg, self.ratio, self.head_dim, rotate=False)
        if self.kind == "csa":
            self.indexer = Indexer(cfg)

    def forward(self, x: torch.Tensor, starts: list[int], caches: list[LayerCache]) -> torch.Tensor:
        """x [B,S,D] (attn_norm output), row b at positions starts[b] + 0..S-1 -> [B,S,D].
        Appends the S tokens to each row's layer cache."""
        B, S, _ = x.shape
        positions = torch.tensor(starts, device=x.device)[:, None] + torch.arange(S, device=x.device)
        cos, sin = rope_angles(positions, self.inv_freq)                     # [B,S,rd/2]

        qr = self.q_norm(self.wq_a(x))                                        # [B,S,Rq]
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))        # [B,S,H,d]
        q = apply_rope(rms_normalize(q, self.eps), cos, sin)
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)                  # [B,S,d]
        if self.quant_sim:
            nope = self.head_dim - self.rope_head_dim
            kv = torch.cat((fp8_fake_quant(kv[..., :nope], 64), kv[..., nope:]), -1)

        picks = [None] * B
        if self.ratio:
            entries = self.compressor(x, starts, [c.compressor for c in caches], self.inv_freq)
            for cache, new in zip(caches, entries):
                cache.compressed.append(new)
        if self.kind == "csa":
            picks = self.indexer(x, qr, starts, caches, (cos, sin), self.inv_freq)

        o = torch.stack([self._attend(q[b], kv[b], starts[b], caches[b], picks[b]) for b in range(B)])
        o = apply_rope(o.to(x.dtype), cos, sin, inverse=True)                # [B,S,H,d]
        groups = o.reshape(B, S, self.n_groups, -1)                           # [B,S,G,H*d/G]
        wo_a = self.wo_a.weight.view(self.n_groups, self.o_lora_rank, -1)     # [G,R,H*d/G]
        z = torch.einsum("bsgi,gri->bsgr", groups, wo_a.to(groups.dtype))
        return self.wo_b(z.flatten(2))

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, start: int, cache: LayerCache,
                picks: torch.Tensor | None) -> torch.Tensor:
        """One row: q [S,H,d], this chunk's K=V kv [S,d] -> output [S,H,d] fp32; writes kv into
        the ring. picks [S,k]: the indexer's entry indices (CSA only)."""
        S, W = q.shape[0], self.window
        n_prev = min(start, W)                                 # window tokens from earlier calls
        prev_slots = torch.arange(start - n_prev, start, device=q.device) % W
        keys = torch.cat((cache.window[prev_slots].to(kv.dtype), kv))          # [n_prev+S, d]
        entries = cache.compressed.view() if self.ratio else None             # [N, d]
        if self.kind == "hca":
            entries = entries.float()            # HCA reads all of them (N = length / 128)
        self._write_ring(cache, kv, start)

        n_extra = picks.shape[1] if picks is not None else (entries.shape[0] if self.ratio else 0)
        # per block: logits [T, H, <= T + W + n_extra], CSA gathered entries [T, k, d]
        block = min(256, max(1, LOGIT_BUDGET // ((self.n_heads + self.head_dim) * (256 + W + n_extra))))
        out = []
        for t0 in range(0, S, block):
            t1 = min(S, t0 + block)
            qb = q[t0:t1].float()                                              # [T,H,d]
            # sliding window: key index k (in `keys`) is visible to query t iff
            # n_prev + t - W < k <= n_prev + t
            lo, hi = max(0, n_prev + t0 - W + 1), n_prev + t1
            win = keys[lo:hi].float()                                          # [K,d]
            k_idx = torch.arange(lo, hi, device=q.device)
            q_idx = n_prev + torch.arange(t0, t1, device=q.device)[:, None]
            win_ok = (k_idx <= q_idx) & (k_idx > q_idx - W)                    # [T,K]
            logits = [torch.einsum("thd,kd->thk", qb, win).masked_fill(~win_ok[:, None], float("-inf"))]
            values = [win]
            if picks is not None:                                               # CSA: top-k entries
                sel = picks[t0:t1]                                              # [T,k]
                comp = entries[sel.clamp(min=0)].float()                        # [T,k,d]
                logits.append(torch.einsum("thd,tkd->thk", qb, comp)
                              .masked_fill((sel < 0)[:, None], float("-inf")))
                values.append(comp)
            elif self.ratio:                                                    # HCA: all visible
                visible = (start + torch.arange(t0 + 1, t1 + 1, device=q.device)) // self.ratio
                comp = entries[: int(visible[-1])]                              # [N,d]
                ok = torch.arange(comp.shape[0], device=q.device) < visible[:, None]
                logits.append(torch.einsum("thd,nd->thn", qb, comp).masked_fill(~ok[:, None], float("-inf")))
                values.append(comp)
            sink = self.attn_sink.float().view(1, -1, 1).expand(t1 - t0, -1, 1)
            probs = torch.cat([lg * self.scale for lg in logits] + [sink], dim=-1).softmax(-1)
            o = torch.einsum("thk,kd->thd", probs[..., : win.shape[0]], win)
            if picks is not None:
                o = o + torch.einsum("thk,tkd->thd", probs[..., win.shape[0]:-1], values[1])
            elif self.ratio:
                o = o + torch.einsum("thn,nd->thd", probs[..., win.shape[0]:-1], values[1])
            out.append(o)
        return torch.cat(out)

    def _write_ring(self, cache: LayerCache, kv: torch.Tensor, start: int) -> None:
        """Store the last min(S, W) tokens of kv [S,d] at ring slots pos % W."""
        S = kv.shape[0]
        keep = min(S, self.window)
        slots = torch.arange(start + S - keep, start + S, device=kv.device) % self.window
        cache.window[slots] = kv[S - keep:].to(cache.window.dtype)
