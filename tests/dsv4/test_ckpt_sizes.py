"""Sizes from the configs and the checkpoint layout against the release figures (reference §1.1,
§1.3, §4), and the byte model of a shard file against real files."""
from __future__ import annotations

import pytest
import torch

from dsv4.loading.checkpoint import checkpoint_layout, n_shards, shard_file_name
from dsv4.loading.sizes import main as sizes_main
from dsv4.loading.sizes import model_sizes, shard_file_bytes
from dsv4.loading.testing import write_random_checkpoint
from dsv4.network.config import ModelConfig

torch.set_num_threads(1)
GiB = 2**30


@pytest.fixture(scope="module")
def flash():
    return model_sizes(ModelConfig.flash())


@pytest.fixture(scope="module")
def pro():
    return model_sizes(ModelConfig.pro())


def test_flash_matches_the_release(flash):
    assert round(flash.total_params / 1e9) == 284
    assert round(flash.active_params / 1e9) == 13
    assert flash.tensors == 69_187 and flash.shards == 46
    assert round(flash.file_bytes / GiB, 2) == 148.66


def test_pro_matches_the_release(pro):
    assert round(pro.total_params / 1e12, 1) == 1.6
    assert round(pro.active_params / 1e9) == 49
    assert pro.tensors == 145_116 and pro.shards == 64
    assert round(pro.file_bytes / GiB, 2) == 805.33


def test_flash_mtp_shard():
    cfg = ModelConfig.flash()
    mtp = [s for s in checkpoint_layout(cfg) if s.shard == n_shards(cfg)]
    assert len(mtp) == 1_575 and all(s.name.startswith("mtp.0.") for s in mtp)
    assert round(shard_file_bytes(mtp) / 1e9, 2) == 3.59


@pytest.mark.parametrize("preset,rows", [
    ("flash", {
        "layers.2.attn.wq_a.weight": ((1024, 4096), "F8_E4M3"), "layers.2.attn.wq_a.scale": ((8, 32), "F8_E8M0"),
        "layers.2.attn.wq_b.scale": ((256, 8), "F8_E8M0"), "layers.2.attn.wkv.scale": ((4, 32), "F8_E8M0"),
        "layers.2.attn.wo_a.weight": ((8192, 4096), "F8_E4M3"), "layers.2.attn.wo_b.scale": ((32, 64), "F8_E8M0"),
        "layers.2.attn.attn_sink": ((64,), "F32"),
        "layers.2.attn.compressor.wkv.weight": ((1024, 4096), "BF16"), "layers.2.attn.compressor.ape": ((4, 1024), "F32"),
        "layers.3.attn.compressor.wgate.weight": ((512, 4096), "BF16"), "layers.3.attn.compressor.ape": ((128, 512), "F32"),
        "layers.2.attn.indexer.wq_b.scale": ((64, 8), "F8_E8M0"),
        "layers.2.attn.indexer.weights_proj.weight": ((64, 4096), "BF16"),
        "layers.2.attn.indexer.compressor.wkv.weight": ((256, 4096), "BF16"),
        "layers.2.attn.indexer.compressor.norm.weight": ((128,), "BF16"),
        "layers.0.hc_attn_fn": ((24, 16384), "F32"), "layers.0.hc_ffn_scale": ((3,), "F32"),
        "layers.3.ffn.gate.bias": ((256,), "F32"), "layers.2.ffn.gate.tid2eid": ((129280, 6), "I64"),
        "layers.5.ffn.experts.255.w1.weight": ((2048, 2048), "I8"), "layers.5.ffn.experts.255.w1.scale": ((2048, 128), "F8_E8M0"),
        "layers.5.ffn.experts.0.w2.weight": ((4096, 1024), "I8"), "layers.5.ffn.experts.0.w2.scale": ((4096, 64), "F8_E8M0"),
        "layers.5.ffn.shared_experts.w3.scale": ((16, 32), "F8_E8M0"), "layers.5.ffn.shared_experts.w2.scale": ((32, 16), "F8_E8M0"),
        "embed.weight": ((129280, 4096), "BF16"), "hc_head_fn": ((4, 16384), "F32"), "hc_head_scale": ((1,), "F32"),
        "mtp.0.e_proj.scale": ((32, 32), "F8_E8M0"), "mtp.0.hc_head_base": ((4,), "F32"),
    }),
    ("pro", {
        "layers.2.attn.wq_a.scale": ((12, 56), "F8_E8M0"), "layers.2.attn.wq_b.weight": ((65536, 1536), "F8_E4M3"),
        "layers.2.attn.wo_a.scale": ((128, 32), "F8_E8M0"), "layers.2.attn.wo_b.scale": ((56, 128), "F8_E8M0"),
        "layers.0.attn.compressor.ape": ((128, 512), "F32"), "layers.2.attn.indexer.wq_b.scale": ((64, 12), "F8_E8M0"),
        "layers.0.hc_attn_fn": ((24, 28672), "F32"),
        "layers.9.ffn.experts.383.w3.scale": ((3072, 224), "F8_E8M0"), "layers.9.ffn.experts.1.w2.weight": ((7168, 1536), "I8"),
        "layers.9.ffn.shared_experts.w1.scale": ((24, 56), "F8_E8M0"), "layers.9.ffn.shared_experts.w2.scale": ((56, 24), "F8_E8M0"),
    }),
])
def test_release_tensor_table(preset, rows):
    layout = {s.name: (s.shape, s.dtype) for s in checkpoint_layout(getattr(ModelConfig, preset)())}
    assert {name: layout.get(name) for name in rows} == rows
    if preset == "flash":
        assert "layers.0.attn.compressor.ape" not in layout              # Flash layers 0, 1: SWA
        assert "layers.3.ffn.gate.tid2eid" not in layout and "mtp.0.ffn.gate.bias" in layout


def test_shard_byte_model_matches_written_files(tmp_path):
    cfg = ModelConfig.tiny()
    path = write_random_checkpoint(tmp_path, cfg, seed=3)
    specs = checkpoint_layout(cfg)
    for k in range(1, n_shards(cfg) + 1):
        real = (path / shard_file_name(k, n_shards(cfg))).stat().st_size
        assert shard_file_bytes([s for s in specs if s.shard == k]) == real


def test_cli_prints_both_models(capsys):
    sizes_main()                                   # what `python -m dsv4.loading.sizes` runs
    out = capsys.readouterr().out
    assert "DeepSeek-V4-Flash: 284.33B total / 13.27B active" in out
    assert "69,187 tensors in 46 shards, 148.66 GiB" in out
    assert "DeepSeek-V4-Pro: 1,573.00B total / 48.85B active" in out
    assert "145,116 tensors in 64 shards, 805.33 GiB" in out
