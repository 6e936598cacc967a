"""dsv4_kernels.sparse_attention (Triton; the interpreter on CPU) against its torch reference computed
in float64 on the same inputs, and dsv4's Attention through the kernel against its torch path."""
from __future__ import annotations

import zlib

import pytest
import torch

import dsv4_kernels
from dsv4_kernels import sparse_attention, sparse_attention_reference

pytestmark = pytest.mark.skipif(not dsv4_kernels.triton_available(), reason="Triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# ||out - ref|| / ||ref|| against float64 on the same (already rounded) inputs: fp32 dots are exact
# fp32; bf16 dots round P to bf16 on a GPU (the interpreter runs them in fp32)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def make_inputs(g, *, S, H, d, window, n_prev, N, k=0, dtype=torch.float32, batch=()):
    """Fresh random q [..,S,H,d], window keys [..,n_prev+S,d], entries [..,N,d] (rows scaled so
    the softmax is neither flat nor one-hot), sink [H] and CSA picks [..,S,k] with -1s."""
    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)
    q, win, ent = rnd(*batch, S, H, d), rnd(*batch, n_prev + S, d), rnd(*batch, N, d)
    sink = torch.randn(H, generator=g).to(DEVICE)
    picks = torch.randint(-1, max(N, 1), (*batch, S, k), generator=g).to(DEVICE)
    return q, win, ent, sink, picks


def rel_err(out, ref):
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    return ((out.double() - ref).norm() / ref.norm()).item()


def check(q, win, ent, sink, dtype, **kw):
    out = sparse_attention(q, win, ent, sink, **kw)
    ref = sparse_attention_reference(q.double(), win.double(), None if ent is None else ent.double(),
                                     sink.double(), **kw)
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.2e} over {TOL[dtype]:.0e} ({kw.get('picks') is not None=})"
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["window", "csa", "hca"])
@pytest.mark.parametrize("S,H,d,window,n_prev", [
    (12, 4, 64, 8, 0),      # from position 0: the first queries have fewer than `window` keys
    (9, 4, 64, 16, 5),      # a chunk after 5 earlier tokens, still below a full window
    (20, 5, 48, 8, 8),      # full ring before the chunk; head count and d not powers of two
])
def test_kernel_matches_float64_reference(mode, dtype, S, H, d, window, n_prev):
    g = torch.Generator().manual_seed(zlib.crc32(repr((mode, dtype, S, H, d, n_prev)).encode()))
    N = 10
    q, win, ent, sink, picks = make_inputs(g, S=S, H=H, d=d, window=window, n_prev=n_prev, N=N,
                                           k=6, dtype=dtype)
    kw = dict(scale=d ** -0.5, window=window, n_prev=n_prev)
    if mode == "csa":
        picks[0] = -1                          # a query that picked nothing
        picks[1, :3] = N + 2                   # out of range: treated as none, like -1
        kw["picks"] = picks
    elif mode == "hca":
        n_vis = torch.randint(0, N + 1, (S,), generator=g).to(DEVICE)
        n_vis[0], n_vis[1] = 0, N + 5          # none visible; more than exist (clamped to N)
        kw["n_visible"] = n_vis
    check(q, win, None if mode == "window" else ent, sink, dtype, **kw)


def test_compressed_keys_and_sink_change_the_result():
    """Guards against a kernel that ignores a term: dropping picks or the sink must move the output."""
    g = torch.Generator().manual_seed(1)
    q, win, ent, sink, picks = make_inputs(g, S=6, H=4, d=64, window=8, n_prev=3, N=12, k=5)
    kw = dict(scale=64 ** -0.5, window=8, n_prev=3)
    full = check(q, win, ent, sink, torch.float32, picks=picks, **kw)
    no_picks = check(q, win, ent, sink, torch.float32, picks=torch.full_like(picks, -1), **kw)
    big_sink = check(q, win, ent, sink + 30.0, torch.float32, picks=picks, **kw)
    assert (full - no_picks).abs().max() > 1e-3
    assert big_sink.abs().max() < 1e-6 * full.abs().max()      # the sink takes all the mass


