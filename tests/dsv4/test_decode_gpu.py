"""Batched decode on a CUDA device (tiny dims, fp32): equal to per-row decode, and no host sync
from mHC, the compressor, the indexer, RoPE or the norms (no `.item()` / `.tolist()`, no blocking
`torch.tensor(list, device="cuda")`). Skips without a GPU."""
from __future__ import annotations

import pytest
import torch

from bench.bench_decode import OpCounter
from dsv4.network.config import ModelConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CFG = ModelConfig.tiny()
OWN = ("mhc", "compressor", "indexer", "rope", "norm", "host_ints")
PREFIXES = [3, 6, 7, 126, 127, 61]


def test_cuda_batched_decode_matches_per_row_without_syncs(make_model):
    model = make_model(CFG, seed=5).cuda()
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, CFG.vocab_size, (1, n), generator=g).cuda() for n in PREFIXES]
    batched, single = [], []
    for p in prompts:
        for caches in (batched, single):
            caches.append(model.new_cache())
            model(p, caches=[caches[-1]])
    nxt = torch.randint(0, CFG.vocab_size, (len(PREFIXES), 1), generator=g).cuda()
    with torch.inference_mode(), OpCounter() as counter:
        got = model(nxt, caches=batched)
    for b in range(len(PREFIXES)):
        want = model(nxt[b:b + 1], caches=[single[b]])
        torch.testing.assert_close(got[b:b + 1], want, atol=1e-4, rtol=0)
    syncs = [s for s in counter.syncs if s.split(":")[0] in OWN]
    assert not syncs, syncs
