"""The DeepSeek-V4 network (reference §2): embedding -> hc_mult residual streams -> blocks
(attention and MoE, each wrapped in mHC) -> final stream collapse -> RMSNorm -> vocab head.
Module and parameter names are the official checkpoint names, so `state_dict()` keys match a
checkpoint's (without the `.scale` tensors of quantised weights).

    model = Transformer(ModelConfig.tiny())
    logits = model(ids)                                  # [B,S,V] fp32, no cache
    caches = [model.new_cache() for _ in range(B)]
    logits = model(ids, caches=caches)                   # appends S tokens to every row's cache
    logits = model(next_ids[:, None], caches=caches, last_only=True)    # batched decode

`quant_sim` (default False: the exact float network) switches on the official in-graph
quantisation simulation (FP8 KV, Hadamard + FP4 indexer) in every layer.
"""
from __future__ import annotations

import torch
from torch import nn

from dsv4.network.attention import Attention
from dsv4.network.cache import LayerCache, ModelCache
from dsv4.network.config import ModelConfig
from dsv4.network.linear import Linear
from dsv4.network.mhc import hc_head, hc_post, hc_pre
from dsv4.network.moe import MoE
from dsv4.network.norm import RMSNorm
from dsv4.network.options import ForwardOptions, forward_options
from dsv4.network.tensor_parallel import (
    SINGLE,
    TensorParallel,
    VocabParallelEmbedding,
    VocabParallelHead,
)


def _hc_params(n_out: int, hc_dim: int, n_scales: int) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
    """(fn [n_out, hc*D], base [n_out], scale [n_scales]) fp32, small random fn."""
    fn = nn.Parameter(torch.randn(n_out, hc_dim, dtype=torch.float32) * hc_dim ** -0.5)
    base = nn.Parameter(torch.zeros(n_out, dtype=torch.float32))
    scale = nn.Parameter(torch.ones(n_scales, dtype=torch.float32))
    return fn, base, scale


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.cfg = cfg
        self.attn = Attention(cfg, layer_id, tp)
        self.ffn = MoE(cfg, layer_id, tp)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        n_mix, hc_dim = (2 + cfg.hc_mult) * cfg.hc_mult, cfg.hc_mult * cfg.dim
        self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = _hc_params(n_mix, hc_dim, 3)
        self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = _hc_params(n_mix, hc_dim, 3)

    def forward(self, h: torch.Tensor, token_ids: torch.Tensor, starts: list[int],
                caches: list[LayerCache]) -> torch.Tensor:
        """h [B,S,hc,D] streams -> [B,S,hc,D]."""
        mhc = {"iters": self.cfg.hc_sinkhorn_iters, "norm_eps": self.cfg.norm_eps, "hc_eps": self.cfg.hc_eps}
        x, post, comb = hc_pre(h, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base, **mhc)
        h = hc_post(self.attn(self.attn_norm(x), starts, caches), h, post, comb)
        x, post, comb = hc_pre(h, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base, **mhc)
        return hc_post(self.ffn(self.ffn_norm(x), token_ids), h, post, comb)


