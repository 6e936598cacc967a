"""Random DeepSeek-V4 weights in the release format, for tests, benchmarks and the demo model.

`write_random_checkpoint(path, cfg, seed)` writes a folder in the official layout (same names,
dtypes, block sizes and sharding as the release, the real tokenizer), generated straight from
`checkpoint_layout(cfg)` so it checks the loader independently of the network code.
`random_model(cfg, seed)` is the model `load_model` would return for that folder, built in memory.
Values are scaled so activations stay O(1) through the network: linears N(0, 1/in), norms near 1,
hyper-connection maps near their neutral point, hash routes distinct experts per token.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from dsv4.formats import quant
from dsv4.loading.checkpoint import (
    ST_DTYPES,
    TensorSpec,
    build_model,
    checkpoint_layout,
    n_shards,
    write_checkpoint_folder,
)
from dsv4.network.config import ModelConfig


def _generator(seed: int, name: str) -> torch.Generator:
    """One stream per tensor: values do not depend on the order tensors are made in."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)


def _random_float(spec: TensorSpec, gen: torch.Generator) -> torch.Tensor:
    """A float tensor of `spec`'s logical shape (packed FP4 unpacked) scaled for its role."""
    leaf = spec.name.rpartition(".")[2]
    shape = spec.shape if spec.dtype != "I8" else (spec.shape[0], spec.shape[1] * 2)
    noise = torch.randn(shape, generator=gen)
    if spec.name == "embed.weight" or leaf == "attn_sink":
        return noise
    if leaf == "weight" and len(shape) == 1:                 # RMSNorm gains
        return 1 + 0.1 * noise
    if leaf == "weight" or leaf.endswith("_fn"):             # projections, hc maps [out, in]
        return noise * shape[1] ** -0.5
    if leaf.endswith("_scale"):                              # hc scales
        return 0.5 + 0.1 * noise
    return 0.1 * noise                                       # hc bases, ape, gate bias


def random_release_shards(cfg: ModelConfig, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Shards 1..n of a random checkpoint for `cfg`: {name: tensor in its release dtype}."""
    specs = checkpoint_layout(cfg)
    spec_of = {s.name: s for s in specs}
    for shard in range(1, n_shards(cfg) + 1):
        out: dict[str, torch.Tensor] = {}
        for spec in (s for s in specs if s.shard == shard):
            owner, _, leaf = spec.name.rpartition(".")
            if leaf == "scale" and f"{owner}.weight" in spec_of:
                continue                                      # made with its weight
            scale = spec_of.get(f"{owner}.scale") if leaf == "weight" else None
            gen = _generator(seed, spec.name)
            if scale is not None:
                w = _random_float(spec, gen)
                q, s = quant.quantize_fp8(w) if spec.dtype == "F8_E4M3" else quant.quantize_fp4(w)
                out[spec.name], out[scale.name] = q, s.to(ST_DTYPES[scale.dtype])
            elif spec.dtype == "I64":                         # tid2eid: k distinct experts a token
                keys = torch.rand(cfg.vocab_size, cfg.n_routed_experts, generator=gen)
                out[spec.name] = keys.argsort(dim=1)[:, : spec.shape[1]].contiguous()
            else:
                out[spec.name] = _random_float(spec, gen).to(ST_DTYPES[spec.dtype])
        yield out


def write_random_checkpoint(path: str | Path, cfg: ModelConfig | None = None, seed: int = 0
                            ) -> Path:
    """Write a random checkpoint for `cfg` (default `ModelConfig.tiny()`) in the official layout."""
    cfg = cfg if cfg is not None else ModelConfig.tiny()
    return write_checkpoint_folder(path, cfg, random_release_shards(cfg, seed))


def random_model(cfg: ModelConfig | None = None, seed: int = 0, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", dequantize: bool = True) -> nn.Module:
    """The model `load_model(write_random_checkpoint(p, cfg, seed), dtype=..., dequantize=...)`
    returns, built in memory (quant_sim off: the exact float network by default)."""
    cfg = cfg if cfg is not None else ModelConfig.tiny()
    headers = {s.name: (s.dtype, s.shape) for s in checkpoint_layout(cfg)}
    batches = (shard.items() for shard in random_release_shards(cfg, seed))
    return build_model(cfg, headers, batches, device=device, dtype=dtype, dequantize=dequantize,
                       quant_sim=False)
