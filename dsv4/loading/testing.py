"""Random DeepSeek-V4 weights in the release format, for tests, benchmarks and the demo model.

`write_random_checkpoint(path, cfg, seed)` writes a folder in the official layout (same names,
dtypes, block sizes and sharding as the release, the real tokenizer), generated straight from
`checkpoint_layout(cfg)` so it checks the loader independently of the network code.
`random_model(cfg, seed)` is the model `load_model` would return for that folder, built in memory.
`random_release_model(cfg, device)` builds a release-format model with random weights straight on
a device (no file, no CPU copy): Flash at full depth in a minute.
Values are scaled so activations stay O(1) through the network: linears N(0, 1/in), norms near 1,
hyper-connection maps near their neutral point, hash routes distinct experts per token.
"""
from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from dsv4.formats import quant
from dsv4.loading.checkpoint import (
    _FLOAT_IN_MEMORY,
    ST_DTYPES,
    TensorSpec,
    _check_against_model,
    _parameters_on_meta,
    _place,
    build_model,
    checkpoint_layout,
    n_shards,
    write_checkpoint_folder,
)
from dsv4.network.config import ModelConfig
from dsv4.network.linear import Linear
from dsv4.network.model import Transformer
from dsv4.network.moe import MoE


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


@torch.no_grad()
def random_release_model(cfg: ModelConfig, device: str | torch.device = "cuda", seed: int = 0, *,
                         dtype: torch.dtype = torch.bfloat16, quant_sim: bool = True) -> nn.Module:
    """A model of `cfg` in the release formats (FP8 linears, FP4 routed experts, UE8M0 scales)
    with random weights made straight on `device`, no checkpoint: what `load_model` of a release
    checkpoint gives, for benchmarks and GPU tests at sizes no file round trip could afford.
    FP8 weights are N(0, 1/in) quantised; FP4 experts are uniformly random codes with one scale
    exponent a matrix picked so the weights' RMS is about in^-1/2, written straight into the
    per-layer stacks the fused MoE reads (the experts' weights are views of them)."""
    device = torch.device(device)
    with _parameters_on_meta(), device:
        model = Transformer(cfg)
    layout = checkpoint_layout(cfg)
    _check_against_model(model, {s.name: (s.dtype, s.shape) for s in layout})
    expected = model.state_dict(keep_vars=True)
    gen = torch.Generator(device).manual_seed(seed)
    spec_of = {s.name: s for s in layout}
    rms_e2m1 = (sum(v * v for v in quant.E2M1_VALUES.tolist()) / 16) ** 0.5
    stacks: dict[str, torch.Tensor] = {}
    for spec in layout:
        owner, _, leaf = spec.name.rpartition(".")
        if leaf == "scale" and f"{owner}.weight" in spec_of:
            continue                                          # made with its weight
        if ".ffn.experts." in spec.name and spec.dtype == "I8":
            layer, _, rest = owner.partition(".ffn.experts.")
            expert, _, w = rest.partition(".")
            key = f"{layer}.{w}"
            if key not in stacks:                            # one stack per layer and matrix
                E, (out_f, half_in) = cfg.n_routed_experts, spec.shape
                exponent = round(math.log2((2 * half_in) ** -0.5 / rms_e2m1))
                codes = torch.randint(-128, 128, (E, out_f, half_in), generator=gen, device=device,
                                      dtype=torch.int8)
                scale_bytes = 127 + exponent + torch.randint(-1, 2, (E, out_f, 2 * half_in // quant.FP4_BLOCK),
                                                             generator=gen, device=device)
                stacks[key] = (codes, scale_bytes.to(torch.uint8).view(torch.float8_e8m0fnu))
            codes, scales = stacks[key]
            e = int(expert)
            _place(model, spec.name, codes[e])
            _place(model, f"{owner}.scale", scales[e])
            continue
        scale = spec_of.get(f"{owner}.scale") if leaf == "weight" else None
        if scale is not None:                                 # FP8 linear
            w = torch.randn(spec.shape, generator=gen, device=device) * spec.shape[1] ** -0.5
            q, s = quant.quantize_fp8(w)
            _place(model, spec.name, q)
            _place(model, scale.name, s.to(ST_DTYPES[scale.dtype]))
        elif spec.dtype == "I64":                             # tid2eid: k distinct experts a token
            keys = torch.rand(cfg.vocab_size, cfg.n_routed_experts, generator=gen, device=device)
            _place(model, spec.name, keys.argsort(dim=1)[:, : spec.shape[1]].contiguous())
        else:
            value = _random_float_on(spec, gen, device)
            _place(model, spec.name, value.to(torch.promote_types(ST_DTYPES[spec.dtype], dtype)
                                              if expected[spec.name].dtype.is_floating_point else expected[spec.name].dtype))
    for name, layer in model.named_modules():
        if isinstance(layer, Linear) and name.endswith(_FLOAT_IN_MEMORY) and layer.scale is not None:
            layer.dequantize_(dtype)
    model.quant_sim = quant_sim
    for module in model.modules():
        if isinstance(module, MoE):
            module.pack_experts()
    return model.eval()


def _random_float_on(spec: TensorSpec, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """`_random_float` drawn on `device` (the same roles and scales, another random stream)."""
    leaf = spec.name.rpartition(".")[2]
    noise = torch.randn(spec.shape, generator=gen, device=device)
    if spec.name == "embed.weight" or leaf == "attn_sink":
        return noise
    if leaf == "weight" and len(spec.shape) == 1:
        return 1 + 0.1 * noise
    if leaf == "weight" or leaf.endswith("_fn"):
        return noise * spec.shape[1] ** -0.5
    if leaf.endswith("_scale"):
        return 0.5 + 0.1 * noise
    return 0.1 * noise
