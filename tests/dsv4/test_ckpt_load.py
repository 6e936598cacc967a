"""load_model / save_checkpoint on random checkpoints in the official layout (ModelConfig.tiny():
sliding, CSA and HCA layers, hash-routed and biased-gate MoE, an MTP block)."""
from __future__ import annotations

import json
import secrets
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsv4
from dsv4.formats import quant
from dsv4.loading.checkpoint import (
    INDEX_FILE,
    CheckpointError,
    checkpoint_layout,
    default_tokenizer_dir,
    n_shards,
    shard_file_name,
)
from dsv4.loading.testing import random_model, write_random_checkpoint
from dsv4.network.config import ModelConfig
from dsv4.network.linear import Linear
from dsv4.network.model import Transformer

torch.set_num_threads(1)
CFG = ModelConfig.tiny()


@pytest.fixture(scope="module")
def seed():
    s = secrets.randbits(31)
    print(f"seed={s}")
    return s


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, seed):
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"), CFG, seed=seed)


@pytest.fixture
def ids(seed):
    return torch.randint(0, CFG.vocab_size, (2, 37), generator=torch.Generator().manual_seed(seed))


def stored_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("model-*.safetensors")):
        out.update(load_file(f))
    return out


def load_error(path) -> str:
    with pytest.raises(CheckpointError) as err:
        dsv4.load_model(path)
    return str(err.value)


def edit_index(path, edit) -> None:
    index = json.loads((path / INDEX_FILE).read_text())
    edit(index["weight_map"])
    (path / INDEX_FILE).write_text(json.dumps(index))


def dequantised(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """A stored linear weight's float64 value, decoded by dsv4.formats.quant."""
    w, s = tensors[f"{name}.weight"], tensors.get(f"{name}.scale")
    if s is None:
        return w.double()
    if w.dtype == torch.float8_e4m3fn:
        return quant.dequantize_fp8(w, s, torch.float64)
    return quant.dequantize_fp4(w, s, torch.float64)


def float_twin(model: torch.nn.Module) -> Transformer:
    """A plain float32 Transformer holding the same (dequantised) weights."""
    twin = Transformer(model.cfg)
    state = {}
    for name, t in model.state_dict().items():
        owner = name.rpartition(".")[0]
        layer = model.get_submodule(owner) if owner else None
        if name.endswith(".scale") and isinstance(layer, Linear):
            continue
        if name.endswith(".weight") and isinstance(layer, Linear):
            t = layer.dequantized_weight(torch.float32)
        state[name] = t.float() if t.is_floating_point() else t
    twin.load_state_dict(state)
    return twin.eval()


# ---- the folder -------------------------------------------------------------------------------
def test_random_checkpoint_has_the_official_layout(ckpt):
    total = n_shards(CFG)
    assert total == CFG.n_layers + 3
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == sorted([shard_file_name(i, total) for i in range(1, total + 1)]
                           + ["config.json", INDEX_FILE, "tokenizer.json", "tokenizer_config.json"])
    assert files[0] == "config.json" and "model-00001-of-00007.safetensors" in files
    index = json.loads((ckpt / INDEX_FILE).read_text())
    layout = checkpoint_layout(CFG)
    assert index["weight_map"] == {s.name: shard_file_name(s.shard, total) for s in layout}
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in layout)
    assert index["weight_map"]["embed.weight"] == shard_file_name(1, total)
    assert index["weight_map"]["layers.2.attn.wq_a.weight"] == shard_file_name(4, total)
    assert index["weight_map"]["head.weight"] == shard_file_name(total - 1, total)
    assert index["weight_map"]["mtp.0.e_proj.scale"] == shard_file_name(total, total)
    for spec in layout:      # dtypes and shapes as stored in the shard headers
        with safe_open(ckpt / shard_file_name(spec.shard, total), "pt") as f:
            sl = f.get_slice(spec.name)
            assert (sl.get_dtype(), tuple(sl.get_shape())) == (spec.dtype, spec.shape), spec.name
    assert (ckpt / "tokenizer.json").read_bytes() == (default_tokenizer_dir() / "tokenizer.json").read_bytes()
    assert ModelConfig.from_hf_config(ckpt) == CFG


