"""Parameter and byte counts of DeepSeek-V4 computed from the configs and the checkpoint layout.

    python -m dsv4.loading.sizes        # Flash and Pro: total / active parameters, tensors, shards, bytes

Conventions that reproduce the release figures (284B / 13B Flash, 1.6T / 49B Pro; checkpoints of
148.66 and 805.33 "GB", which are GiB of whole shard files, headers included):
- parameters are weights in their logical form (a packed FP4 byte is two); quantisation scales
  and the integer hash-routing tables are not parameters;
- the MTP block is not counted (it is not part of the generating network);
- active = what one token touches: every dense weight, the shared expert and `n_activated_experts`
  routed experts per layer, the head; not the embedding table (a row lookup).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from dsv4.loading.checkpoint import ST_DTYPES, TensorSpec, checkpoint_layout, n_shards
from dsv4.loading.sharding import shard_headers
from dsv4.network.config import ModelConfig
from dsv4.network.tensor_parallel import TensorParallel

_ST_METADATA = {"format": "pt"}
# safetensors writes the data grouped by dtype in this order (its Dtype enum, descending), then
# by name; the order changes the offsets in the header, hence its length
_ST_DATA_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
                  "F8_E8M0", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")


def _is_parameter(spec: TensorSpec) -> bool:
    return not spec.name.endswith(".scale") and spec.dtype not in ("I64", "I32")


def _routed_expert(spec: TensorSpec) -> bool:
    return ".ffn.experts." in spec.name


def shard_file_bytes(specs: list[TensorSpec]) -> int:
    """Size of the safetensors file holding `specs`: 8-byte header length, the JSON header
    (compact, padded with spaces to a multiple of 8) and the data, laid out as the safetensors
    library does (grouped by dtype, then by name)."""
    ordered = sorted(specs, key=lambda s: (_ST_DATA_ORDER.index(s.dtype), s.name))
    header: dict = {"__metadata__": _ST_METADATA}
    offset = 0
    for s in ordered:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    n = len(json.dumps(header, separators=(",", ":")))
    return 8 + n + (-n % 8) + offset


@dataclass(frozen=True)
class ModelSizes:
    total_params: int
    active_params: int
    mtp_params: int
    tensors: int
    shards: int
    tensor_bytes: int
    file_bytes: int          # whole shard files, headers included


def model_sizes(cfg: ModelConfig) -> ModelSizes:
    specs = checkpoint_layout(cfg)
    params = [s for s in specs if _is_parameter(s)]
    main = [s for s in params if not s.name.startswith("mtp.")]
    total = sum(s.logical_numel for s in main)
    routed = sum(s.logical_numel for s in main if _routed_expert(s))
    embed = sum(s.logical_numel for s in main if s.name == "embed.weight")
    active = total - embed - routed * (1 - cfg.n_activated_experts / cfg.n_routed_experts)
    return ModelSizes(
        total_params=total, active_params=round(active),
        mtp_params=sum(s.logical_numel for s in params if s.name.startswith("mtp.")),
        tensors=len(specs), shards=n_shards(cfg), tensor_bytes=sum(s.nbytes for s in specs),
        file_bytes=sum(shard_file_bytes([s for s in specs if s.shard == k])
                       for k in range(1, n_shards(cfg) + 1)))


def report(name: str, cfg: ModelConfig) -> str:
    z = model_sizes(cfg)
    return (f"{name}: {z.total_params / 1e9:,.2f}B total / {z.active_params / 1e9:,.2f}B active "
            f"parameters (MTP block: {z.mtp_params / 1e9:.2f}B more)\n"
            f"  checkpoint: {z.tensors:,} tensors in {z.shards} shards, "
            f"{z.file_bytes / 2**30:,.2f} GiB on disk ({z.file_bytes:,} bytes; "
            f"tensor data {z.tensor_bytes / 2**30:,.2f} GiB)")


def main() -> None:
    print(report("DeepSeek-V4-Flash", ModelConfig.flash()))
    print(report("DeepSeek-V4-Pro", ModelConfig.pro()))


if __name__ == "__main__":
    main()


def rank_bytes(cfg: Any, world: int) -> list[int]:
    """Checkpoint bytes each rank reads (the release layout of `cfg`, stored dtypes), rank order;
    raises ValueError when the split does not divide or cuts an FP8 block."""
    headers = {s.name: (s.dtype, s.shape) for s in checkpoint_layout(cfg)}
    out = []
    for rank in range(world):
        tp = TensorParallel(rank, world)
        tp.check(cfg)
        local, _, problems = shard_headers(headers, tp, cfg.n_routed_experts)
        if problems:
            raise ValueError(f"cannot split over {world} ranks: {problems[0]}")
        out.append(sum(math.prod(shape) * ST_DTYPES[code].itemsize for code, shape in local.values()))
    return out
