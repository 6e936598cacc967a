from __future__ import annotations

import copy
import json

import pytest
from transformers import DeepseekV4Config

from dsv4.network.config import ModelConfig


@pytest.mark.parametrize("preset", ["flash", "pro", "tiny"])
def test_hf_round_trip(preset):
    cfg = getattr(ModelConfig, preset)()
    hf = cfg.to_hf_config()
    assert ModelConfig.from_hf_config(hf) == cfg
    # transformers reads our dict and re-serialises it in its own spelling; we read that back too
    reserialised = DeepseekV4Config(**copy.deepcopy(hf)).to_dict()
    assert ModelConfig.from_hf_config(reserialised) == cfg


def test_from_hf_config_path(tmp_path):
    cfg = ModelConfig.tiny()
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    assert ModelConfig.from_hf_config(tmp_path) == cfg
    assert ModelConfig.from_hf_config(tmp_path / "config.json") == cfg


def test_official_inference_keys_load():
    # the official inference/config.json of Flash (keys = ModelArgs fields)
    official = {"vocab_size": 129280, "dim": 4096, "moe_inter_dim": 2048, "n_layers": 43,
                "n_hash_layers": 3, "n_heads": 64, "n_routed_experts": 256, "n_shared_experts": 1,
                "n_activated_experts": 6, "score_func": "sqrtsoftplus", "route_scale": 1.5,
                "swiglu_limit": 10.0, "q_lora_rank": 1024, "head_dim": 512, "rope_head_dim": 64,
                "o_groups": 8, "o_lora_rank": 1024, "window_size": 128,
                "original_seq_len": 65536, "rope_theta": 10000, "rope_factor": 16,
                "beta_fast": 32, "beta_slow": 1, "index_n_heads": 64, "index_head_dim": 128,
                "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20, "dtype": "fp8",
                "scale_fmt": "ue8m0", "expert_dtype": "fp4", "compress_rope_theta": 160000,
                "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0]}
    assert ModelConfig(**official) == ModelConfig.flash()


def test_schedule():
    flash = ModelConfig.flash()
    kinds = [s.kind for s in flash.layers]
    assert kinds[:4] == ["sliding", "sliding", "csa", "hca"] and len(kinds) == 43
    assert kinds.count("csa") == 21 and kinds.count("hca") == 20
    assert [s.hash_routed for s in flash.layers[:4]] == [True, True, True, False]
    mtp = flash.layer_spec(43)
    assert mtp.is_mtp and mtp.kind == "sliding" and not mtp.hash_routed
    tiny = ModelConfig.tiny()
    assert {s.kind for s in tiny.layers} == {"sliding", "csa", "hca"}
    assert {s.hash_routed for s in tiny.layers} == {True, False}
    assert tiny.n_mtp_layers == 1


@pytest.mark.parametrize("change, key", [
    ({"compress_ratios": (0, 4, 3, 4, 0)}, "compress_ratios"),
    ({"compress_ratios": (0, 4, 128, 4)}, "compress_ratios"),
    ({"o_groups": 3}, "o_groups"),
    ({"n_hash_layers": 9}, "n_hash_layers"),
    ({"index_head_dim": 48}, "index_head_dim"),
    ({"rope_head_dim": 33}, "rope_head_dim"),
    ({"score_func": "relu"}, "score_func"),
    ({"n_activated_experts": 9}, "n_activated_experts"),
])
def test_validation_names_the_key(change, key):
    with pytest.raises(ValueError, match=key):
        ModelConfig.tiny().replace(**change)


def test_unknown_key_rejected():
    with pytest.raises(ValueError, match="n_layer"):
        ModelConfig(n_layer=3)


def test_hf_missing_key_named():
    hf = ModelConfig.tiny().to_hf_config()
    del hf["o_groups"]
    with pytest.raises(ValueError, match="o_groups"):
        ModelConfig.from_hf_config(hf)


def test_release_hf_config_json_gives_flash():
    # the HF config.json of DeepSeek-V4-Flash as released (keys per reference §1.1)
    release = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 129280,
        "hidden_size": 4096, "moe_intermediate_size": 2048, "num_hidden_layers": 43,
        "num_nextn_predict_layers": 1, "num_attention_heads": 64, "num_key_value_heads": 1,
        "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024,
        "sliding_window": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000, "compress_rope_theta": 160000,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        "max_position_embeddings": 1048576, "n_routed_experts": 256, "n_shared_experts": 1,
        "num_experts_per_tok": 6, "scoring_func": "sqrtsoftplus", "routed_scaling_factor": 1.5,
        "norm_topk_prob": True, "topk_method": "noaux_tc", "num_hash_layers": 3, "swiglu_limit": 10.0,
        "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "hc_mult": 4,
        "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "hidden_act": "silu", "attention_bias": False,
        "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
        "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "expert_dtype": "fp4",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    }
    assert ModelConfig.from_hf_config(release) == ModelConfig.flash()


def test_pro_preset_values():
    pro = ModelConfig.pro()
    assert (pro.dim, pro.n_layers, pro.n_heads, pro.n_routed_experts, pro.moe_inter_dim) == (7168, 61, 128, 384, 3072)
    assert (pro.q_lora_rank, pro.o_groups, pro.index_topk, pro.route_scale) == (1536, 16, 1024, 2.5)
    kinds = [s.kind for s in pro.layers]
    assert kinds[:3] == ["hca", "hca", "csa"] and kinds.count("csa") == 30 and kinds.count("hca") == 31
    assert pro.layer_spec(61).kind == "sliding"
