"""KV compressor: gated softmax pooling of m consecutive tokens into one K=V entry (reference §2.4).

Per token t: kv_t = wkv(x_t), s_t = wgate(x_t) + ape[t mod m] (fp32). Entry j pools, per channel,
  HCA (m = 128): the m tokens of block j,            softmax over those m scores;
  CSA (m = 4, "overlap", projections of width 2d): the "a" halves (channels :d) of the m tokens
      of block j-1 and the "b" halves (d:) of the m tokens of block j, softmax over the 2m.
Then RMSNorm, RoPE on the last rope dims at position m*j (the block's first token), and the
quantisation simulation (main entries: FP8 NoPE dims; indexer entries: Hadamard + FP4).
Entry j exists once token m*j + m - 1 is processed; a query at position i may use entries
j < (i + 1) // m.

The compressor is incremental: tokens of an incomplete block wait in the sequence's
`CompressorState` (the same [c*m, c*d] slots as the official decode buffers), so feeding the
tokens in any chunking produces the same entries.
"""
from __future__ import annotations

import torch
from torch import nn

from dsv4.formats.fakequant import fp4_fake_quant, fp8_fake_quant, hadamard_rotate
from dsv4.network.cache import CompressorState
from dsv4.network.config import ModelConfig
from dsv4.network.host_ints import device_ints
from dsv4.network.linear import Linear
from dsv4.network.norm import RMSNorm
from dsv4.network.rope import apply_rope, rope_angles