def test_release_dtypes_per_tensor_kind(ckpt):
    dtypes = {s.name: s.dtype for s in checkpoint_layout(CFG)}
    expect = {
        "layers.1.attn.wo_a.weight": "F8_E4M3", "layers.1.attn.wo_a.scale": "F8_E8M0",
        "layers.1.attn.wq_b.weight": "F8_E4M3", "layers.1.attn.compressor.wkv.weight": "BF16",
        "layers.1.attn.compressor.ape": "F32", "layers.1.attn.indexer.weights_proj.weight": "BF16",
        "layers.1.attn.indexer.wq_b.weight": "F8_E4M3", "layers.1.attn.attn_sink": "F32",
        "layers.1.ffn.gate.tid2eid": "I64", "layers.2.ffn.gate.bias": "F32",
        "layers.2.ffn.gate.weight": "BF16", "layers.2.ffn.experts.7.w2.weight": "I8",
        "layers.2.ffn.experts.7.w2.scale": "F8_E8M0", "layers.2.ffn.shared_experts.w1.weight": "F8_E4M3",
        "layers.0.hc_attn_fn": "F32", "layers.0.attn_norm.weight": "BF16", "embed.weight": "BF16",
        "head.weight": "BF16", "hc_head_scale": "F32", "mtp.0.h_proj.weight": "F8_E4M3",
        "mtp.0.enorm.weight": "BF16",
    }
    assert {k: dtypes[k] for k in expect} == expect
    assert not any(".compressor" in n for n in dtypes if n.startswith(("layers.0.", "mtp.")))
    assert any(n.startswith("layers.2.attn.compressor") for n in dtypes)        # HCA
    assert not any(n.startswith("layers.2.attn.indexer") for n in dtypes)


def test_model_names_are_the_layout_names_for_flash_shapes():
    """The network's state_dict keys plus the quantised linears' scales are exactly the layout,
    at Flash dims (fewer layers and experts, so the meta build stays quick)."""
    cfg = ModelConfig.flash().replace(n_layers=5, n_routed_experts=8,
                                      compress_ratios=(0, 0, 4, 128, 4, 0))
    from dsv4.loading.checkpoint import _check_against_model, _parameters_on_meta
    with _parameters_on_meta():
        model = Transformer(cfg)
    headers = {s.name: (s.dtype, s.shape) for s in checkpoint_layout(cfg)}
    _check_against_model(model, headers)          # raises listing any difference
    assert model.layers[2].attn.wq_a.format == "fp8"
    assert model.layers[2].ffn.experts[0].w1.weight.shape == (2048, 2048)
    assert model.layers[2].ffn.experts[0].w1.scale.shape == (2048, 128)


# ---- loading ----------------------------------------------------------------------------------
def test_tiny_has_every_layer_and_moe_kind():
    kinds = {(spec.kind, spec.hash_routed) for spec in CFG.layers}
    assert {k for k, _ in kinds} == {"sliding", "csa", "hca"}
    assert {h for _, h in kinds} == {True, False} and CFG.n_mtp_layers == 1


def test_load_keeps_release_formats_and_exact_values(ckpt):
    model = dsv4.load_model(ckpt, dtype=torch.float32)
    stored = stored_tensors(ckpt)
    assert isinstance(model, Transformer) and model.quant_sim is False and not model.training
    assert model.layers[1].attn.wq_a.format == "fp8"
    assert model.layers[1].ffn.experts[3].w1.format == "fp4"
    assert model.layers[1].ffn.experts[3].w1.weight.dtype == torch.int8
    assert model.layers[1].attn.wo_a.format == "float"          # read as weight slices
    assert model.layers[0].ffn.gate.tid2eid.dtype == torch.int64
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            assert torch.equal(module.dequantized_weight(torch.float64), dequantised(stored, name)), name
    sd = model.state_dict()
    for name in ("layers.1.attn.compressor.ape", "layers.0.hc_ffn_fn", "embed.weight",
                 "layers.3.ffn.gate.bias", "mtp.0.hnorm.weight"):
        assert sd[name].dtype == torch.float32 and torch.equal(sd[name], stored[name].float())
    assert torch.equal(sd["layers.0.ffn.gate.tid2eid"], stored["layers.0.ffn.gate.tid2eid"])


def test_f32_scales_load_to_the_same_weights(ckpt, tmp_path):
    """Checkpoints with float32 block scales (scale_dtype "fp32", as the Base models have)."""
    path = shutil.copytree(ckpt, tmp_path / "ckpt")
    for f in path.glob("model-*.safetensors"):
        save_file({k: v.float() if k.endswith(".scale") else v for k, v in load_file(f).items()}, f)
    a, b = dsv4.load_model(ckpt, dtype=torch.float32), dsv4.load_model(path, dtype=torch.float32)
    assert b.layers[2].ffn.experts[0].w2.scale.dtype == torch.float32
    for (name, la), lb in zip(a.named_modules(), b.modules()):
        if isinstance(la, Linear):
            assert torch.equal(la.dequantized_weight(torch.float32), lb.dequantized_weight(torch.float32)), name


def test_bf16_load_keeps_f32_tensors_f32(ckpt):
    model = dsv4.load_model(ckpt)                                  # default dtype bf16
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.layers[1].attn.attn_sink.dtype == torch.float32
    assert model.layers[1].attn.wo_a.weight.dtype == torch.bfloat16
    assert model.layers[1].attn.wq_b.weight.dtype == torch.float8_e4m3fn


