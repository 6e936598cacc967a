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
All rows of a batch are attended to at once, whatever their positions (each row's keys are its
ring's `window` tokens, oldest first, then its new tokens; masks do the rest). Queries go in
blocks so the score workspace never grows with the square of the context: window keys per
block <= block + window, compressed keys per query <= top-k (CSA) or the visible entries (HCA).
"""
from __future__ import annotations

import torch
from torch import nn

from dsv4.formats.fakequant import fp8_fake_quant
from dsv4.network.cache import LayerCache
from dsv4.network.compressor import Compressor
from dsv4.network.config import ModelConfig
from dsv4.network.host_ints import device_ints
from dsv4.network.indexer import Indexer
from dsv4.network.linear import Linear
from dsv4.network.norm import RMSNorm, rms_normalize
from dsv4.network.options import forward_options, kernel_enabled
from dsv4.network.rope import apply_rope, inv_frequencies, rope_angles
from dsv4.network.tensor_parallel import SINGLE, TensorParallel


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TensorParallel = SINGLE):
        super().__init__()
        spec = cfg.layer_spec(layer_id)
        self.ratio, self.kind = spec.compress_ratio, spec.kind
        # tensor parallel (dsv4/parallel.py): this rank's heads and output groups; the shared K=V
        # (wkv), wq_a and the compressors are replicated, wo_b's partial outputs are summed
        self.tp = tp
        self.n_heads, self.head_dim, self.rope_head_dim = cfg.n_heads // tp.world, cfg.head_dim, cfg.rope_head_dim
        self.window, self.eps, self.n_groups = cfg.window_size, cfg.norm_eps, cfg.o_groups // tp.world
        self.o_lora_rank = cfg.o_lora_rank
        self.scale = self.head_dim ** -0.5
        # a plain attribute, not a buffer: model.to(bf16) must not round the frequencies
        self.inv_freq = inv_frequencies(cfg, compressed=self.ratio > 0)         # [rd/2] fp32
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
            self.indexer = Indexer(cfg, tp)

    def forward(self, x: torch.Tensor, starts: list[int], caches: list[LayerCache]) -> torch.Tensor:
        """x [B,S,D] (attn_norm output), row b at positions starts[b] + 0..S-1 -> [B,S,D].
        Appends the S tokens to each row's layer cache."""
        B, S, _ = x.shape
        if self.inv_freq.device != x.device:      # follow the model to its device, once
            self.inv_freq = self.inv_freq.to(x.device)
        positions = device_ints(starts, x.device)[:, None] + torch.arange(S, device=x.device)
        cos, sin = rope_angles(positions, self.inv_freq)                     # [B,S,rd/2]

        qr = self.q_norm(self.wq_a(x))                                        # [B,S,Rq]
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))        # [B,S,H,d]
        q = apply_rope(rms_normalize(q, self.eps), cos, sin)
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)                  # [B,S,d]
        if self.quant_sim:
            nope = self.head_dim - self.rope_head_dim
            kv = torch.cat((fp8_fake_quant(kv[..., :nope], 64), kv[..., nope:]), -1)

        picks = None
        if self.ratio:
            entries = self.compressor(x, starts, [c.compressor for c in caches], self.inv_freq)
            for cache, new in zip(caches, entries):
                cache.compressed.append(new)
        if self.kind == "csa":
            picks = self.indexer(x, qr, starts, caches, (cos, sin), self.inv_freq)    # [B,S,k]

        o = self._attend(q, kv, starts, caches, picks)                        # [B,S,H,d] fp32
        o = apply_rope(o.to(x.dtype), cos, sin, inverse=True)
        groups = o.reshape(B, S, self.n_groups, -1)                           # [B,S,G,H*d/G]
        wo_a = self.wo_a.weight.view(self.n_groups, self.o_lora_rank, -1)     # [G,R,H*d/G]
        z = torch.einsum("bsgi,gri->bsgr", groups, wo_a.to(groups.dtype))
        return self.tp.sum(self.wo_b(z.flatten(2)))                         # over the ranks' groups

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, starts: list[int], caches: list[LayerCache],
                picks: torch.Tensor | None) -> torch.Tensor:
        """q [B,S,H,d], this chunk's K=V kv [B,S,d] -> attention output [B,S,H,d] fp32; writes kv
        into the rings. picks [B,S,k]: the indexer's entry indices (CSA only)."""
        B, S, W = q.shape[0], q.shape[1], self.window
        # keys: each row's W tokens before the chunk (from its ring, oldest first), then the chunk;
        # key i sits at position start - W + i, so query t sees keys i with t < i <= W + t
        before = device_ints(starts, q.device)[:, None] - W + torch.arange(W, device=q.device)
        rings = torch.stack([c.window for c in caches])                        # [B,W,d]
        prev = rings.gather(1, (before % W)[..., None].expand(-1, -1, self.head_dim))
        keys = torch.cat((prev.to(kv.dtype), kv), dim=1)                       # [B,W+S,d]
        exists = torch.cat((before >= 0, torch.ones(B, S, dtype=torch.bool, device=q.device)), 1)
        for cache, row, start in zip(caches, kv, starts):
            self._write_ring(cache, row, start)
        options = forward_options()
        if kernel_enabled(options.sparse_kernel, q):  # Triton (dsv4_kernels/); the torch path below is its reference
            return self._attend_kernel(q, keys, starts, caches, picks)
        if self.kind == "hca":                  # all visible entries: pad the rows to one length
            entries = nn.utils.rnn.pad_sequence(
                [c.compressed.view()[: (s + S) // self.ratio].float() for c, s in zip(caches, starts)],
                batch_first=True)                                               # [B,N,d]
        n_extra = picks.shape[-1] if picks is not None else (entries.shape[1] if self.kind == "hca" else 0)
        # per block: logits [B, T, H, W + T + n_extra], compressed keys [B, T, n_extra, d]
        block = min(256, max(1, options.workspace(q.device.type) // (B * (self.n_heads + self.head_dim) * (256 + W + n_extra))))
        positions = device_ints(starts, q.device)[:, None]              # [B,1]
        out = []
        for t0 in range(0, S, block):
            t1 = min(S, t0 + block)
            t = torch.arange(t0, t1, device=q.device)                           # [T]
            qb = q[:, t0:t1].float()                                            # [B,T,H,d]
            i = torch.arange(t0 + 1, W + t1, device=q.device)                   # window key indices
            win = keys[:, t0 + 1: W + t1].float()                               # [B,K,d]
            win_ok = (i > t[:, None]) & (i <= W + t[:, None]) & exists[:, None, t0 + 1: W + t1]
            if picks is not None:                                               # CSA: top-k entries
                sel = picks[:, t0:t1]                                           # [B,T,k]
                comp = torch.stack([self._gather(c, p) for c, p in zip(caches, sel)])   # [B,T,k,d]
                comp_ok = sel >= 0
            elif self.kind == "hca":                                            # HCA: j < (pos+1)//m
                comp = entries[:, None].expand(-1, t1 - t0, -1, -1)             # [B,T,N,d]
                visible = (positions + t + 1) // self.ratio                     # [B,T]
                comp_ok = torch.arange(entries.shape[1], device=q.device) < visible[..., None]
            else:
                comp = q.new_zeros(B, t1 - t0, 0, self.head_dim, dtype=torch.float32)
                comp_ok = torch.zeros(B, t1 - t0, 0, dtype=torch.bool, device=q.device)
            logits = torch.cat((
                torch.einsum("bthd,bkd->bthk", qb, win).masked_fill(~win_ok[:, :, None], float("-inf")),
                torch.einsum("bthd,btkd->bthk", qb, comp).masked_fill(~comp_ok[:, :, None], float("-inf")),
            ), dim=-1) * self.scale
            sink = self.attn_sink.float().view(1, 1, -1, 1).expand(B, t1 - t0, -1, 1)
            probs = torch.cat((logits, sink), dim=-1).softmax(-1)              # one joint softmax
            p_win, p_comp = probs[..., : win.shape[1]], probs[..., win.shape[1]:-1]
            out.append(torch.einsum("bthk,bkd->bthd", p_win, win)
                       + torch.einsum("bthk,btkd->bthd", p_comp, comp))
        return torch.cat(out, dim=1)

    def _attend_kernel(self, q: torch.Tensor, keys: torch.Tensor, starts: list[int],
                       caches: list[LayerCache], picks: torch.Tensor | None) -> torch.Tensor:
        """_attend's softmax through dsv4_kernels.sparse_attention, one launch per row (each row's
        compressed entries are their own tensor): same keys [B,W+S,d], same fp32 output [B,S,H,d]."""
        import dsv4_kernels
        S, W = q.shape[1], self.window
        out = []
        for b, (cache, start) in enumerate(zip(caches, starts)):
            n_prev = min(start, W)                         # ring tokens that exist before the chunk
            n_visible = None
            if self.kind == "hca":                         # entries j < (pos + 1) // m
                n_visible = (start + torch.arange(1, S + 1, device=q.device)) // self.ratio
            out.append(dsv4_kernels.sparse_attention(
                q[b], keys[b, W - n_prev:], cache.compressed.view() if self.ratio else None,
                self.attn_sink, scale=self.scale, window=W, n_prev=n_prev,
                picks=None if picks is None else picks[b], n_visible=n_visible))
        return torch.stack(out)

    def _gather(self, cache: LayerCache, sel: torch.Tensor) -> torch.Tensor:
        """One row's compressed entries at indices sel [T,k] (-1 = none, read as zeros) -> [T,k,d] fp32."""
        entries = cache.compressed.view()
        if entries.shape[0] == 0:
            return torch.zeros(*sel.shape, self.head_dim, device=sel.device)
        return entries[sel.clamp(min=0)].float()

    def _write_ring(self, cache: LayerCache, kv: torch.Tensor, start: int) -> None:
        """Store the last min(S, W) tokens of kv [S,d] at ring slots pos % W."""
        S = kv.shape[0]
        keep = min(S, self.window)
        slots = torch.arange(start + S - keep, start + S, device=kv.device) % self.window
        cache.window[slots] = kv[S - keep:].to(cache.window.dtype)