def test_batched_rows_equal_single_rows():
    g = torch.Generator().manual_seed(2)
    q, win, ent, sink, picks = make_inputs(g, S=3, H=4, d=64, window=8, n_prev=8, N=9, k=4, batch=(3,))
    kw = dict(scale=0.125, window=8, n_prev=8)
    batched = check(q, win, ent, sink, torch.float32, picks=picks, **kw)
    for b in range(3):
        single = sparse_attention(q[b], win[b], ent[b], sink, picks=picks[b], **kw)
        torch.testing.assert_close(batched[b], single, rtol=0, atol=0)


def test_real_head_shape_csa_decode():
    """DSV4 sizes (H=64, d=512, window 128, 64 picks here): a few decode-like queries."""
    g = torch.Generator().manual_seed(3)
    q, win, ent, sink, picks = make_inputs(g, S=2, H=64, d=512, window=128, n_prev=128, N=80, k=64,
                                           dtype=torch.bfloat16)
    check(q, win, ent, sink, torch.bfloat16, picks=picks, scale=512 ** -0.5, window=128, n_prev=128)


@pytest.mark.parametrize("change, message", [
    (dict(window_kv=torch.zeros(7, 64)), "window_kv must be"),
    (dict(picks=torch.zeros(4, 3)), "picks must be an integer"),
    (dict(n_visible=torch.zeros(4, dtype=torch.int64)), "not both"),
    (dict(sink=torch.zeros(3)), "sink must be"),
    (dict(n_prev=9), "n_prev must be"),
    (dict(entries=None), "need entries"),
])
def test_bad_input_names_the_argument(change, message):
    args = dict(q=torch.randn(4, 4, 64), window_kv=torch.randn(8 + 4, 64), entries=torch.randn(5, 64),
                sink=torch.randn(4), scale=0.125, window=8, n_prev=8,
                picks=torch.zeros(4, 3, dtype=torch.int64))
    args.update(change)
    for fn in (sparse_attention, sparse_attention_reference):
        with pytest.raises(ValueError, match=message):
            fn(**args)


def test_attention_layers_through_the_kernel_equal_the_torch_path(monkeypatch):
    """The tiny model (sliding, CSA and HCA layers; window 128, ratios 4 / 128, top-16) with
    chunked prefill past 128 tokens then batched decode, once through dsv4's torch attention and
    once through the kernel: the logits agree to fp32 rounding."""
    from dsv4.network.config import ModelConfig
    from dsv4.network.model import Transformer
    from dsv4.network.options import ForwardOptions

    torch.manual_seed(0)
    model = Transformer(ModelConfig.tiny()).eval().to(DEVICE)
    with torch.no_grad():
        for name, p in model.named_parameters():         # sinks and norms far from their inits
            if name.endswith(("attn_sink", "ape")):
                p.normal_()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 512, (2, 150), generator=g).to(DEVICE)
    chunks, decode = [(0, 70), (70, 140)], [140, 141, 142]

    calls = []

    def counted(*args, **kw):
        calls.append(kw.get("picks") is not None or kw.get("n_visible") is not None)
        return sparse_attention(*args, **kw)
    monkeypatch.setattr(dsv4_kernels, "sparse_attention", counted)

    def run(mode):
        options = ForwardOptions(sparse_kernel=mode)
        caches = [model.new_cache(), model.new_cache()]
        with torch.no_grad():
            outs = [model(ids[:, a:b], caches=caches, options=options) for a, b in chunks]
            outs += [model(ids[:, i:i + 1], caches=caches, options=options) for i in decode]
        return torch.cat(outs, 1)

    torch_path = run("off")
    assert not calls
    kernel_path = run("always")
    # 5 forwards x 2 rows x 4 layers (sliding, CSA, HCA, CSA; the MTP block does not run)
    assert len(calls) == 40 and sum(calls) == 30
    err = ((kernel_path - torch_path).norm() / torch_path.norm()).item()
    assert err < 1e-5, f"kernel path differs from the torch path by {err:.2e}"


def test_dispatch_flag_is_checked():
    from dsv4.network.options import ForwardOptions
    with pytest.raises(ValueError, match="sparse_kernel"):
        ForwardOptions(sparse_kernel="sometimes")
