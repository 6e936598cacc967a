"""Tensor + expert parallel over NCCL, one GPU a rank (skipped without 2 CUDA devices): the same
checks as the gloo tests, on CUDA. The 2-rank model's logits equal one GPU's; `Engine(path, tp=2)`
generates the single-GPU engine's greedy tokens."""
from __future__ import annotations

import asyncio

import pytest
import torch

import dsv4
from dsv4 import ModelConfig, load_model
from dsv4.loading.testing import write_random_checkpoint
from dsv4.network.tensor_parallel import TensorParallel
from dsv4.runtime.launch import launch

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300, method="thread"),
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]

CFG = ModelConfig.tiny().replace(head_dim=128, rope_head_dim=64, o_groups=4, o_lora_rank=128,
                                 index_head_dim=128, max_seq_len=4096)
ATOL = 1e-4      # fp32 on GPU, TF32 off: only the summation order differs


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("tp-gpu") / "ckpt", CFG, seed=9)


def _nccl_logits_gap(tp: TensorParallel, path) -> float:
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda", tp.rank)
    full = load_model(path, device=device, dtype=torch.float32)
    part = load_model(path, device=device, dtype=torch.float32, tp=tp)
    ids = torch.randint(0, CFG.vocab_size, (2, 700), generator=torch.Generator().manual_seed(1)).to(device)
    caches = [part.new_cache(), part.new_cache()]
    chunked = torch.cat([part(ids[:, :300], caches=caches), part(ids[:, 300:], caches=caches)], dim=1)
    ref = full(ids)
    return max((part(ids) - ref).abs().max().item(), (chunked - ref).abs().max().item())


def test_nccl_model_matches_one_gpu(ckpt):
    gaps = launch(_nccl_logits_gap, 2, args=(ckpt,), backend="nccl", timeout_s=240)
    assert max(gaps) < ATOL, gaps


def test_nccl_engine_generates_the_single_gpu_tokens(ckpt):
    torch.backends.cuda.matmul.allow_tf32 = False

    def run(engine):
        async def go():
            s = engine.new_session(list(range(3, 400)))
            return [t async for t in s.generate(max_tokens=16, temperature=0, ignore_eos=True)]
        return asyncio.run(go())

    want = run(dsv4.Engine(ckpt, device="cuda:0", dtype=torch.float32))
    with dsv4.Engine(ckpt, tp=2, dtype=torch.float32, timeout_s=240) as engine:
        assert engine.device == torch.device("cuda", 0)
        assert run(engine) == want
