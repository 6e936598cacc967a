"""DeepSeek-V4 hyper-parameters.

`ModelConfig` fields are exactly the keys of the official `inference/config.json` (`ModelArgs`),
so an official config loads with `ModelConfig(**json.load(f))`. The HF `config.json` spells the
same numbers differently (`hidden_size`, `compress_ratios` or `layer_types`, `rope_scaling`, ...);
`from_hf_config` / `to_hf_config` translate.

The per-layer attention schedule comes from `compress_ratios` (one entry per main layer, then one
per MTP layer): 0 = sliding window only, 4 = CSA (overlapping compression + Lightning Indexer),
128 = HCA (dense over heavily compressed entries). Every layer also has the sliding window.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

AttentionKind = Literal["sliding", "csa", "hca"]
_KIND_OF_RATIO: dict[int, AttentionKind] = {0: "sliding", 4: "csa", 128: "hca"}
_HF_LAYER_TYPE = {"sliding": "sliding_attention", "csa": "compressed_sparse_attention",
                  "hca": "heavily_compressed_attention"}
_RATIO_OF_HF_LAYER_TYPE = {"sliding_attention": 0, "compressed_sparse_attention": 4,
                           "heavily_compressed_attention": 128}


@dataclass(frozen=True)
class LayerSpec:
    """What one block is built from (derived from the config, never stored in it)."""

    layer_id: int
    compress_ratio: int          # 0, 4 or 128
    kind: AttentionKind          # sliding / csa / hca
    hash_routed: bool            # MoE routes by tid2eid[token] instead of top-k scores
    is_mtp: bool


class ModelConfig(BaseModel):
    """Official `ModelArgs` fields, with the release (Flash) values as defaults where the official
    defaults are debug values (see reference §1.1: e.g. official `rope_factor` default 40)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # runtime sizes (the official static cache; our cache grows, max_seq_len bounds positions)
    max_batch_size: int = Field(4, ge=1)
    max_seq_len: int = Field(1048576, ge=1)
    # weight storage
    dtype: Literal["bf16", "fp8"] = "fp8"
    scale_fmt: Literal["ue8m0"] | None = "ue8m0"
    expert_dtype: Literal["fp4"] | None = "fp4"   # None: experts use `dtype`
    scale_dtype: Literal["fp32", "fp8"] = "fp8"
    # sizes
    vocab_size: int = Field(129280, ge=1)
    dim: int = Field(4096, ge=1)
    moe_inter_dim: int = Field(2048, ge=1)
    n_layers: int = Field(43, ge=1)
    n_hash_layers: int = Field(3, ge=0)
    n_mtp_layers: int = Field(1, ge=0)
    n_heads: int = Field(64, ge=1)
    # moe
    n_routed_experts: int = Field(256, ge=1)
    n_shared_experts: int = Field(1, ge=1, le=1)
    n_activated_experts: int = Field(6, ge=1)
    score_func: Literal["softmax", "sigmoid", "sqrtsoftplus"] = "sqrtsoftplus"
    route_scale: float = Field(1.5, gt=0)
    swiglu_limit: float = Field(10.0, ge=0)
    # attention (one shared K=V head)
    q_lora_rank: int = Field(1024, ge=1)
    head_dim: int = Field(512, ge=2)
    rope_head_dim: int = Field(64, ge=2)
    norm_eps: float = Field(1e-6, gt=0)
    o_groups: int = Field(8, ge=1)
    o_lora_rank: int = Field(1024, ge=1)
    window_size: int = Field(128, ge=1)
    compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4, 0)
    # rope / yarn
    compress_rope_theta: float = Field(160000.0, gt=0)
    original_seq_len: int = Field(65536, ge=0)
    rope_theta: float = Field(10000.0, gt=0)
    rope_factor: float = Field(16.0, gt=0)
    beta_fast: int = 32
    beta_slow: int = 1
    # lightning indexer
    index_n_heads: int = Field(64, ge=1)
    index_head_dim: int = Field(128, ge=2)
    index_topk: int = Field(512, ge=1)
    # manifold-constrained hyper-connections
    hc_mult: int = Field(4, ge=1)
    hc_sinkhorn_iters: int = Field(20, ge=1)
    hc_eps: float = Field(1e-6, gt=0)

    @model_validator(mode="after")
    def _check_consistency(self) -> ModelConfig:
        def bad(key: str, why: str) -> None:
            raise ValueError(f"{key}: {why}")

        n_ratios = self.n_layers + self.n_mtp_layers
        if len(self.compress_ratios) != n_ratios:
            bad("compress_ratios", f"needs n_layers + n_mtp_layers = {n_ratios} entries "
                f"(one per main layer, then one per MTP layer), got {len(self.compress_ratios)}")
        odd = sorted({r for r in self.compress_ratios if r not in _KIND_OF_RATIO})
        if odd:
            bad("compress_ratios", f"entries must be 0 (sliding), 4 (CSA) or 128 (HCA), got {odd}")
        if self.n_hash_layers > self.n_layers:
            bad("n_hash_layers", f"{self.n_hash_layers} exceeds n_layers={self.n_layers}")
        if self.n_activated_experts > self.n_routed_experts:
            bad("n_activated_experts",
                f"{self.n_activated_experts} exceeds n_routed_experts={self.n_routed_experts}")
        if self.rope_head_dim % 2 or self.rope_head_dim >= self.head_dim:
            bad("rope_head_dim", f"must be even and smaller than head_dim={self.head_dim}, "
                f"got {self.rope_head_dim}")
        if (self.head_dim - self.rope_head_dim) % 64:
            bad("head_dim", "head_dim - rope_head_dim (the NoPE dims) must be a multiple of 64, "
                "the FP8 KV block")
        if self.index_head_dim < self.rope_head_dim or self.index_head_dim % 32 \
                or self.index_head_dim & (self.index_head_dim - 1):
            bad("index_head_dim", f"must be a power of two, a multiple of 32 (FP4 block) and >= "
                f"rope_head_dim={self.rope_head_dim}, got {self.index_head_dim}")
        if self.n_heads % self.o_groups:
            bad("o_groups", f"must divide n_heads={self.n_heads}, got {self.o_groups}")
        if self.original_seq_len and self.beta_fast <= self.beta_slow:
            bad("beta_fast", f"must exceed beta_slow={self.beta_slow} for YaRN")
        return self

    # ---- derived schedule -------------------------------------------------------------------
    def layer_spec(self, layer_id: int) -> LayerSpec:
        """Layer ids 0..n_layers-1 are main blocks, n_layers.. are MTP blocks."""
        if not 0 <= layer_id < len(self.compress_ratios):
            raise IndexError(f"layer_id {layer_id} outside 0..{len(self.compress_ratios) - 1}")
        ratio = self.compress_ratios[layer_id]
        return LayerSpec(layer_id, ratio, _KIND_OF_RATIO[ratio],
                         hash_routed=layer_id < self.n_hash_layers, is_mtp=layer_id >= self.n_layers)

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        """Specs of the main blocks (MTP blocks excluded)."""
        return tuple(self.layer_spec(i) for i in range(self.n_layers))

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with some fields changed."""
        return ModelConfig(**{**self.model_dump(), **changes})

    # ---- presets ----------------------------------------------------------------------------
    @classmethod
    def flash(cls) -> ModelConfig:
        """DeepSeek-V4-Flash (284B total / 13B active)."""
        return cls()

    @classmethod
    def pro(cls) -> ModelConfig:
        """DeepSeek-V4-Pro (1.6T total / 49B active)."""
        return cls(dim=7168, moe_inter_dim=3072, n_layers=61, n_heads=128, n_routed_experts=384,
                   route_scale=2.5, q_lora_rank=1536, o_groups=16, index_topk=1024,
                   compress_ratios=(128, 128) + (4, 128) * 29 + (4, 0))

    @classmethod
    def tiny(cls) -> ModelConfig:
        """Small dims, every layer type: sliding (0), CSA (1, 3), HCA (2), hash-routed MoE
        (layers 0, 1), biased-gate MoE (2, 3 and MTP), one sliding-window MTP block. The window
        and the compression ratios are the real ones, so the cache logic is exercised as is;
        index_topk is small so top-k selection matters after 64 tokens."""
        return cls(vocab_size=512, dim=64, moe_inter_dim=32, n_layers=4, n_hash_layers=2,
                   n_heads=4, n_routed_experts=8, n_activated_experts=3, q_lora_rank=48,
                   head_dim=96, rope_head_dim=32, o_groups=2, o_lora_rank=32,
                   compress_ratios=(0, 4, 128, 4, 0), index_n_heads=4, index_head_dim=64,
                   index_topk=16, max_seq_len=65536)

    # ---- HF config.json ---------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: dict | str | Path) -> ModelConfig:
        """Read an HF `config.json` (a path to the file or its folder, or the parsed dict).
        Accepts both the DeepSeek release spelling (`compress_ratios`, `num_hash_layers`,
        `qk_rope_head_dim`, `rope_scaling`) and transformers' re-serialised one (`layer_types`,
        `mlp_layer_types`, `partial_rotary_factor`, `rope_parameters`)."""
        if not isinstance(config, dict):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            config = json.loads(path.read_text())
        hf = dict(config)

        def need(key: str) -> Any:
            if key not in hf:
                raise ValueError(f"HF config lacks required key {key!r}")
            return hf[key]

        n_layers = need("num_hidden_layers")
        n_mtp = hf.get("num_nextn_predict_layers", 1)
        if "compress_ratios" in hf:
            ratios = tuple(hf["compress_ratios"])
            if len(ratios) == n_layers:      # some exports drop the MTP entries
                ratios += (0,) * n_mtp
        elif "layer_types" in hf:
            try:
                ratios = tuple(_RATIO_OF_HF_LAYER_TYPE[t] for t in hf["layer_types"]) + (0,) * n_mtp
            except KeyError as e:
                raise ValueError(f"layer_types: unknown layer type {e.args[0]!r}") from None
        else:
            raise ValueError("HF config lacks required key 'compress_ratios' (or 'layer_types')")
        if "num_hash_layers" in hf:
            n_hash = hf["num_hash_layers"]
        elif "mlp_layer_types" in hf:
            n_hash = sum(t == "hash_moe" for t in hf["mlp_layer_types"])
        else:
            n_hash = 3
        head_dim = need("head_dim")
        if "qk_rope_head_dim" in hf:
            rope_head_dim = hf["qk_rope_head_dim"]
        else:
            rope_head_dim = round(head_dim * hf.get("partial_rotary_factor", 64 / 512))
        yarn = hf.get("rope_scaling") or (hf.get("rope_parameters") or {}).get("compress") or {}
        if hf.get("num_key_value_heads", 1) != 1:
            raise ValueError(f"num_key_value_heads: DeepSeek-V4 has one shared KV head, "
                             f"got {hf['num_key_value_heads']}")
        quant = hf.get("quantization_config") or {}
        fields = {
            "max_seq_len": hf.get("max_position_embeddings", 1048576),
            "dtype": "fp8" if quant.get("quant_method") == "fp8" else "bf16",
            "scale_fmt": quant.get("scale_fmt", "ue8m0" if quant else None),
            "expert_dtype": hf.get("expert_dtype", quant.get("expert_dtype")),
            "vocab_size": need("vocab_size"), "dim": need("hidden_size"),
            "moe_inter_dim": need("moe_intermediate_size"), "n_layers": n_layers,
            "n_hash_layers": n_hash, "n_mtp_layers": n_mtp, "n_heads": need("num_attention_heads"),
            "n_routed_experts": need("n_routed_experts"),
            "n_shared_experts": hf.get("n_shared_experts", 1),
            "n_activated_experts": need("num_experts_per_tok"),
            "score_func": hf.get("scoring_func", "sqrtsoftplus"),
            "route_scale": hf.get("routed_scaling_factor", 1.0),
            "swiglu_limit": hf.get("swiglu_limit", 0.0), "q_lora_rank": need("q_lora_rank"),
            "head_dim": head_dim, "rope_head_dim": rope_head_dim,
            "norm_eps": hf.get("rms_norm_eps", 1e-6), "o_groups": need("o_groups"),
            "o_lora_rank": need("o_lora_rank"), "window_size": hf.get("sliding_window", 128),
            "compress_ratios": ratios,
            "compress_rope_theta": hf.get("compress_rope_theta", yarn.get("rope_theta", 160000.0)),
            "original_seq_len": yarn.get("original_max_position_embeddings", 0),
            "rope_theta": hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("main", {})
                              .get("rope_theta", 10000.0)),
            "rope_factor": yarn.get("factor", 1.0),
            "beta_fast": yarn.get("beta_fast", 32), "beta_slow": yarn.get("beta_slow", 1),
            "index_n_heads": need("index_n_heads"), "index_head_dim": need("index_head_dim"),
            "index_topk": need("index_topk"), "hc_mult": hf.get("hc_mult", 4),
            "hc_sinkhorn_iters": hf.get("hc_sinkhorn_iters", 20), "hc_eps": hf.get("hc_eps", 1e-6),
        }
        try:
            return cls(**fields)
        except ValidationError as e:
            raise ValueError(f"HF config does not give a valid DeepSeek-V4 config:\n{e}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """The HF `config.json` dict in the DeepSeek release spelling (which transformers'
        `DeepseekV4Config(**d)` also accepts)."""
        hf: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
            "vocab_size": self.vocab_size, "hidden_size": self.dim,
            "moe_intermediate_size": self.moe_inter_dim, "num_hidden_layers": self.n_layers,
            "num_hash_layers": self.n_hash_layers, "num_nextn_predict_layers": self.n_mtp_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": 1,
            "n_routed_experts": self.n_routed_experts, "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.n_activated_experts, "scoring_func": self.score_func,
            "norm_topk_prob": True, "routed_scaling_factor": self.route_scale,
            "swiglu_limit": self.swiglu_limit, "q_lora_rank": self.q_lora_rank,
            "head_dim": self.head_dim, "qk_rope_head_dim": self.rope_head_dim,
            "rms_norm_eps": self.norm_eps, "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank, "sliding_window": self.window_size,
            "compress_ratios": list(self.compress_ratios),
            "compress_rope_theta": self.compress_rope_theta, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len,
            "index_n_heads": self.index_n_heads, "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk, "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters, "hc_eps": self.hc_eps,
            "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
            "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
        }
        if self.original_seq_len:
            hf["rope_scaling"] = {"type": "yarn", "factor": self.rope_factor,
                                  "original_max_position_embeddings": self.original_seq_len,
                                  "beta_fast": self.beta_fast, "beta_slow": self.beta_slow}
        if self.dtype == "fp8":
            hf["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                         "quant_method": "fp8", "scale_fmt": self.scale_fmt,
                                         "weight_block_size": [128, 128]}
        if self.expert_dtype is not None:
            hf["expert_dtype"] = self.expert_dtype
        return hf
