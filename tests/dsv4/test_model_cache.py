"""The per-sequence KV cache: chunked prefill of any chunking + decode == one full forward;
batched rows at different positions == separate runs; snapshot / restore / clone / save / load."""
from __future__ import annotations

import random

import pytest
import torch

from dsv4.network.cache import ModelCache
from dsv4.network.config import ModelConfig
from dsv4.network.options import ForwardOptions

CFG = ModelConfig.tiny()
ATOL = 5e-5


@pytest.fixture(scope="module")
def model(make_model):
    return make_model(CFG, seed=1)


def _ids(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))


def _run_chunked(model, ids: torch.Tensor, sizes: list[int], options: ForwardOptions | None = None) -> torch.Tensor:
    cache = model.new_cache()
    out, pos = [], 0
    for n in sizes:
        out.append(model(ids[:, pos: pos + n], caches=[cache], options=options))
        pos += n
    assert pos == ids.shape[1] and cache.length == pos
    return torch.cat(out, dim=1)


@pytest.fixture(scope="module")
def long_run(model):
    """One full forward over 300 tokens: crosses the 128 and 256 (HCA) boundaries."""
    ids = _ids(300, seed=7)
    return ids, model(ids)


def test_decode_every_position(model, long_run):
    # one token at a time: every position, every residue mod 4 and mod 128
    ids, full = long_run
    torch.testing.assert_close(_run_chunked(model, ids, [1] * 300), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("prefill", [1, 2, 3, 4, 5, 127, 128, 129, 130, 255, 256, 257])
def test_prefill_then_decode(model, long_run, prefill):
    ids, full = long_run
    n = prefill + 12
    got = _run_chunked(model, ids[:, :n], [prefill] + [1] * 12)
    torch.testing.assert_close(got, full[:, :n], atol=ATOL, rtol=0)


@pytest.mark.parametrize("seed", range(6))
def test_random_chunkings(model, long_run, seed):
    ids, full = long_run
    rng = random.Random(seed)
    sizes, left = [], 300
    while left:
        sizes.append(min(left, rng.choice([1, 2, 3, 4, 5, 7, 31, 64, 127, 128, 129, 200])))
        left -= sizes[-1]
    torch.testing.assert_close(_run_chunked(model, ids, sizes), full, atol=ATOL, rtol=0)


def test_last_only(model, long_run):
    ids, full = long_run
    cache = model.new_cache()
    last = model(ids[:, :150], caches=[cache], last_only=True)
    assert last.shape == (1, 1, CFG.vocab_size)
    torch.testing.assert_close(last, full[:, 149:150], atol=ATOL, rtol=0)


def test_batched_rows_at_different_positions(model, long_run):
    ids, full = long_run
    other = _ids(300, seed=8)
    other_full = model(other)
    a, b = model.new_cache(), model.new_cache()
    model(ids[:, :133], caches=[a])                  # row 0 at position 133
    model(other[:, :6], caches=[b])                  # row 1 at position 6
    # several tokens per row, then batched decode of the two sessions
    chunk = model(torch.cat((ids[:, 133:136], other[:, 6:9])), caches=[a, b])
    torch.testing.assert_close(chunk[0], full[0, 133:136], atol=ATOL, rtol=0)
    torch.testing.assert_close(chunk[1], other_full[0, 6:9], atol=ATOL, rtol=0)
    for step in range(4):
        step_ids = torch.stack((ids[0, 136 + step: 137 + step], other[0, 9 + step: 10 + step]))
        out = model(step_ids, caches=[a, b], last_only=True)
        torch.testing.assert_close(out[0, 0], full[0, 136 + step], atol=ATOL, rtol=0)
        torch.testing.assert_close(out[1, 0], other_full[0, 9 + step], atol=ATOL, rtol=0)
    assert (a.length, b.length) == (140, 13)


def test_batch_without_cache_equals_rows(model):
    ids = _ids(70, seed=3, batch=3)
    together = model(ids)
    for r in range(3):
        torch.testing.assert_close(together[r: r + 1], model(ids[r: r + 1]), atol=ATOL, rtol=0)


def test_snapshot_restore_and_clone(model, long_run):
    ids, full = long_run
    cache = model.new_cache()
    model(ids[:, :130], caches=[cache])
    snap = cache.snapshot()
    twin = cache.clone()
    # diverge: a different continuation, then roll back and take the real one
    model(_ids(70, seed=99), caches=[cache])
    cache.restore(snap)
    assert cache.length == 130
    torch.testing.assert_close(model(ids[:, 130:170], caches=[cache]), full[:, 130:170], atol=ATOL, rtol=0)
    # the clone is independent and continues the same way
    torch.testing.assert_close(model(ids[:, 130:135], caches=[twin]), full[:, 130:135], atol=ATOL, rtol=0)
    # a pre-clone snapshot restores on the clone too
    twin.restore(snap)
    torch.testing.assert_close(model(ids[:, 130:131], caches=[twin]), full[:, 130:131], atol=ATOL, rtol=0)


def test_stale_snapshot_rejected(model):
    ids = _ids(40, seed=5)
    cache = model.new_cache()
    model(ids[:, :10], caches=[cache])
    early = cache.snapshot()
    model(ids[:, 10:30], caches=[cache])
    late = cache.snapshot()
    cache.restore(early)
    model(ids[:, 30:40], caches=[cache])            # overwrites rows `late` relied on
    with pytest.raises(ValueError, match="no longer matches"):
        cache.restore(late)
    cache.restore(early)                             # still fine
    twin = cache.clone()
    model(ids[:, :5], caches=[twin])
    after_clone = twin.snapshot()
    with pytest.raises(ValueError, match="no longer matches"):
        cache.restore(after_clone)


def test_state_tensors_round_trip(model, long_run):
    ids, full = long_run
    cache = model.new_cache()
    model(ids[:, :202], caches=[cache])
    tensors = cache.state_tensors()
    assert tensors["layers.1.compressed"].shape == (202 // 4, CFG.head_dim)
    assert tensors["layers.1.indexer.keys"].shape == (202 // 4, CFG.index_head_dim)
    assert tensors["layers.2.compressed"].shape == (1, CFG.head_dim)
    loaded = ModelCache.from_state_tensors(CFG, {k: v.clone() for k, v in tensors.items()})
    assert loaded.length == 202
    torch.testing.assert_close(model(ids[:, 202:210], caches=[loaded]), full[:, 202:210], atol=ATOL, rtol=0)


def test_state_tensors_errors_name_the_key(model):
    cache = model.new_cache()
    model(_ids(9, seed=2), caches=[cache])
    tensors = cache.state_tensors()
    bad = dict(tensors)
    del bad["layers.3.indexer.keys"]
    with pytest.raises(ValueError, match="layers.3.indexer.keys"):
        ModelCache.from_state_tensors(CFG, bad)
    bad = dict(tensors, **{"layers.0.window": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="layers.0.window"):
        ModelCache.from_state_tensors(CFG, bad)
    bad = dict(tensors, **{"layers.1.compressed": tensors["layers.1.compressed"][:1]})
    with pytest.raises(ValueError, match="layers.1.compressed"):
        ModelCache.from_state_tensors(CFG, bad)


def test_to_device_and_nbytes_growth(model):
    cache = model.new_cache()
    fixed = cache.nbytes()
    # fixed part: rings + compressor kv/score states (CSA [8,192], its indexer [8,128], HCA [128,96])
    ring = CFG.n_layers * CFG.window_size * CFG.head_dim * 4
    states = 2 * (2 * 8 * 192 + 2 * 8 * 128) * 4 + 2 * 128 * 96 * 4    # 2 CSA layers, 1 HCA
    assert fixed == ring + states
    model(_ids(300, seed=4), caches=[cache])
    grown = cache.nbytes() - fixed
    used = sum(v.nbytes for k, v in cache.state_tensors().items() if k.endswith(("compressed", "keys")))
    assert used <= grown <= 2 * used + 2 * 16 * (CFG.head_dim + CFG.index_head_dim + CFG.head_dim) * 4
    moved = cache.to("cpu")
    assert moved is cache and cache.device.type == "cpu" and cache.length == 300


def test_bad_inputs_are_named(model):
    cache = model.new_cache()
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[CFG.vocab_size]]), caches=[cache])
    with pytest.raises(ValueError, match="2 caches for 1 rows"):
        model(_ids(3, 1), caches=[cache, model.new_cache()])
    with pytest.raises(ValueError, match="same cache"):
        model(_ids(3, 1, batch=2), caches=[cache, cache])
    small = CFG.replace(max_seq_len=16)
    with pytest.raises(ValueError, match="different ModelConfig"):
        model(_ids(3, 1), caches=[ModelCache.empty(small)])
    assert cache.length == 0                         # nothing was appended by failed calls


def test_max_seq_len_enforced(make_model):
    short = make_model(CFG.replace(max_seq_len=16), seed=0)
    cache = short.new_cache()
    short(_ids(10, 1), caches=[cache])
    with pytest.raises(ValueError, match="max_seq_len=16"):
        short(_ids(7, 1), caches=[cache])


def test_flash_cache_bytes_at_one_million_tokens():
    # the Flash cache on the meta device (shapes only), filled as a 1M-token chunked prefill
    # would: entries per layer grow linearly, 6,880 B/token in bf16 (reference §3.2)
    flash = ModelConfig.flash()
    cache = ModelCache.empty(flash, device="meta", dtype=torch.bfloat16)
    fixed = cache.nbytes()
    assert 17.0 * 2**20 < fixed < 17.1 * 2**20                   # ~17 MiB rings + compressor states
    chunk, total = 8192, 1 << 20
    for _ in range(total // chunk):
        for ratio, layer in zip(flash.compress_ratios, cache.layers):
            if ratio:
                layer.compressed.append(torch.empty(chunk // ratio, flash.head_dim, device="meta"))
            if ratio == 4:
                layer.indexer_keys.append(torch.empty(chunk // 4, flash.index_head_dim, device="meta"))
    assert cache.nbytes() - fixed == 6880 * total                  # 6.72 GiB: doubling ends exactly full
    with pytest.raises(RuntimeError, match="cache full"):
        cache.layers[2].compressed.append(torch.empty(1, flash.head_dim, device="meta"))


def test_tiny_workspace_blocks_give_the_same_logits(model, long_run):
    # one query per block everywhere (the path a 1M-token context takes) == the default blocks
    ids, full = long_run
    one_query = ForwardOptions(workspace_elems=1)
    torch.testing.assert_close(_run_chunked(model, ids[:, :260], [200, 60], one_query), full[:, :260],
                               atol=ATOL, rtol=0)
