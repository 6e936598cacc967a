"""Each building block against a float64 reference written from the definitions (reference §2),
in a deliberately different shape (per query / per token loops, explicit matrices)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsv4.formats.fakequant import (
    fp4_fake_quant,
    fp8_fake_quant,
    hadamard_rotate,
    round_to_e2m1,
)
from dsv4.network.cache import LayerCache
from dsv4.network.config import ModelConfig
from dsv4.network.mhc import sinkhorn_split
from dsv4.network.rope import apply_rope, inv_frequencies, rope_angles

CFG = ModelConfig.tiny()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- mHC --------------------------------------------------------------------------------------
def test_sinkhorn_against_float64():
    hc, iters, eps = 4, 20, 1e-6
    mixes = torch.randn(5, 3, (2 + hc) * hc, generator=_gen(0)) * 2
    scale, base = torch.rand(3, generator=_gen(1)) + 0.5, torch.randn((2 + hc) * hc, generator=_gen(2))
    pre, post, comb = sinkhorn_split(mixes, scale, base, hc, iters, eps)

    m, s, b = mixes.double(), scale.double(), base.double()
    want_pre = 1 / (1 + torch.exp(-(m[..., :hc] * s[0] + b[:hc]))) + eps
    want_post = 2 / (1 + torch.exp(-(m[..., hc:2 * hc] * s[1] + b[hc:2 * hc])))
    c = torch.exp(m[..., 2 * hc:].reshape(5, 3, hc, hc) * s[2] + b[2 * hc:].reshape(hc, hc))
    c = c / c.sum(-1, keepdim=True) + eps
    for i in range(iters):
        if i:
            c = c / (c.sum(-1, keepdim=True) + eps)      # rows
        c = c / (c.sum(-2, keepdim=True) + eps)          # columns
    torch.testing.assert_close(pre.double(), want_pre, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(post.double(), want_post, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(comb.double(), c, atol=1e-6, rtol=1e-6)
    # doubly stochastic: columns exactly (the last op), rows approximately (20 iterations of
    # Sinkhorn-Knopp leave ~1e-3 on such peaked logits)
    torch.testing.assert_close(comb.sum(-2), torch.ones(5, 3, hc), atol=1e-5, rtol=0)
    torch.testing.assert_close(comb.sum(-1), torch.ones(5, 3, hc), atol=1e-2, rtol=0)


# ---- RoPE / YaRN ------------------------------------------------------------------------------
def test_yarn_frequencies_flash():
    flash = ModelConfig.flash()
    dim, base = 64, 160000.0
    plain = [base ** (-2 * i / dim) for i in range(dim // 2)]

    def pair(rot):
        return dim * math.log(65536 / (rot * 2 * math.pi)) / (2 * math.log(base))
    low, high = math.floor(pair(32)), math.ceil(pair(1))
    assert (low, high) == (15, 25)                      # reference §2.3
    ramp = [min(max((i - low) / (high - low), 0), 1) for i in range(dim // 2)]
    want = torch.tensor([f / 16 * r + f * (1 - r) for f, r in zip(plain, ramp)], dtype=torch.float64)
    torch.testing.assert_close(inv_frequencies(flash, compressed=True).double(), want, rtol=1e-6, atol=0)
    sliding = torch.tensor([10000.0 ** (-2 * i / dim) for i in range(dim // 2)], dtype=torch.float64)
    torch.testing.assert_close(inv_frequencies(flash, compressed=False).double(), sliding, rtol=1e-6, atol=0)


def test_rope_is_interleaved_complex_rotation_on_the_tail():
    cfg = ModelConfig.flash()
    freqs = inv_frequencies(cfg, compressed=True)
    x = torch.randn(2, 9, 3, 512, generator=_gen(3))                     # [B,S,H,d]
    positions = torch.tensor([[0, 1, 2, 3, 100, 1000, 65535, 65536, 1048575]] * 2)
    y = apply_rope(x, *rope_angles(positions, freqs))
    angles = positions.double()[..., None] * freqs.double()               # [B,S,32]
    z = torch.view_as_complex(x[..., -64:].double().reshape(2, 9, 3, 32, 2).contiguous())
    want = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[:, :, None]).flatten(-2)
    assert torch.equal(y[..., :448], x[..., :448])                        # NoPE dims untouched
    # fp32 angles at position ~1M carry ~1e-1 rad absolute error in any fp32 implementation
    # (the official table too); compare the exact-angle part tightly, the far part loosely
    torch.testing.assert_close(y[:, :6, :, -64:].double(), want[:, :6], atol=1e-4, rtol=0)
    back = apply_rope(y, *rope_angles(positions, freqs), inverse=True)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=0)


# ---- quantisation simulation -------------------------------------------------------------------
def _nearest_on_grid(v: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Distance from each value to the nearest grid point."""
    return (v.double()[..., None] - grid.double()).abs().min(-1).values