class Compressor(nn.Module):
    def __init__(self, cfg: ModelConfig, ratio: int, head_dim: int, rotate: bool):
        super().__init__()
        self.ratio, self.head_dim = ratio, head_dim
        self.overlap = ratio == 4                  # CSA pools two half-width series
        self.rotate = rotate                       # indexer keys: Hadamard + FP4 simulation
        self.rope_head_dim = cfg.rope_head_dim
        width = (2 if self.overlap else 1) * head_dim
        self.ape = nn.Parameter(torch.zeros(ratio, width, dtype=torch.float32))
        self.wkv = Linear(cfg.dim, width)
        self.wgate = Linear(cfg.dim, width)
        self.norm = RMSNorm(head_dim, cfg.norm_eps)
        self.quant_sim = False

    def forward(self, x: torch.Tensor, starts: list[int], states: list[CompressorState],
                inv_freq: torch.Tensor) -> list[torch.Tensor]:
        """x [B,S,D] tokens at positions starts[b] + 0..S-1 -> per row the new entries
        [n_b, head_dim] (x's dtype), numbered from starts[b] // m on; updates `states`."""
        xf = x.float()                                            # the compressor runs in fp32
        kv, score = self.wkv(xf).float(), self.wgate(xf).float()  # [B,S,c*d]
        positions = device_ints(starts, x.device)[:, None] + torch.arange(x.shape[1], device=x.device)
        score = score + self.ape[positions % self.ratio]
        if x.shape[1] == 1:
            return self._decode(kv[:, 0], score[:, 0], starts, states, x.dtype, inv_freq)
        pooled, first_positions = [], []
        for b, (start, state) in enumerate(zip(starts, states)):
            rows = self._pool(kv[b], score[b], start, state)
            pooled.append(rows)
            first = start // self.ratio                           # index of the first new entry
            first_positions += [(first + i) * self.ratio for i in range(rows.shape[0])]
        # all rows' new entries at once: norm, RoPE at each block's first position, simulation
        entries = self._finish(torch.cat(pooled).to(x.dtype),
                               device_ints(first_positions, x.device), inv_freq)
        return list(entries.split([r.shape[0] for r in pooled]))

    def _decode(self, kv: torch.Tensor, score: torch.Tensor, starts: list[int], states: list[CompressorState],
                dtype: torch.dtype, inv_freq: torch.Tensor) -> list[torch.Tensor]:
        """One token per row, all rows at once (the same result as `_pool` row by row): kv, score
        [B, c*d] (score incl. ape) -> per row [0 or 1, head_dim]. Every row's token goes to its
        state slot in one multi-tensor copy; the rows whose block completes are pooled together."""
        m, d = self.ratio, self.head_dim
        cur = m if self.overlap else 0                 # first slot of the current block
        slots = [cur + start % m for start in starts]
        torch._foreach_copy_([st.kv[i] for st, i in zip(states, slots)] + [st.score[i] for st, i in zip(states, slots)],
                             list(kv.unbind(0)) + list(score.unbind(0)))
        done = [b for b, start in enumerate(starts) if start % m == m - 1]     # rows completing a block
        none = kv.new_empty(0, d, dtype=dtype)
        if not done:
            return [none] * len(starts)
        blocks_kv = torch.stack([states[b].kv for b in done])                 # [n, c*m, c*d]
        blocks_score = torch.stack([states[b].score for b in done])
        if self.overlap:
            # "a" halves of the previous block (slots :m) next to "b" halves of this one (m:)
            blocks_kv = torch.cat((blocks_kv[:, :m, :d], blocks_kv[:, m:, d:]), dim=1)     # [n, 2m, d]
            blocks_score = torch.cat((blocks_score[:, :m, :d], blocks_score[:, m:, d:]), dim=1)
            # this block becomes the previous one
            torch._foreach_copy_([states[b].kv[:m] for b in done] + [states[b].score[:m] for b in done],
                                 [states[b].kv[m:] for b in done] + [states[b].score[m:] for b in done])
        pooled = (blocks_kv * blocks_score.softmax(dim=1)).sum(dim=1)          # [n, d]
        blank_kv = kv.new_zeros(m, kv.shape[-1])                                # empty slots
        blank_score = kv.new_full((m, kv.shape[-1]), float("-inf"))
        torch._foreach_copy_([states[b].kv[cur:] for b in done] + [states[b].score[cur:] for b in done],
                             [blank_kv] * len(done) + [blank_score] * len(done))
        first_positions = device_ints([starts[b] - (m - 1) for b in done], kv.device)
        entries = self._finish(pooled.to(dtype), first_positions, inv_freq)
        out = [none] * len(starts)
        for i, b in enumerate(done):
            out[b] = entries[i: i + 1]
        return out

    def _pool(self, kv: torch.Tensor, score: torch.Tensor, start: int,
              state: CompressorState) -> torch.Tensor:
        """kv, score [S, c*d] (score incl. ape) of one row -> pooled entries [n, d] fp32 of the
        blocks completed now. Keeps the tokens of the unfinished block in the state."""
        m, d = self.ratio, self.head_dim
        cur = m if self.overlap else 0                 # first slot of the current block
        done = start % m                               # tokens of the current block already seen
        if done + kv.shape[0] < m:                     # no block completes (most decode steps)
            state.kv[cur + done: cur + done + kv.shape[0]] = kv
            state.score[cur + done: cur + done + kv.shape[0]] = score
            return kv.new_zeros(0, d)
        kv = torch.cat((state.kv[cur: cur + done], kv))            # starts at a block boundary
        score = torch.cat((state.score[cur: cur + done], score))
        n = kv.shape[0] // m                                        # blocks completed now (>= 1)
        blocks_kv = kv[: n * m].view(n, m, kv.shape[-1])            # [n, m, c*d]
        blocks_score = score[: n * m].view(n, m, kv.shape[-1])
        if self.overlap:
            # entry j: "a" halves of block j-1 (the state's previous block for the first one)
            # next to "b" halves of block j; softmax over the 2m candidates of each channel
            prev_kv = torch.cat((state.kv[None, :m], blocks_kv[:-1]))[..., :d]
            prev_score = torch.cat((state.score[None, :m], blocks_score[:-1]))[..., :d]
            blocks_kv = torch.cat((prev_kv, blocks_kv[..., d:]), dim=1)           # [n, 2m, d]
            blocks_score = torch.cat((prev_score, blocks_score[..., d:]), dim=1)
            state.kv[:m], state.score[:m] = kv[n * m - m: n * m], score[n * m - m: n * m]
        pooled = (blocks_kv * blocks_score.softmax(dim=1)).sum(dim=1)            # [n, d]
        rest = kv.shape[0] - n * m
        state.kv[cur: cur + rest], state.score[cur: cur + rest] = kv[n * m:], score[n * m:]
        state.kv[cur + rest: cur + m], state.score[cur + rest: cur + m] = 0.0, float("-inf")
        return pooled

    def _finish(self, entries: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """Norm, RoPE at `positions` (each block's first token), quantisation simulation.
        entries [n, d], positions [n] -> [n, d]."""
        entries = apply_rope(self.norm(entries), *rope_angles(positions, inv_freq))
        if self.quant_sim:
            if self.rotate:
                entries = fp4_fake_quant(hadamard_rotate(entries), 32)
            else:
                nope = self.head_dim - self.rope_head_dim
                entries = torch.cat((fp8_fake_quant(entries[:, :nope], 64), entries[:, nope:]), -1)
        return entries
