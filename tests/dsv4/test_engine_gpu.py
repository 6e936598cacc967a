"""The engine on a CUDA device, Flash attention dims: quantised KV storage is lossless under the
model's quantisation simulation; spill to host and back, save/load and forks keep the logits."""
from __future__ import annotations

import anyio
import pytest
import torch

from dsv4 import Engine, ModelConfig
from dsv4.network.model import Transformer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.flash().replace(n_layers=2, n_mtp_layers=0, n_hash_layers=1,
                                      compress_ratios=(4, 128), n_routed_experts=8,
                                      dtype="bf16", expert_dtype=None)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            m = Transformer(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    m.quant_sim = True
    return m.eval()


def ids(n, seed):
    return torch.randint(0, 129280, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


async def greedy(session, n):
    return [t async for t in session.generate(max_tokens=n, temperature=0, ignore_eos=True)]


def test_quantised_kv_is_lossless_on_gpu(model):
    plain, quant = (Engine(model, prefill_chunk=512, kv_fp8=q) for q in (False, True))
    a, b = plain.new_session(), quant.new_session()
    for lo, hi in ((0, 1000), (1000, 1001), (1001, 2600)):
        torch.testing.assert_close(a.append(ids(2600, 1)[lo:hi]), b.append(ids(2600, 1)[lo:hi]),
                                   atol=0, rtol=0)
    assert anyio.run(greedy, a, 8) == anyio.run(greedy, b, 8)
    grown_a = a.kv_bytes() - plain.new_session().kv_bytes()
    grown_b = b.kv_bytes() - quant.new_session().kv_bytes()
    assert grown_b < 0.6 * grown_a


def test_spill_save_load_fork_on_gpu(model, tmp_path):
    engine = Engine(model, prefill_chunk=512)
    s = engine.new_session(ids(1500, 2))
    child = s.fork()
    s.spill("host")
    assert s.location == "host" and engine.sequence(s.sid).cache.device.type == "cpu"
    nxt = ids(300, 3)
    back = s.append(nxt)
    assert s.location == "device"
    torch.testing.assert_close(child.append(nxt), back, atol=0, rtol=0)
    loaded = engine.load_session(s.save(tmp_path / "s"))
    assert anyio.run(greedy, loaded, 6) == anyio.run(greedy, s, 6)