class MTPBlock(Block):
    """Multi-token prediction block (reference §2.8): from the main model's final streams at t
    and the embedding of token t+1, predicts token t+2. Shares `embed` and `head` with the main
    model (passed in, not owned, so they do not reappear under `mtp.0.` in the state dict)."""

    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TensorParallel = SINGLE):
        super().__init__(cfg, layer_id, tp)
        self.e_proj = Linear(cfg.dim, cfg.dim)
        self.h_proj = Linear(cfg.dim, cfg.dim)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = _hc_params(cfg.hc_mult, cfg.hc_mult * cfg.dim, 1)

    def logits(self, h_main: torch.Tensor, next_ids: torch.Tensor, embed: nn.Embedding,
               head: Linear, caches: list[LayerCache], starts: list[int]) -> torch.Tensor:
        """h_main [B,S,hc,D], next_ids [B,S] -> logits [B,S,V] fp32."""
        e = self.enorm(embed(next_ids))                                        # [B,S,D]
        h = self.e_proj(e).unsqueeze(2) + self.h_proj(self.hnorm(h_main))      # [B,S,hc,D]
        h = self(h, next_ids, starts, caches)
        x = hc_head(h, self.hc_head_fn, self.hc_head_scale, self.hc_head_base,
                    norm_eps=self.cfg.norm_eps, hc_eps=self.cfg.hc_eps)
        return head(self.norm(x).float()).float()


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE):
        """tp: this rank's place in a tensor-parallel group (dsv4/parallel.py); the default, one
        process, is the whole model."""
        super().__init__()
        tp.check(cfg)
        self.cfg, self.tp = cfg, tp
        if tp.world == 1:
            self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
            self.head = Linear(cfg.dim, cfg.vocab_size)
        else:                   # vocab-parallel: this rank's rows, lookups summed, logits gathered
            self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.dim, tp)
            self.head = VocabParallelHead(cfg.dim, cfg.vocab_size, tp)
        self.layers = nn.ModuleList(Block(cfg, i, tp) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = _hc_params(cfg.hc_mult, cfg.hc_mult * cfg.dim, 1)
        self.mtp = nn.ModuleList(MTPBlock(cfg, cfg.n_layers + i, tp) for i in range(cfg.n_mtp_layers))
        self._quant_sim = False

    # ---- switches and caches ------------------------------------------------------------------
    @property
    def quant_sim(self) -> bool:
        """Official in-graph quantisation simulation (FP8 KV, Hadamard + FP4 indexer) on/off."""
        return self._quant_sim

    @quant_sim.setter
    def quant_sim(self, on: bool) -> None:
        self._quant_sim = bool(on)
        for module in self.modules():
            if module is not self and hasattr(module, "quant_sim"):
                module.quant_sim = self._quant_sim

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype: that of the embedding table."""
        return self.embed.weight.dtype

    def new_cache(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ModelCache:
        """An empty cache for one sequence (default: the model's device and activation dtype)."""
        return ModelCache.empty(self.cfg, device or self.embed.weight.device, dtype or self.dtype)

    # ---- forward ------------------------------------------------------------------------------
    def _check(self, input_ids: torch.Tensor, caches: list[ModelCache]) -> None:
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [B, S] with S >= 1, got {list(input_ids.shape)}")
        if len(caches) != input_ids.shape[0]:
            raise ValueError(f"got {len(caches)} caches for {input_ids.shape[0]} rows of input_ids")
        lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()             # one host sync, not two
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}), got [{lo}, {hi}]")
        for i, c in enumerate(caches):
            if c.cfg != self.cfg:
                raise ValueError(f"caches[{i}] was made for a different ModelConfig")
            if c.device != self.embed.weight.device:
                raise ValueError(f"caches[{i}] is on {c.device}, the model on {self.embed.weight.device}")
            if c.length + input_ids.shape[1] > self.cfg.max_seq_len:
                raise ValueError(f"caches[{i}]: {c.length} + {input_ids.shape[1]} tokens exceed "
                                 f"max_seq_len={self.cfg.max_seq_len}")
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("the same cache appears in two rows")

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, caches: list[ModelCache] | None = None,
                      options: ForwardOptions | None = None) -> torch.Tensor:
        """input_ids [B,S] -> final residual streams [B,S,hc,D] (before the collapse). With
        `caches`, row b continues caches[b] and the S tokens are appended to it. `options`: how
        the forward runs (kernels, workspaces; dsv4/network/options.py), not what it computes;
        None = the ones applied around the call, else the defaults."""
        if caches is None:
            caches = [self.new_cache() for _ in range(input_ids.shape[0])]
        self._check(input_ids, caches)
        starts = [c.length for c in caches]
        h = self.embed(input_ids)                                              # [B,S,D]
        h = h.unsqueeze(2).repeat(1, 1, self.cfg.hc_mult, 1)                   # [B,S,hc,D]
        with (options or forward_options()).applied():
            for i, layer in enumerate(self.layers):
                h = layer(h, input_ids, starts, [c.layers[i] for c in caches])
        for c in caches:
            c.length += input_ids.shape[1]
        return h

    @torch.no_grad()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Streams [B,S,hc,D] -> logits [B,S,V] fp32."""
        x = hc_head(h, self.hc_head_fn, self.hc_head_scale, self.hc_head_base,
                    norm_eps=self.cfg.norm_eps, hc_eps=self.cfg.hc_eps)
        return self.head(self.norm(x).float()).float()

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, caches: list[ModelCache] | None = None,
                last_only: bool = False, options: ForwardOptions | None = None) -> torch.Tensor:
        """input_ids [B,S] -> logits [B,S,V] fp32 ([B,1,V] with last_only). Without caches the
        rows start at position 0 and nothing is kept; with caches see `hidden_states`."""
        with (options or forward_options()).applied():
            h = self.hidden_states(input_ids, caches)
            return self.logits(h[:, -1:] if last_only else h)

    @torch.no_grad()
    def mtp_logits(self, h: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """MTP head over a whole sequence from position 0: main streams h [B,S,hc,D] (from
        `hidden_states`) at positions t and the ids of tokens t+1 [B,S] -> logits [B,S,V] for
        tokens t+2."""
        if not self.mtp:
            raise ValueError("this config has no MTP layer (n_mtp_layers=0)")
        B = h.shape[0]
        caches = [LayerCache.empty(self.cfg, self.cfg.n_layers, h.device, self.dtype) for _ in range(B)]
        return self.mtp[0].logits(h, next_ids, self.embed, self.head, caches, [0] * B)
