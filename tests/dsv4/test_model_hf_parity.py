"""Our Transformer == HF transformers' DeepseekV4ForCausalLM on the same random fp32 weights."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from dsv4.network.config import ModelConfig

# official name (after `layers.{i}.`) -> HF name (after `model.layers.{i}.`)
_LAYER_NAMES = {
    "attn.wq_a.weight": "self_attn.q_a_proj.weight", "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight", "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight", "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight", "attn.attn_sink": "self_attn.sinks",
    "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attn.compressor.ape": "self_attn.compressor.position_bias",
    "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "hc_attn_fn": "attn_hc.fn", "hc_attn_base": "attn_hc.base", "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn", "hc_ffn_base": "ffn_hc.base", "hc_ffn_scale": "ffn_hc.scale",
    "ffn.gate.weight": "mlp.gate.weight", "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
_GLOBAL_NAMES = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
                 "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
                 "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale"}


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if key in _GLOBAL_NAMES:
            out[_GLOBAL_NAMES[key]] = value
        elif key.startswith("layers.") and ".ffn.experts." not in key:
            _, i, rest = key.split(".", 2)
            out[f"model.layers.{i}.{_LAYER_NAMES[rest]}"] = value
        else:
            assert key.startswith(("mtp.", "layers.")), key       # HF does not build the MTP block
    for i in range(cfg.n_layers):
        experts = [f"layers.{i}.ffn.experts.{e}." for e in range(cfg.n_routed_experts)]
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat((sd[p + "w1.weight"], sd[p + "w3.weight"])) for p in experts])   # gate first
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([sd[p + "w2.weight"] for p in experts])
    return out


# 32 indexer heads: with 4, ReLU makes exact score ties (every head at 0) frequent, and HF's
# topk breaks ties differently from our stable "older entry first" rule.
PARITY_CFG = ModelConfig.tiny().replace(index_n_heads=32)


@pytest.fixture(scope="module")
def pair(make_model):
    ours = make_model(PARITY_CFG, seed=0)
    hf_cfg = DeepseekV4Config(**copy.deepcopy(PARITY_CFG.to_hf_config()))
    hf_cfg._attn_implementation = "eager"
    hf = DeepseekV4ForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), PARITY_CFG), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return ours, hf


@pytest.mark.parametrize("seq_len", [1, 7, 41, 131, 262])
def test_logits_match_hf(pair, seq_len):
    ours, hf = pair
    ids = torch.randint(0, PARITY_CFG.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(seq_len))
    got = ours(ids)
    with torch.no_grad():
        want = hf(ids).logits
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert want.abs().max() > 1.0                           # a live signal, not ~0
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_every_layer_kind_is_covered():
    kinds = {s.kind for s in PARITY_CFG.layers}
    assert kinds == {"sliding", "csa", "hca"}
    # at 262 tokens the CSA layers hold 65 entries, more than index_topk: top-k selection matters
    assert 262 // 4 > PARITY_CFG.index_topk and 262 // 128 >= 2
