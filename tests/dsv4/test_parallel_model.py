"""Tensor + expert parallel model (dsv4/network/tensor_parallel.py, dsv4/loading/sharding.py) on CPU ranks over gloo: the W-rank model's
logits equal the single-process model's (fp32, atol below), for a full forward, chunked prefill +
batched decode and the MTP head; loading reads exactly the rank's slices; bad splits raise."""
from __future__ import annotations

import time
from typing import ClassVar

import pytest
import torch
import torch.distributed as dist

from dsv4 import CheckpointError, ModelConfig, Transformer, load_model
from dsv4.loading import checkpoint
from dsv4.loading.sharding import expert_of, split_dim
from dsv4.loading.sizes import rank_bytes
from dsv4.loading.testing import write_random_checkpoint
from dsv4.network.tensor_parallel import TensorParallel
from dsv4.runtime.launch import launch

# tiny() with every split block-aligned for 2 and 4 ranks: wq_b / indexer wq_b rows 4 x 128,
# wo_a rows 4 groups x 128, wo_b columns likewise (FP8 128x128 scale blocks)
CFG = ModelConfig.tiny().replace(head_dim=128, rope_head_dim=64, o_groups=4, o_lora_rank=128,
                                 index_head_dim=128)
ATOL = 2e-5      # fp32 logits (|logit| ~ 1-5): only the summation order differs between layouts
SEQ = 300        # > 128: HCA entries exist; > 64: the CSA top-16 is a real choice


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("tp") / "ckpt", CFG, seed=3)


def _compare_ranks(tp: TensorParallel, path) -> dict:
    """On every rank: the single-process model and this rank's part, fed the same ids."""
    torch.set_num_threads(1)
    full = load_model(path, dtype=torch.float32)
    part = load_model(path, dtype=torch.float32, tp=tp)
    ids = torch.randint(0, CFG.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(11))
    out = {"forward": (part(ids) - full(ids)).abs().max().item()}

    # chunked prefill (uneven chunks, rows at different positions) then batched decode
    caches = [part.new_cache(), part.new_cache()]
    got = [part(ids[:1, :100], caches=caches[:1]), part(ids[1:, :37], caches=caches[1:])]
    got.append(part(torch.stack([ids[0, 100:250], ids[1, 37:187]]), caches=caches))
    ref = full(ids)
    worst = max((got[0][0] - ref[0, :100]).abs().max(), (got[1][0] - ref[1, :37]).abs().max(),
                (got[2][0] - ref[0, 100:250]).abs().max(), (got[2][1] - ref[1, 37:187]).abs().max())
    rows = [[250, 187]]
    for _ in range(4):                                     # batched decode, one token a row
        step = torch.tensor([[ids[0, rows[-1][0]]], [ids[1, rows[-1][1]]]])
        logits = part(step, caches=caches, last_only=True)
        worst = max(worst, (logits[0, 0] - ref[0, rows[-1][0]]).abs().max(),
                    (logits[1, 0] - ref[1, rows[-1][1]]).abs().max())
        rows.append([rows[-1][0] + 1, rows[-1][1] + 1])
    out["chunked_decode"] = float(worst)

    h_full, h_part = full.hidden_states(ids[:, :-1]), part.hidden_states(ids[:, :-1])
    out["mtp"] = (part.mtp_logits(h_part, ids[:, 1:]) - full.mtp_logits(h_full, ids[:, 1:])).abs().max().item()
    # the K=V cache is replicated: this rank's cache holds the single-process entries
    fed = [part.new_cache(), full.new_cache()]
    part(ids[:1], caches=fed[:1])
    full(ids[:1], caches=fed[1:])
    state = [c.state_tensors() for c in fed]
    out["cache_bytes"] = [c.nbytes() for c in fed]
    out["cache"] = max((state[0][k].float() - state[1][k].float()).abs().max().item()
                       for k in state[1] if state[1][k].numel())
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])   # 4 ranks on 2 cores: ~10 s
def test_parallel_logits_match_single_process(ckpt, world):
    results = launch(_compare_ranks, world, args=(ckpt,), timeout_s=200)
    for rank, r in enumerate(results):
        assert r["forward"] < ATOL, (rank, r)
        assert r["chunked_decode"] < ATOL, (rank, r)
        assert r["mtp"] < ATOL, (rank, r)
        # the K=V cache is replicated: each rank holds what one process holds
        assert r["cache"] < ATOL and r["cache_bytes"][0] == r["cache_bytes"][1] > 0, (rank, r)


