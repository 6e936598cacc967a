"""The engine with FP8 KV storage: same logits as the bf16 cache when the model simulates FP8 KV
(as trained), fewer bytes per token (the formula's), and sessions save and load in FP8."""
from __future__ import annotations

import pytest
import torch

from dsv4 import Engine, ModelConfig
from dsv4.runtime.errors import SessionMismatch

random_model = pytest.importorskip("dsv4.loading.testing").random_model
CFG = ModelConfig.tiny()


@pytest.fixture(scope="module")
def model():
    m = random_model(CFG, seed=3, dtype=torch.bfloat16)
    m.quant_sim = True  # KV NoPE dims rounded to FP8 in the graph, as in training
    return m


def test_fp8_cache_gives_the_same_logits_in_fewer_bytes(model, tmp_path):
    ids = torch.randint(0, CFG.vocab_size, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    plain, fp8 = (Engine(model, prefill_chunk=128, kv_fp8=f) for f in (False, True))
    a, b = plain.new_session(), fp8.new_session()
    fixed_a, fixed_b = a.kv_bytes(), b.kv_bytes()
    for lo, hi in ((0, 130), (130, 131), (131, 300)):
        assert torch.equal(a.append(ids[lo:hi]), b.append(ids[lo:hi]))
    assert fp8.kv_bytes_per_token < plain.kv_bytes_per_token
    # compressed entries: 2 CSA layers (300 // 4 = 75 rows each) + 1 HCA layer (2 rows)
    layer = fp8.sequence(b.sid).cache.layers[1]
    assert layer.compressed.stored().dtype == torch.uint8
    assert layer.compressed.stored().shape == (75, 136)  # 64 fp8 + 32 bf16 + 8 scale bytes
    assert layer.indexer_keys.stored().shape == (75, 34)  # 64 dims: 32 code + 2 scale bytes
    assert b.kv_bytes() - fixed_b < a.kv_bytes() - fixed_a
    c = fp8.load_session(b.save(tmp_path / "s"))
    nxt = ids[:5]
    assert torch.equal(c.append(nxt), b.append(nxt))
    with pytest.raises(SessionMismatch, match="fp8"):
        plain.load_session(tmp_path / "s")
