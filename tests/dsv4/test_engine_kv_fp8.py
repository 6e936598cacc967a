"""The 584-byte FP8 KV entry: layout, accuracy against a float64 reference, lossless re-packing."""
from __future__ import annotations

import math

import pytest
import torch

from dsv4.formats.kv_fp8 import DSV4_LAYOUT as L
from dsv4.formats.kv_fp8 import Fp8KVLayout

torch.set_num_threads(1)


def _random_kv(seed, n=33):
    g = torch.Generator().manual_seed(seed)
    # per-entry magnitudes spread over many binades, so tiles get different scales
    mag = torch.exp2(torch.randint(-12, 8, (n, 1), generator=g).float())
    return (torch.randn(n, 512, generator=g) * mag).to(torch.bfloat16)


def _reference_fake_quant(kv: torch.Tensor) -> torch.Tensor:
    """float64: per 64-dim tile of the 448 NoPE dims, scale 2^ceil(log2(max(amax,1e-4)/448)),
    round x/scale to e4m3, multiply back; RoPE dims unchanged."""
    x = kv.double().clone()
    for e in range(x.shape[0]):
        for t in range(7):
            tile = x[e, 64 * t:64 * (t + 1)]
            scale = 2.0 ** math.ceil(math.log2(max(tile.abs().max().item(), 1e-4) / 448))
            q = (tile / scale).clamp(-448, 448).to(torch.float8_e4m3fn).double()
            x[e, 64 * t:64 * (t + 1)] = q * scale
    return x


@pytest.mark.parametrize("seed", range(3))
def test_pack_unpack_matches_float64_reference(seed):
    kv = _random_kv(seed)
    out = L.unpack(L.pack(kv), dtype=torch.float64)
    ref = _reference_fake_quant(kv)
    assert torch.equal(out, ref)
    assert torch.equal(out[:, 448:], kv[:, 448:].double())  # RoPE dims exact
    rel = ((out[:, :448] - kv[:, :448].double()).norm() / kv[:, :448].double().norm()).item()
    assert rel < 2 ** -4


def test_layout_is_584_bytes_with_ue8m0_scales_and_zero_pad():
    kv = _random_kv(7, n=4)
    packed = L.pack(kv)
    assert packed.shape == (4, 584) and packed.dtype == torch.uint8
    assert L.entry_bytes == 584
    assert torch.all(packed[:, 583] == 0)
    exps = packed[:, 576:583].long() - 127
    want = L.tile_scales(kv[:, :448]).log2().long()
    assert torch.equal(exps, want)
    assert torch.equal(packed[:, 448:576].contiguous().view(torch.bfloat16), kv[:, 448:])


def test_packing_already_quantised_kv_is_lossless():
    once = L.unpack(L.pack(_random_kv(11)))
    twice = L.unpack(L.pack(once))
    assert torch.equal(once.view(torch.int16), twice.view(torch.int16))


def test_leading_dims_are_kept_and_bad_shapes_rejected():
    kv = _random_kv(2, n=6).view(2, 3, 512)
    assert L.pack(kv).shape == (2, 3, 584)
    assert L.unpack(L.pack(kv)).shape == (2, 3, 512)
    with pytest.raises(ValueError, match="512"):
        L.pack(torch.zeros(2, 256))
    with pytest.raises(ValueError, match="584"):
        L.unpack(torch.zeros(2, 500, dtype=torch.uint8))


def test_smaller_head_dims_use_the_same_layout():
    tiny = Fp8KVLayout(head_dim=96, rope_dim=32)
    assert tiny.entry_bytes == 64 + 64 + 8
    kv = (torch.randn(5, 96, generator=torch.Generator().manual_seed(1))).to(torch.bfloat16)
    out = tiny.unpack(tiny.pack(kv))
    assert torch.equal(out[:, 64:], kv[:, 64:])
    assert ((out[:, :64].float() - kv[:, :64].float()).norm() / kv[:, :64].float().norm()) < 2 ** -4
    with pytest.raises(ValueError, match="multiple of 64"):
        Fp8KVLayout(head_dim=100, rope_dim=32)


def test_mxfp4_indexer_keys_are_68_bytes_and_lossless_on_fp4_rounded_keys():
    from dsv4.formats.fakequant import fp4_fake_quant, hadamard_rotate
    from dsv4.formats.kv_fp8 import Fp4Rows

    keys = torch.randn(9, 128, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    rounded = fp4_fake_quant(hadamard_rotate(keys), 32)  # what the model stores with quant_sim
    rows = Fp4Rows(128, max_rows=64, dtype=torch.bfloat16, device="cpu")
    rows.append(rounded[:4])
    rows.append(rounded[4:])
    assert rows.stored().shape == (9, 68) and rows.stored().dtype == torch.uint8
    assert torch.equal(rows.view().view(torch.int16), rounded.view(torch.int16))
    copy = rows.copy()
    copy.append(rows.stored()[:1])  # packed rows (as saved) are taken as they are
    assert torch.equal(copy.view()[9], rounded[0])
    with pytest.raises(ValueError, match="divisible by 32"):
        Fp4Rows(100, 8, torch.bfloat16, "cpu")