def test_loaded_logits_equal_a_float_model_of_the_same_weights(ckpt, ids, seed):
    model = dsv4.load_model(ckpt, dtype=torch.float32)             # FP8 / FP4 on the fly
    twin = float_twin(model)
    expect = twin(ids)
    assert torch.equal(model(ids), expect)
    dense = dsv4.load_model(ckpt, dtype=torch.float32, dequantize=True)
    assert all(m.format == "float" for m in dense.modules() if isinstance(m, Linear))
    assert torch.equal(dense(ids), expect)
    assert torch.equal(random_model(CFG, seed=seed)(ids), expect)
    h = twin.hidden_states(ids)
    torch.testing.assert_close(model.mtp_logits(model.hidden_states(ids), ids),
                               twin.mtp_logits(h, ids), rtol=0, atol=0)


def test_quant_sim_is_passed_through(ckpt, ids):
    off = dsv4.load_model(ckpt, dtype=torch.float32)
    on = dsv4.load_model(ckpt, dtype=torch.float32, quant_sim=True)
    assert on.quant_sim and all(m.quant_sim for m in on.modules() if hasattr(m, "quant_sim"))
    assert not any(m.quant_sim for m in off.modules() if hasattr(m, "quant_sim"))
    assert not torch.equal(on(ids), off(ids))


# ---- errors -----------------------------------------------------------------------------------
def test_missing_unexpected_and_misshaped_tensors_are_listed_together(ckpt, tmp_path):
    broken = shutil.copytree(ckpt, tmp_path / "broken")
    shard = broken / shard_file_name(3, n_shards(CFG))              # layers.1
    tensors = load_file(shard)
    del tensors["layers.1.attn.kv_norm.weight"]
    tensors["layers.1.attn.wq_a.scale"] = torch.ones(3, 3, dtype=torch.float8_e8m0fnu)
    tensors["layers.1.attn.extra_thing"] = torch.zeros(2)
    tensors["layers.1.attn.attn_sink"] = tensors["layers.1.attn.attn_sink"].to(torch.int64)
    save_file(tensors, shard)

    def edit(weight_map):
        weight_map["layers.1.attn.extra_thing"] = shard.name
        del weight_map["layers.1.attn.kv_norm.weight"]

    edit_index(broken, edit)
    msg = load_error(broken)
    assert "4 problems" in msg
    assert "missing: layers.1.attn.kv_norm.weight" in msg
    assert "unexpected: layers.1.attn.extra_thing" in msg
    assert "wrong shape: layers.1.attn.wq_a.scale is [3, 3]" in msg and "needs [1, 1]" in msg
    assert "wrong dtype: layers.1.attn.attn_sink is I64" in msg


def test_index_naming_an_absent_tensor_or_shard(ckpt, tmp_path):
    broken = shutil.copytree(ckpt, tmp_path / "broken")
    edit_index(broken, lambda weight_map: weight_map.update({
        "layers.0.ghost": shard_file_name(2, n_shards(CFG)),
        "layers.0.other": "model-00099-of-00007.safetensors"}))
    msg = load_error(broken)
    assert "layers.0.ghost: listed in model.safetensors.index.json under model-00002" in msg
    assert "shard model-00099-of-00007.safetensors named in model.safetensors.index.json is missing" in msg
    with pytest.raises(FileNotFoundError, match="no config.json"):
        dsv4.load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither"):
        dsv4.load_model(tmp_path, config=CFG)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dsv4.load_model(tmp_path / "nowhere")