def test_each_rank_loads_exactly_its_slices(ckpt):
    full = load_model(ckpt, dtype=torch.float32).state_dict()
    parts = [load_model(ckpt, dtype=torch.float32, tp=TensorParallel(r, 2)).state_dict() for r in range(2)]
    full_bytes = sum(t.numel() * t.element_size() for t in full.values())
    for rank, part in enumerate(parts):
        experts = {expert_of(n) for n in part if expert_of(n) is not None}
        assert experts == set(range(rank * 4, rank * 4 + 4))           # whole experts, by range
        assert set(part) == {n for n in full if expert_of(n) is None or expert_of(n) in experts}
        for name, t in part.items():
            dim = split_dim(name)
            if dim is None:
                assert torch.equal(t, full[name]), name                  # replicated
                continue
            assert t.shape[dim] * 2 == full[name].shape[dim], name
            want = full[name].narrow(dim, rank * t.shape[dim], t.shape[dim])
            assert torch.equal(t.view(torch.uint8) if t.element_size() == 1 else t,
                               want.view(torch.uint8) if want.element_size() == 1 else want), name
        part_bytes = sum(t.numel() * t.element_size() for t in part.values())
        assert part_bytes < 0.75 * full_bytes        # experts and the vocab dominate: ~half each
    # the FP8 codes and their 128x128 scales were sliced consistently (not dequantised first)
    assert parts[1]["layers.1.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert parts[1]["layers.1.attn.wq_b.scale"].shape == (2, 1)
    assert parts[1]["layers.2.attn.wo_b.scale"].shape == (1, 2)
    assert parts[1]["layers.2.ffn.experts.5.w1.weight"].dtype == torch.int8     # FP4 experts as is


def test_split_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match=r"divisible by 3: n_heads=4, o_groups=4, index_n_heads=4, "
                                         r"n_routed_experts=8, vocab_size=512"):
        Transformer(CFG, TensorParallel(0, 3))
    misaligned = write_random_checkpoint(tmp_path / "tiny", ModelConfig.tiny())   # wq_b: 4 x 96 rows
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.wq_b: 2 ranks would get 192 rows each, "
                                              r"not a multiple of the 128-wide FP8 scale block"):
        load_model(misaligned, tp=TensorParallel(1, 2))
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, 2\)"):
        TensorParallel(2, 2)


def _fails_on_rank_1(tp: TensorParallel) -> int:
    if tp.rank == 1:
        raise KeyError("boom on rank 1")
    return tp.rank


@pytest.mark.timeout(120)
def test_launch_reports_a_failing_rank():
    with pytest.raises(RuntimeError, match=r"rank 1:(.|\n)*KeyError: 'boom on rank 1'"):
        launch(_fails_on_rank_1, 2, timeout_s=60)


def test_bytes_per_rank_of_the_release_models():
    flash = ModelConfig.flash()
    full, = rank_bytes(flash, 1)
    per_rank = rank_bytes(flash, 8)
    assert len(set(per_rank)) == 1                      # an even split
    assert full / 8 < per_rank[0] < full / 7            # experts, heads and vocab split; the rest is small
    with pytest.raises(ValueError, match="divisible by 16: o_groups=8"):
        rank_bytes(flash, 16)


def _rank_1_stalls(tp: TensorParallel) -> int:
    if tp.rank == 1:
        time.sleep(600)
    dist.barrier()                  # rank 0 waits here for rank 1 until the group's timeout
    return tp.rank


@pytest.mark.timeout(60)
def test_a_stalled_rank_times_out_instead_of_hanging():
    with pytest.raises(RuntimeError, match=r"rank 0:(.|\n)*[Tt]imed out"):
        launch(_rank_1_stalls, 2, timeout_s=5)


class _ReadSpy:
    """Wraps safetensors' safe_open and records every data read: (name, rows read) for a slice,
    (name, None) for a whole tensor. Header reads (get_slice(...).get_shape()) read no data."""

    reads: ClassVar[list[tuple[str, object]]] = []

    def __init__(self, *args, **kwargs):
        self.file = _REAL_SAFE_OPEN(*args, **kwargs)

    def __enter__(self):
        self.inner = self.file.__enter__()
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)

    def keys(self):
        return self.inner.keys()

    def get_tensor(self, name):
        _ReadSpy.reads.append((name, None))
        return self.inner.get_tensor(name)

    def get_slice(self, name):
        sl, reads = self.inner.get_slice(name), _ReadSpy.reads

        class Slice:
            def get_shape(self):
                return sl.get_shape()

            def get_dtype(self):
                return sl.get_dtype()

            def __getitem__(self, index):
                reads.append((name, index))
                return sl[index]
        return Slice()


_REAL_SAFE_OPEN = checkpoint.safe_open


def test_loading_reads_only_the_rank_slices_from_the_shards(ckpt, monkeypatch):
    monkeypatch.setattr(checkpoint, "safe_open", _ReadSpy)
    _ReadSpy.reads = []
    load_model(ckpt, dtype=torch.float32, tp=TensorParallel(1, 2))
    read = dict(_ReadSpy.reads)
    assert len(read) == len(_ReadSpy.reads)                         # nothing read twice
    experts = {expert_of(n) for n in read} - {None}
    assert experts == {4, 5, 6, 7}                                   # rank 1's experts only
    for name, index in read.items():
        if split_dim(name) is not None:                             # never the whole tensor
            assert index is not None and index[split_dim(name)].start > 0, name
        else:
            assert index is None, name
    assert read["layers.1.attn.wq_b.weight"] == (slice(256, 512), slice(None))
    assert read["layers.1.attn.wq_b.scale"] == (slice(2, 4), slice(None))   # whole 128-row blocks
    assert read["layers.1.attn.wo_b.scale"] == (slice(None), slice(2, 4))