def test_fp8_fake_quant_is_nearest_e4m3_with_pow2_scales():
    x = torch.randn(6, 128, generator=_gen(4)) * torch.logspace(-3, 3, 6)[:, None]
    y = fp8_fake_quant(x, 64)
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()]
    for block in range(2):
        xs, ys = x[:, block * 64:(block + 1) * 64], y[:, block * 64:(block + 1) * 64]
        amax = xs.abs().amax(-1, keepdim=True)
        scale = torch.exp2(torch.ceil(torch.log2(amax / 448)))
        assert (amax / scale <= 448).all() and (2 * amax / scale > 448).all()   # smallest pow2
        on_grid = _nearest_on_grid(ys / scale, grid)
        assert on_grid.max() == 0
        # rounding to nearest: no grid point is closer to x/s than y/s
        assert ((xs / scale - ys / scale).abs().double() <= _nearest_on_grid(xs / scale, grid) + 1e-9).all()


def test_e2m1_rounding_ties_to_even():
    v = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, 6.0, 0.1, -4.9])
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -2.0, 6.0, 0.0, -4.0])
    assert torch.equal(round_to_e2m1(v), want)
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    grid = torch.cat((grid, -grid))
    x = torch.randn(4, 64, generator=_gen(5)) * 3
    y = fp4_fake_quant(x, 32)
    for block in range(2):
        xs, ys = x[:, block * 32:(block + 1) * 32], y[:, block * 32:(block + 1) * 32]
        scale = torch.exp2(torch.ceil(torch.log2(xs.abs().amax(-1, keepdim=True) / 6)))
        assert _nearest_on_grid(ys / scale, grid).max() == 0
        assert ((xs - ys).abs() / scale <= _nearest_on_grid(xs / scale, grid) + 1e-6).all()


def test_hadamard_matches_explicit_matrix_and_is_orthogonal():
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    h = h2
    for _ in range(6):
        h = torch.kron(h, h2)                                              # [128,128]
    x = torch.randn(3, 5, 128, generator=_gen(6))
    want = x.double() @ h / math.sqrt(128)
    y = hadamard_rotate(x)
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=0)
    a, b = x[0], x[1]
    torch.testing.assert_close((hadamard_rotate(a) * hadamard_rotate(b)).sum(-1), (a * b).sum(-1),
                               atol=1e-4, rtol=1e-5)


