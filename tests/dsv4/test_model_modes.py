"""Model modes: the quantisation simulation, bf16 activations, quantised weight storage, MTP."""
from __future__ import annotations

import pytest
import torch

from dsv4.formats.fakequant import fp4_fake_quant, fp8_fake_quant
from dsv4.loading.testing import random_model
from dsv4.network.attention import Attention
from dsv4.network.compressor import Compressor
from dsv4.network.config import ModelConfig
from dsv4.network.indexer import Indexer
from dsv4.network.norm import RMSNorm

CFG = ModelConfig.tiny()
NOPE = CFG.head_dim - CFG.rope_head_dim


def _ids(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model(make_model):
    return make_model(CFG, seed=4)


def _chunked(model, ids, sizes):
    cache, out, pos = model.new_cache(), [], 0
    for n in sizes:
        out.append(model(ids[:, pos:pos + n], caches=[cache]))
        pos += n
    return torch.cat(out, 1), cache


def test_quant_sim_switch_reaches_every_layer(model):
    sims = [m for m in model.modules() if isinstance(m, (Attention, Compressor, Indexer))]
    assert len(sims) == 4 + 3 + 2 * 2 + 1          # attentions, compressors (incl. indexers'), indexers, MTP
    try:
        model.quant_sim = True
        assert model.quant_sim and all(m.quant_sim for m in sims)
    finally:
        model.quant_sim = False
    assert not any(m.quant_sim for m in sims)


def test_quant_sim_rounds_kv_and_index_keys(model):
    ids = _ids(140, seed=1)
    plain = model(ids)
    try:
        model.quant_sim = True
        sim, cache = _chunked(model, ids, [70, 1, 69])
        torch.testing.assert_close(sim, model(ids), atol=5e-5, rtol=0)          # still chunk-invariant
    finally:
        model.quant_sim = False
    # the simulation perturbs the logits a little, not a lot
    rel = (sim - plain).norm() / plain.norm()
    assert 1e-5 < rel < 0.2, rel
    for i, layer in enumerate(cache.layers):
        nope = layer.window[:, :NOPE]
        assert torch.equal(fp8_fake_quant(nope, 64), nope), i                    # on the FP8 grid
        assert not torch.equal(fp8_fake_quant(layer.window[:, NOPE:], 32), layer.window[:, NOPE:])
        if layer.compressed is not None and layer.compressed.n:
            entries = layer.compressed.view()[:, :NOPE]
            assert torch.equal(fp8_fake_quant(entries, 64), entries)
        if layer.indexer_keys is not None:
            keys = layer.indexer_keys.view()
            assert keys.shape[0] == 35 and torch.equal(fp4_fake_quant(keys, 32), keys)


def test_bf16_activations_track_fp32(make_model):
    ids = _ids(150, seed=2)
    ref = make_model(CFG, seed=5)(ids)
    half = make_model(CFG, seed=5).to(torch.bfloat16)
    assert half.dtype == torch.bfloat16
    got, cache = _chunked(half, ids, [100, 50])
    assert got.dtype == torch.float32 and cache.dtype == torch.bfloat16
    assert isinstance(half.layers[0].attn_norm, RMSNorm)
    rel = (got - ref).norm() / ref.norm()
    assert rel < 0.05, rel
    # top-1 agrees almost everywhere
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_quantised_weight_storage_runs_with_the_cache():
    model = random_model(CFG, seed=3, dequantize=False).eval()
    formats = {m.format for m in model.modules() if hasattr(m, "format")}
    assert {"fp8", "fp4", "float"} <= formats
    ids = _ids(133, seed=3)
    full = model(ids)
    chunked, _ = _chunked(model, ids, [5, 60, 1, 67])
    torch.testing.assert_close(chunked, full, atol=5e-5, rtol=0)
    assert full.abs().max() > 0.1


def test_mtp_block_names_and_logits(model):
    names = set(model.state_dict())
    for key in ["mtp.0.e_proj.weight", "mtp.0.h_proj.weight", "mtp.0.enorm.weight", "mtp.0.hnorm.weight",
                "mtp.0.norm.weight", "mtp.0.hc_head_fn", "mtp.0.hc_head_base", "mtp.0.hc_head_scale",
                "mtp.0.attn.wq_a.weight", "mtp.0.ffn.gate.bias", "mtp.0.hc_attn_fn"]:
        assert key in names, key
    assert not any(k.startswith(("mtp.0.embed", "mtp.0.head", "mtp.0.attn.compressor")) for k in names)
    ids = _ids(40, seed=6, batch=2)
    h = model.hidden_states(ids[:, :-1])                          # [B,S,hc,D] at tokens 0..38
    logits = model.mtp_logits(h, ids[:, 1:])
    assert logits.shape == (2, 39, CFG.vocab_size) and logits.dtype == torch.float32
    # causal in both inputs: later tokens change nothing before them
    ids2 = ids.clone()
    ids2[:, 30:] = (ids2[:, 30:] + 1) % CFG.vocab_size
    logits2 = model.mtp_logits(model.hidden_states(ids2[:, :-1]), ids2[:, 1:])
    torch.testing.assert_close(logits2[:, :29], logits[:, :29], atol=1e-5, rtol=0)
    assert (logits2[:, 29] - logits[:, 29]).abs().max() > 1e-3
    # its input: e_proj(enorm(embed(next))) added to every stream of h_proj(hnorm(h))
    mtp = model.mtp[0]
    seen = {}

    def record_input(module, args):
        seen["x"] = args[0]
    hook = mtp.register_forward_pre_hook(record_input)
    try:
        model.mtp_logits(h, ids[:, 1:])
    finally:
        hook.remove()
    e = model.embed(ids[:, 1:]).double()
    e = e / e.square().mean(-1, keepdim=True).add(CFG.norm_eps).sqrt() * mtp.enorm.weight.double()
    hn = h.double() / h.double().square().mean(-1, keepdim=True).add(CFG.norm_eps).sqrt()
    hn = hn * mtp.hnorm.weight.double()
    want = (e @ mtp.e_proj.weight.double().T)[:, :, None] + hn @ mtp.h_proj.weight.double().T
    torch.testing.assert_close(seen["x"].double(), want, atol=1e-4, rtol=1e-4)


def test_no_mtp_layer_is_an_error(make_model):
    small = make_model(CFG.replace(n_mtp_layers=0, compress_ratios=CFG.compress_ratios[:-1]), seed=0)
    with pytest.raises(ValueError, match="n_mtp_layers=0"):
        small.mtp_logits(torch.zeros(1, 2, CFG.hc_mult, CFG.dim), _ids(2, 0))