@pytest.mark.parametrize("change,error,match", [
    ({"hidden_size": None}, ValueError, "hidden_size"),
    ({"compress_ratios": [0, 4, 7, 4, 0]}, ValueError, "compress_ratios"),
    ({"hidden_size": 128}, CheckpointError, r"wrong shape: embed.weight is \[512, 64\]"),  # valid, but not these shards
])
def test_bad_config_keys_are_named(ckpt, tmp_path, change, error, match):
    path = shutil.copytree(ckpt, tmp_path / "ckpt")
    hf = json.loads((ckpt / "config.json").read_text())
    for key, value in change.items():
        if value is None:
            del hf[key]
        else:
            hf[key] = value
    (path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(error, match=match):
        dsv4.load_model(path)


# ---- saving -----------------------------------------------------------------------------------
def test_save_load_round_trip_is_exact(ckpt, tmp_path, ids, seed):
    model = random_model(CFG, seed=seed)                            # float32, dequantised
    out = dsv4.save_checkpoint(model, tmp_path / "saved")
    back = dsv4.load_model(out, dtype=torch.float32, dequantize=True)
    for (name, a), (name_b, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert name == name_b and torch.equal(a, b), name
    assert torch.equal(back(ids), model(ids))
    # the written tensors decode to the original checkpoint's values
    first, second = stored_tensors(ckpt), stored_tensors(out)
    assert first.keys() == second.keys()
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            assert torch.equal(dequantised(first, name), dequantised(second, name)), name


def test_saving_a_quantised_model_writes_the_same_bits(ckpt, tmp_path):
    model = dsv4.load_model(ckpt)                                  # FP8 / FP4 kept, bf16
    out = dsv4.save_checkpoint(model, tmp_path / "again")
    first, second = stored_tensors(ckpt), stored_tensors(out)
    for name, t in first.items():
        if ".wo_a." in name:                    # float in memory: equal values, maybe other codes
            continue
        assert t.dtype == second[name].dtype, name
        assert torch.equal(t.view(torch.uint8), second[name].view(torch.uint8)), name
    assert torch.equal(dequantised(first, "layers.1.attn.wo_a"), dequantised(second, "layers.1.attn.wo_a"))


def test_saving_a_fine_tune_quantises_like_the_release(tmp_path, ids, seed):
    model = random_model(CFG, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=gen) * 1e-3)   # off the FP8/FP4/bf16 grids
    out = dsv4.save_checkpoint(model, tmp_path / "ft")
    back = dsv4.load_model(out, dtype=torch.float32)
    w = model.layers[2].ffn.experts[1].w2.weight.detach()
    assert torch.equal(back.layers[2].ffn.experts[1].w2.dequantized_weight(torch.float32),
                       quant.dequantize_fp4(*quant.quantize_fp4(w)))
    w = model.layers[3].attn.wq_b.weight.detach()
    assert torch.equal(back.layers[3].attn.wq_b.dequantized_weight(torch.float32),
                       quant.dequantize_fp8(*quant.quantize_fp8(w)))
    assert torch.equal(back.embed.weight, model.embed.weight.bfloat16().float())
    assert torch.equal(back.layers[1].attn.attn_sink, model.layers[1].attn.attn_sink)   # F32
    rel = (back(ids) - model(ids)).norm() / model(ids).norm()
    assert 0 < rel < 0.2


def test_save_refuses_a_model_that_does_not_match_its_config(tmp_path, seed):
    model = random_model(CFG, seed=seed)
    with pytest.raises(ValueError, match="ModelConfig"):
        dsv4.save_checkpoint(torch.nn.Linear(2, 2), tmp_path)
    other = CFG.replace(n_routed_experts=4, n_activated_experts=2)
    with pytest.raises(CheckpointError, match="model has layers.1.ffn.experts.4.w1.weight"):
        dsv4.save_checkpoint(model, tmp_path / "x", config=other)


def test_save_names_a_linear_of_the_wrong_size(tmp_path, seed):
    model = random_model(CFG, seed=seed)
    model.layers[0].attn.wq_a = Linear(CFG.dim, CFG.q_lora_rank + 1)
    with pytest.raises(CheckpointError, match=r"layers.0.attn.wq_a.weight: the model's Linear\(64, 49\) "
                                              r"does not give the layout's \[48, 64\] F8_E4M3"):
        dsv4.save_checkpoint(model, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_load_keeps_formats_and_matches_cpu(ckpt, ids):
    gpu = dsv4.load_model(ckpt, device="cuda", dtype=torch.float32)
    assert gpu.quant_sim is True                          # default for quantised CUDA weights
    assert gpu.layers[1].attn.wq_b.weight.dtype == torch.float8_e4m3fn
    assert gpu.layers[1].attn.wq_b.weight.is_cuda and gpu.layers[1].ffn.experts[0].w1.scale.is_cuda
    gpu.quant_sim = False
    cpu = dsv4.load_model(ckpt, dtype=torch.float32)
    torch.testing.assert_close(gpu(ids.cuda()).cpu(), cpu(ids), rtol=1e-4, atol=1e-4)


def test_a_loaded_model_owns_its_memory(ckpt, tmp_path, ids, seed):
    """The loader copies out of the memory-mapped shards: zeroing the files in place (as a copy or
    download tool writing over them would) leaves the model unchanged; so does saving over them."""
    path = shutil.copytree(ckpt, tmp_path / "ckpt")
    model = dsv4.load_model(path)                                    # bf16: FP8 / FP4 kept as stored
    before = model(ids)
    for f in path.glob("model-*.safetensors"):
        with open(f, "r+b") as fh:
            fh.seek(4096)
            fh.write(bytes(f.stat().st_size - 4096))
    assert torch.equal(model(ids), before)
    dsv4.save_checkpoint(random_model(CFG, seed=seed + 1), path)      # other weights, same names
    assert torch.equal(model(ids), before)
    assert not torch.equal(dsv4.load_model(path)(ids), before)