# ---- compressor, indexer, attention ------------------------------------------------------------
def _rope64(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, inverse=False) -> torch.Tensor:
    """float64 interleaved rotation of the last 2*len(freqs) dims; x [N, ..., dim], positions [N]."""
    rd = 2 * freqs.shape[0]
    angles = positions.double()[:, None] * freqs.double()
    rot = torch.polar(torch.ones_like(angles), -angles if inverse else angles)
    rot = rot.view(rot.shape[0], *([1] * (x.dim() - 2)), rot.shape[1])
    z = torch.view_as_complex(x[..., -rd:].reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.cat((x[..., :-rd], torch.view_as_real(z * rot).flatten(-2)), -1)


def _rms64(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.double()


def ref_entries(comp, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Compressed entries of a whole sequence x [S,D] from the definition (float64)."""
    m, d = comp.ratio, comp.head_dim
    kv = x.double() @ comp.wkv.weight.double().T
    score = x.double() @ comp.wgate.weight.double().T + comp.ape.double()[torch.arange(x.shape[0]) % m]
    out = []
    for j in range(x.shape[0] // m):
        cur = range(m * j, m * j + m)
        if comp.overlap:
            prev = range(m * (j - 1), m * j) if j else range(0)
            cand_kv = [kv[t, :d] for t in prev] + [kv[t, d:] for t in cur]
            cand_s = [score[t, :d] for t in prev] + [score[t, d:] for t in cur]
        else:
            cand_kv, cand_s = [kv[t] for t in cur], [score[t] for t in cur]
        w = torch.softmax(torch.stack(cand_s), dim=0)
        out.append((w * torch.stack(cand_kv)).sum(0))
    if not out:
        return torch.zeros(0, d, dtype=torch.float64)
    entries = _rms64(torch.stack(out), comp.norm.weight, CFG.norm_eps)
    return _rope64(entries, torch.arange(len(out)) * m, freqs)


@pytest.fixture(scope="module")
def model(make_model):
    return make_model(CFG, seed=2)


@pytest.mark.parametrize("layer_id, sizes", [(1, [3, 1, 1, 30, 7, 99]), (2, [100, 30, 1, 10]),
                                             (1, [141]), (2, [141])])
def test_compressor_against_definition(model, layer_id, sizes):
    attn = model.layers[layer_id].attn
    x = torch.randn(1, sum(sizes), CFG.dim, generator=_gen(7))
    for comp in [attn.compressor] + ([attn.indexer.compressor] if attn.kind == "csa" else []):
        state = LayerCache.empty(CFG, layer_id, "cpu", torch.float32)
        state = state.compressor if comp is attn.compressor else state.indexer_compressor
        got, pos = [], 0
        for n in sizes:
            got += comp(x[:, pos:pos + n], [pos], [state], attn.inv_freq)
            pos += n
        want = ref_entries(comp, x[0], attn.inv_freq)
        assert want.shape[0] == sum(sizes) // comp.ratio > 0
        torch.testing.assert_close(torch.cat(got).double(), want, atol=2e-5, rtol=1e-5)


def ref_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """One attention layer over x [S,D] from position 0, per query, float64."""
    S, H, d, W = x.shape[0], attn.n_heads, attn.head_dim, attn.window
    f = attn.inv_freq
    pos = torch.arange(S)
    xd = x.double()
    qr = _rms64(xd @ attn.wq_a.weight.double().T, attn.q_norm.weight, CFG.norm_eps)
    q = _rms64((qr @ attn.wq_b.weight.double().T).view(S, H, d), None, CFG.norm_eps)
    q = _rope64(q, pos, f)
    kv = _rope64(_rms64(xd @ attn.wkv.weight.double().T, attn.kv_norm.weight, CFG.norm_eps), pos, f)
    entries = ref_entries(attn.compressor, x, f) if attn.ratio else None
    if attn.kind == "csa":
        idx = attn.indexer
        keys = ref_entries(idx.compressor, x, f)
        qi = _rope64((qr @ idx.wq_b.weight.double().T).view(S, idx.n_heads, idx.head_dim), pos, f)
        hw = (xd @ idx.weights_proj.weight.double().T) / math.sqrt(idx.head_dim * idx.n_heads)
    out = []
    for t in range(S):
        keys_t = [kv[max(0, t - W + 1): t + 1]]
        n_vis = (t + 1) // attn.ratio if attn.ratio else 0
        if attn.kind == "hca":
            keys_t.append(entries[:n_vis])
        elif attn.kind == "csa" and n_vis:
            scores = (torch.relu(qi[t] @ keys[:n_vis].T) * hw[t][:, None]).sum(0)
            order = sorted(range(n_vis), key=lambda j: (-scores[j].item(), j))   # ties: older first
            keys_t.append(entries[sorted(order[: idx.topk])])
        k = torch.cat(keys_t)                                                   # [K,d]
        logits = torch.cat(((q[t] @ k.T) / math.sqrt(d), attn.attn_sink.double()[:, None]), -1)
        p = torch.softmax(logits, -1)[:, :-1]
        out.append(p @ k)                                                       # [H,d]
    o = _rope64(torch.stack(out), pos, f, inverse=True)                        # [S,H,d]
    g = attn.n_groups
    wo_a = attn.wo_a.weight.double().view(g, attn.o_lora_rank, -1)
    z = torch.einsum("sgi,gri->sgr", o.reshape(S, g, -1), wo_a).reshape(S, -1)
    return z @ attn.wo_b.weight.double().T


@pytest.mark.parametrize("layer_id", [0, 1, 2])
def test_attention_against_per_query_reference(model, layer_id):
    attn = model.layers[layer_id].attn
    S = 150                      # > window, >= one HCA block, CSA entries (37) > index_topk (16)
    x = torch.randn(1, S, CFG.dim, generator=_gen(8 + layer_id))
    cache = LayerCache.empty(CFG, layer_id, "cpu", torch.float32)
    with torch.no_grad():
        got = torch.cat((attn(x[:, :77], [0], [cache]), attn(x[:, 77:], [77], [cache])), 1)
    want = ref_attention(attn, x[0])
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got[0].double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layer_id", [1, 2])          # CSA (m=4), HCA (m=128)
def test_entry_visible_from_the_token_that_completes_it(make_model, layer_id):
    # a 2-token window isolates the compressed path: token m (first of block 1) reaches the
    # query at 2m-1 only through entry 1, completed by that very query token; the query at
    # 2m-2 (entries j < (2m-1) // m = 1) must not see it
    cfg = CFG.replace(window_size=2)
    attn = make_model(cfg, seed=3).layers[layer_id].attn
    m = attn.ratio
    x = torch.randn(1, 2 * m, cfg.dim, generator=_gen(11))
    y = x.clone()
    y[:, m] += 1.0

    def run(inp):
        with torch.no_grad():
            return attn(inp, [0], [LayerCache.empty(cfg, layer_id, "cpu", torch.float32)])[0]
    a, b = run(x), run(y)
    torch.testing.assert_close(b[:m], a[:m], atol=0, rtol=0)                    # causal
    torch.testing.assert_close(b[2 * m - 2], a[2 * m - 2], atol=0, rtol=0)      # entry 1 not yet
    assert (b[2 * m - 1] - a[2 * m - 1]).abs().max() > 1e-4


# ---- MoE --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer_id", [0, 3])          # hash-routed, biased top-k
def test_moe_against_per_token_reference(model, layer_id):
    moe = model.layers[layer_id].ffn
    x = torch.randn(2, 5, CFG.dim, generator=_gen(13)) * 3     # large enough to hit the clamps
    ids = torch.randint(0, CFG.vocab_size, (2, 5), generator=_gen(14))
    got = moe(x, ids)
    limit = CFG.swiglu_limit
    hit_clamp = False

    def expert64(e, v):
        nonlocal hit_clamp
        g, u = e.w1.weight.double() @ v, e.w3.weight.double() @ v
        hit_clamp |= bool((g > limit).any() or (u.abs() > limit).any())
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
        return g * torch.sigmoid(g) * u

    for b in range(2):
        for s in range(5):
            v = x[b, s].double()
            scores = torch.sqrt(F.softplus(moe.gate.weight.double() @ v))
            if moe.gate.hash_routed:
                chosen = moe.gate.tid2eid[ids[b, s]].tolist()
            else:
                chosen = torch.topk(scores + moe.gate.bias.double(), CFG.n_activated_experts).indices.tolist()
            w = scores[chosen] / scores[chosen].sum() * CFG.route_scale
            y = sum(moe.experts[e].w2.weight.double() @ (wi * expert64(moe.experts[e], v))
                    for e, wi in zip(chosen, w))
            y = y + moe.shared_experts.w2.weight.double() @ expert64(moe.shared_experts, v)
            torch.testing.assert_close(got[b, s].double(), y, atol=1e-4, rtol=1e-4)
    assert hit_clamp
