"""Which checkpoint tensors a tensor-parallel rank reads, and which slice of each (reference §4,
the official convert.py): heads, output groups and vocabulary rows are split, whole routed experts
are dealt out to the ranks, everything else is replicated (dsv4/network/tensor_parallel.py says
what each rank holds and which collectives join them)."""
from __future__ import annotations

import re

from dsv4.network.tensor_parallel import TensorParallel

FP8_BLOCK = 128          # FP8 weights carry one scale per 128x128 block: shards must align to it

# (module path suffix, tensor) -> dimension split over the ranks
_SPLIT_DIM = {
    ("embed", "weight"): 0, ("head", "weight"): 0,
    ("attn.wq_b", "weight"): 0, ("attn.wo_a", "weight"): 0, ("attn.wo_b", "weight"): 1,
    ("attn", "attn_sink"): 0,
    ("indexer.wq_b", "weight"): 0, ("indexer.weights_proj", "weight"): 0,
}
_EXPERT = re.compile(r"(?:^|\.)ffn\.experts\.(\d+)\.")


def split_dim(name: str) -> int | None:
    """The dimension along which the checkpoint tensor `name` (a weight, or its `.scale`) is
    split over the ranks, or None (replicated, or a whole expert)."""
    owner, _, leaf = name.rpartition(".")
    for (suffix, tensor), dim in _SPLIT_DIM.items():
        if (owner == suffix or owner.endswith("." + suffix)) and leaf in (tensor, "scale"):
            return dim
    return None


def expert_of(name: str) -> int | None:
    """The routed-expert index of a checkpoint tensor name, or None."""
    m = _EXPERT.search(name)
    return int(m.group(1)) if m else None


def shard_headers(headers: dict[str, tuple[str, tuple[int, ...]]], tp: TensorParallel, n_experts: int
                  ) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, tuple[slice, ...]], list[str]]:
    """This rank's view of a checkpoint: (name -> (dtype code, local shape)) without the other
    ranks' experts, name -> the index that reads this rank's slice of a split tensor, and the
    problems found (a split that does not divide, or that cuts through an FP8 scale block)."""
    lo, hi = tp.local_range(n_experts)
    local: dict[str, tuple[str, tuple[int, ...]]] = {}
    index: dict[str, tuple[slice, ...]] = {}
    problems: list[str] = []
    for name, (code, shape) in headers.items():
        expert = expert_of(name)
        if expert is not None and not lo <= expert < hi:
            continue                                       # another rank's expert: never read
        dim = split_dim(name)
        if dim is None or tp.world == 1:
            local[name] = (code, shape)
            continue
        owner, _, leaf = name.rpartition(".")
        # a scale is split like its weight, in whole blocks; any other tensor by its own extent
        weight = headers.get(f"{owner}.weight") if leaf == "scale" else (code, shape)
        if weight is None or dim >= len(weight[1]) or dim >= len(shape):
            problems.append(f"{name}: {list(shape)} has no dimension {dim} to split over the ranks")
            continue
        full = weight[1][dim]                               # the weight's extent (rows / columns)
        if weight[0] == "I8":
            problems.append(f"{name}: a packed FP4 weight cannot be split over ranks")
            continue
        if full % tp.world:
            problems.append(f"{name}: {full} {'rows' if dim == 0 else 'columns'} do not split "
                            f"over {tp.world} ranks")
            continue
        per = full // tp.world
        if weight[0] == "F8_E4M3":                          # FP8 weight or its 128x128 scale
            if per % FP8_BLOCK:
                if leaf == "scale":
                    continue                                # reported once, with the weight
                problems.append(
                    f"{owner}: {tp.world} ranks would get {per} {'rows' if dim == 0 else 'columns'} each, "
                    f"not a multiple of the {FP8_BLOCK}-wide FP8 scale block (pick a world size that "
                    f"keeps every shard block-aligned)")
                continue
            if leaf == "scale":
                per //= FP8_BLOCK                           # the scale is split in whole blocks
        idx = [slice(None)] * len(shape)
        idx[dim] = slice(tp.rank * per, (tp.rank + 1) * per)
        index[name] = tuple(idx)
        local[name] = (code, tuple(per if d == dim else s for d, s in enumerate(shape)))
    return local, index, problems
