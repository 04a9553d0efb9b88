"""The C++ CPU attention kernels (fastattn::attention_fwd / attention_bwd / attention_kvcache under
the CPU dispatch key), through fastattn.scaled_dot_product_attention(backend="cpu") and
fastattn.attention_with_kvcache(backend="cpu"), against fastattn.reference in float64.

The kernels pick an instruction set at run time (AMX tiles, vdpbf16ps, AVX-512 FMA, portable
loops); FASTATTN_CPU_ISA caps the choice, which is how the paths this machine would not pick by
itself are covered here.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastattn
from fastattn import reference
from tests.helpers import assert_close_rule, nan_padded, skip_unless_backend

pytestmark = pytest.mark.usefixtures("_needs_cpu_backend")

ISAS = ("amx", "avx512_bf16", "avx512", "avx2", "portable")


@pytest.fixture
def _needs_cpu_backend():
    skip_unless_backend("cpu")


@pytest.fixture
def isa(request, monkeypatch):
    """Caps the kernels' instruction set for one test (a lower cap runs a lower path)."""
    monkeypatch.setenv("FASTATTN_CPU_ISA", request.param)
    return request.param


def _rand(shape, dtype, layout="contiguous"):
    """A (B, H, N, D) tensor; 'blhd' views it out of (B, N, H, D) storage (the usual projection
    layout, non-contiguous), 'nan' carves it out of NaN-filled storage (reads past its extent
    would show)."""
    B, H, N, D = shape
    if layout == "blhd":
        return torch.randn(B, N, H, D).to(dtype).transpose(1, 2)
    t = torch.randn(shape).to(dtype)
    if layout == "nan":
        return nan_padded(t)
    return t


def _sdpa(q, k, v, mask, backend, **kw):
    if backend == "reference":
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        return reference.scaled_dot_product_attention(q, k, v, mask, return_lse=True, **kw)
    return fastattn.scaled_dot_product_attention(q, k, v, mask, return_lse=True, backend=backend, **kw)


def check_attention(q, k, v, mask=None, *, grad=True, mask_grad=False, **kw):
    """Forward (out, lse) and backward (dq, dk, dv[, dmask]) of the cpu backend held to the 2x / 3x
    rule against the float64 reference, with plain PyTorch in q's dtype as the baseline."""
    kw.setdefault("enable_gqa", q.shape[1] != k.shape[1])
    go = torch.randn(q.shape[:-1] + (v.shape[-1],)).to(q.dtype)
    results = {}
    for name, dtype, backend in (("cpu", q.dtype, "cpu"), ("hi", torch.float64, "reference"),
                                 ("lowp", q.dtype, "reference")):
        ins = [t.detach().to(dtype).requires_grad_(grad) for t in (q, k, v)]
        m = mask
        if mask is not None and mask.dtype != torch.bool:
            m = mask.detach().to(dtype if name == "hi" else q.dtype).requires_grad_(mask_grad)
        out, lse = _sdpa(*ins, m, backend, **kw)
        grads = []
        if grad:
            leaves = ins + ([m] if mask_grad else [])
            grads = torch.autograd.grad(out, leaves, go.to(dtype))
        results[name] = (out, lse, *grads)
    names = ["out", "lse", "dq", "dk", "dv", "dmask"]
    for i, (o, h, lo) in enumerate(zip(results["cpu"], results["hi"], results["lowp"], strict=True)):
        assert o.dtype == (torch.float32 if names[i] == "lse" else q.dtype), (names[i], o.dtype)
        assert torch.isfinite(o).all() or names[i] in ("lse",), f"{names[i]} has non-finite values"
        assert_close_rule(o, h, lo, factor=2.0 if i < 2 else 3.0, name=names[i])
    return results["cpu"]


# ---- a covering set of dtypes x head dims x lengths x masking modes ----------------------------
# every dtype, head dim, (L, S) pair and masking mode appears at least once; with B, H, Hkv, Ev
# varied along the way (the full cartesian product adds nothing but minutes).
CASES = [
    # dtype,        E,   Ev,  L,    S,   H, Hkv, mode
    (torch.float32, 40, 40, 17, 113, 2, 2, "causal_tl"),
    (torch.bfloat16, 64, 64, 113, 17, 4, 2, "causal_br"),
    (torch.float16, 80, 80, 128, 128, 2, 2, "none"),
    (torch.float32, 111, 111, 1, 1, 3, 1, "none"),
    (torch.bfloat16, 128, 128, 1023, 64, 2, 1, "causal_tl"),
    (torch.float16, 256, 256, 17, 113, 2, 2, "window"),
    (torch.float32, 256, 64, 113, 17, 2, 2, "bool_mask"),
    (torch.bfloat16, 40, 72, 128, 128, 4, 4, "float_mask_b1ls"),
    (torch.float16, 64, 64, 1023, 64, 4, 1, "causal_br"),
    (torch.float32, 80, 80, 128, 128, 6, 2, "window_causal_br"),
    (torch.bfloat16, 111, 111, 17, 113, 2, 1, "window"),
    (torch.float16, 128, 128, 1, 1, 2, 2, "causal_tl"),
    (torch.bfloat16, 256, 256, 113, 17, 2, 2, "float_mask_ls"),
    (torch.float32, 64, 128, 1023, 64, 2, 2, "float_mask_ls"),
    (torch.float16, 40, 40, 113, 17, 8, 2, "bool_mask"),
    (torch.bfloat16, 80, 80, 1, 1, 2, 1, "bool_mask"),
]


def _mode_kwargs(mode, B, H, L, S, dtype):
    """mask and keyword arguments for one masking mode"""
    if mode == "none":
        return None, {}
    if mode == "causal_tl":
        return None, {"is_causal": True}
    if mode == "causal_br":
        return None, {"is_causal": True, "causal_alignment": "bottom_right"}
    if mode == "window":
        return None, {"window": (5, 3)}
    if mode == "window_causal_br":
        return None, {"window": (9, -1), "is_causal": True, "causal_alignment": "bottom_right"}
    if mode == "bool_mask":
        return torch.rand(B, 1, L, S) > 0.3, {}
    if mode == "float_mask_ls":
        return torch.randn(L, S).to(dtype), {}
    if mode == "float_mask_b1ls":
        return torch.randn(B, 1, L, S).to(dtype), {}
    raise AssertionError(mode)


@pytest.mark.parametrize("dtype,E,Ev,L,S,H,Hkv,mode", CASES,
                         ids=[f"{str(c[0])[6:]}-E{c[1]}-Ev{c[2]}-L{c[3]}-S{c[4]}-H{c[5]}/{c[6]}-{c[7]}"
                              for c in CASES])
def test_attention_grid(dtype, E, Ev, L, S, H, Hkv, mode):
    B = 2
    q, k, v = _rand((B, H, L, E), dtype), _rand((B, Hkv, S, E), dtype), _rand((B, Hkv, S, Ev), dtype)
    mask, kw = _mode_kwargs(mode, B, H, L, S, dtype)
    check_attention(q, k, v, mask, mask_grad=mode.startswith("float_mask"), **kw)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_instruction_set(isa, dtype):
    # odd sizes that exercise every tail: keys past a block, head dims off the tile widths, GQA,
    # a window with rows that see nothing, an additive mask
    B, H, Hkv, L, S, E, Ev = 2, 4, 2, 37, 301, 72, 40
    q, k, v = _rand((B, H, L, E), dtype), _rand((B, Hkv, S, E), dtype), _rand((B, Hkv, S, Ev), dtype)
    check_attention(q, k, v, is_causal=True, causal_alignment="bottom_right")
    check_attention(q, k, v, window=(20, 4))
    mask = torch.randn(B, 1, L, S).to(dtype)
    check_attention(q, k, v, mask, mask_grad=True)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_lse_is_float32_accurate(isa, dtype):
    # lse is a float32 output for every dtype, and the backward recomputes P = exp(y - lse) from
    # it: it must be the logsumexp of the given (rounded) inputs to float32 precision, whatever the
    # rounding of P itself. A softmax sum of approximate exps shows as a constant offset, worst
    # where a row has one key (causal first rows, a single key): 7.2e-5 there from a degree-3 exp.
    B, H, L, E = 1, 2, 339, 80
    q, k, v = _rand((B, H, L, E), dtype), _rand((B, H, L, E), dtype), _rand((B, H, L, E), dtype)
    for n_keys, kw in ((L, {}), (L, {"is_causal": True}), (1, {})):
        kk, vv = k[:, :, :n_keys], v[:, :, :n_keys]
        _, lse = fastattn.scaled_dot_product_attention(q, kk, vv, return_lse=True, backend="cpu",
                                                       **kw)
        _, ref = reference.scaled_dot_product_attention(q.double(), kk.double(), vv.double(),
                                                        return_lse=True, **kw)
        err = (lse.double() - ref).abs() / ref.abs().clamp_min(1.0)
        assert err.max() <= 1e-5, (f"{n_keys} keys {kw}: lse off by up to {err.max():.2e} "
                                   f"(mean {(lse.double() - ref).mean():+.2e})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["blhd", "nan"])
def test_strided_inputs(dtype, layout):
    B, H, L, S, E = 2, 4, 70, 150, 64
    q, k, v = _rand((B, H, L, E), dtype, layout), _rand((B, H, S, E), dtype, layout), \
        _rand((B, H, S, E), dtype, layout)
    assert not q.is_contiguous()
    check_attention(q, k, v, is_causal=True)
    # an additive mask that is a transposed view, broadcast over batch and heads
    mask = torch.randn(S, L).to(dtype).t()
    check_attention(q, k, v, mask, mask_grad=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rows_without_visible_keys(dtype):
    B, H, L, S, E = 1, 2, 40, 24, 32
    q, k, v = _rand((B, H, L, E), dtype), _rand((B, H, S, E), dtype), _rand((B, H, S, E), dtype)
    mask = torch.rand(B, H, L, S) > 0.5
    mask[:, :, 3] = False  # rows that see nothing through the mask
    mask[0, 1, 30:] = False
    out, lse = check_attention(q, k, v, mask)[:2]
    assert torch.all(out[:, :, 3] == 0) and torch.all(lse[:, :, 3] == -math.inf)
    # bottom-right causal with L > S: the first L - S rows see nothing
    res = check_attention(q, k, v, is_causal=True, causal_alignment="bottom_right")
    out, lse, dq = res[0], res[1], res[2]
    assert torch.all(out[:, :, : L - S] == 0) and torch.all(lse[:, :, : L - S] == -math.inf)
    assert torch.all(dq[:, :, : L - S] == 0)
    # a fully masked additive mask row (-inf everywhere) and its gradient
    fmask = torch.zeros(L, S).to(dtype)
    fmask[5] = -math.inf
    res = check_attention(q, k, v, fmask, mask_grad=True)
    assert torch.all(res[0][:, :, 5] == 0) and torch.all(res[-1][5] == 0)


def test_scale_and_lse_gradient():
    # an explicit (negative) scale, and a loss that also flows through lse (grad_lse in delta)
    B, H, L, S, E = 2, 2, 33, 47, 48
    q, k, v = (torch.randn(B, H, n, E, dtype=torch.float64) for n in (L, S, S))
    outs = {}
    for name, dtype, backend in (("cpu", torch.float32, "cpu"), ("hi", torch.float64, "reference"),
                                 ("lowp", torch.float32, "reference")):
        ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = _sdpa(*ins, None, backend, scale=-0.3, is_causal=True)
        fin = torch.isfinite(lse)
        loss = (out * out).sum() + (lse[fin] * torch.linspace(-1, 1, int(fin.sum()), dtype=dtype)).sum()
        outs[name] = (out, lse, *torch.autograd.grad(loss, ins))
    for i, name in enumerate(["out", "lse", "dq", "dk", "dv"]):
        assert_close_rule(outs["cpu"][i], outs["hi"][i], outs["lowp"][i], factor=2.0 if i < 2 else 3.0,
                          name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_forward_backward_agree(dtype):
    # with V = identity (Ev = S) the output is the dropped, rescaled probability matrix itself,
    # so the keep mask the kernel drew can be read back and handed to the reference
    B, H, L, S, p = 2, 2, 40, 64, 0.3
    q, k = _rand((B, H, L, 32), dtype), _rand((B, H, S, 32), dtype)
    v = torch.eye(S).expand(B, H, S, S).to(dtype)
    torch.manual_seed(123)
    out = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=p, backend="cpu")
    keep = out != 0
    frac = keep.double().mean().item()
    assert abs(frac - (1 - p)) < 0.02, frac
    torch.manual_seed(123)
    again = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=p, backend="cpu")
    assert torch.equal(out, again), "same torch seed must draw the same dropout mask"
    other = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=p, backend="cpu")
    assert not torch.equal(other != 0, keep), "a fresh draw must give a different mask"

    go = torch.randn(B, H, L, S).to(dtype)
    results = {}
    for name, dt in (("cpu", dtype), ("hi", torch.float64), ("lowp", dtype)):
        ins = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        if name == "cpu":
            torch.manual_seed(123)
            o = fastattn.scaled_dot_product_attention(*ins, dropout_p=p, backend="cpu")
        else:
            o = reference.scaled_dot_product_attention(*ins, dropout_p=p, dropout_mask=keep)
        results[name] = (o, *torch.autograd.grad(o, ins, go.to(dt)))
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        assert_close_rule(results["cpu"][i], results["hi"][i], results["lowp"][i],
                          factor=2.0 if i == 0 else 3.0, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_is_bitwise_deterministic(dtype):
    B, H, Hkv, L, S, E = 2, 4, 2, 150, 170, 64
    q, k, v = _rand((B, H, L, E), dtype), _rand((B, Hkv, S, E), dtype), _rand((B, Hkv, S, E), dtype)
    mask = torch.randn(L, S).to(dtype)
    go = torch.randn(B, H, L, E).to(dtype)

    def grads():
        ins = [t.clone().requires_grad_() for t in (q, k, v, mask)]
        out = fastattn.scaled_dot_product_attention(*ins[:3], ins[3], is_causal=False, enable_gqa=True,
                                                    backend="cpu")
        return torch.autograd.grad(out, ins, go)

    first = grads()
    threads = torch.get_num_threads()
    try:
        for nt in (threads, 1, 3):
            torch.set_num_threads(nt)
            for _ in range(2):
                for a, b in zip(first, grads(), strict=True):
                    assert torch.equal(a, b), f"gradients differ between runs ({nt} threads)"
    finally:
        torch.set_num_threads(threads)


# ---- op-level checks --------------------------------------------------------------------------
def _fwd_args(dtype=torch.float32, mask=True):
    B, H, Hkv, L, S, E = 2, 4, 2, 19, 23, 16
    q = torch.randn(B, H, L, E, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, S, E, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, S, 24, dtype=dtype, requires_grad=True)
    m = torch.randn(B, 1, L, S, dtype=dtype).expand(B, H, L, S).requires_grad_(False) if mask else None
    return (q, k, v, m, 0.25, -1, 0, S - L, 0.0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_attention_fwd(dtype):
    torch.library.opcheck(torch.ops.fastattn.attention_fwd.default, _fwd_args(dtype))
    torch.library.opcheck(torch.ops.fastattn.attention_fwd.default, _fwd_args(dtype, mask=False))


def test_opcheck_attention_bwd():
    q, k, v, m, *rest = _fwd_args()
    out, lse = torch.ops.fastattn.attention_fwd(q, k, v, m, *rest)
    go, glse = torch.randn_like(out), torch.randn_like(lse)
    args = (go, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), glse, m, *rest, True, True)
    torch.library.opcheck(torch.ops.fastattn.attention_bwd.default, args)


def _kv_args(dtype=torch.float32, Lq=1, G=2, new=True):
    B, Hkv, cap, E = 3, 2, 40, 32
    q = torch.randn(B, Hkv * G, Lq, E, dtype=dtype)
    kc, vc = torch.randn(B, Hkv, cap, E, dtype=dtype), torch.randn(B, Hkv, cap, E, dtype=dtype)
    sl = torch.tensor([0, 17, cap - Lq], dtype=torch.int32)
    kn = torch.randn(B, Hkv, Lq, E, dtype=dtype) if new else None
    vn = torch.randn(B, Hkv, Lq, E, dtype=dtype) if new else None
    return q, kc, vc, sl, kn, vn


def test_opcheck_attention_kvcache():
    for Lq, G in ((1, 2), (9, 4)):  # the decode kernel and the blocked one
        q, kc, vc, sl, kn, vn = _kv_args(Lq=Lq, G=G)
        torch.library.opcheck(torch.ops.fastattn.attention_kvcache.default,
                              (q, kc, vc, sl, kn, vn, 0.2, True))
        leftpad = torch.minimum(sl, torch.full_like(sl, 3))
        torch.library.opcheck(torch.ops.fastattn.attention_kvcache.default,
                              (q, kc, vc, sl, kn, vn, 0.2, True, leftpad))


def test_torch_compile_fullgraph():
    def f(q, k, v, m):
        out = fastattn.scaled_dot_product_attention(q, k, v, m, is_causal=False, enable_gqa=True,
                                                    backend="cpu")
        return (out.float() ** 2).sum()

    q, k, v, m = _fwd_args()[:4]
    m = m[:, :1].detach().clone().requires_grad_()
    compiled = torch.compile(f, fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v, m), (q, k, v, m))
    exp = torch.autograd.grad(f(q, k, v, m), (q, k, v, m))
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a, b)


# ---- kv cache -----------------------------------------------------------------------------------
KV_CASES = [
    # dtype,        Lq, G, E,   new,   causal
    (torch.float32, 1, 1, 64, True, True),
    (torch.bfloat16, 1, 4, 128, True, True),
    (torch.float16, 3, 2, 111, True, True),
    (torch.bfloat16, 20, 2, 64, True, True),  # G * Lq > 16: the blocked forward per sequence
    (torch.float32, 2, 2, 40, False, False),
    (torch.bfloat16, 1, 1, 256, False, True),
]


@pytest.mark.parametrize("dtype,Lq,G,E,new,causal", KV_CASES,
                         ids=[f"{str(c[0])[6:]}-Lq{c[1]}-G{c[2]}-E{c[3]}-new{c[4]}-causal{c[5]}"
                              for c in KV_CASES])
def test_attention_with_kvcache(dtype, Lq, G, E, new, causal):
    B, Hkv, cap = 3, 2, 700
    q = torch.randn(B, Hkv * G, Lq, E).to(dtype)
    kc, vc = torch.randn(B, Hkv, cap, E).to(dtype), torch.randn(B, Hkv, cap, E).to(dtype)
    sl = torch.tensor([0, 333, cap - Lq], dtype=torch.int32)
    if not new:
        sl[0] = 5  # without new tokens an empty cache has no key at all
    kn = torch.randn(B, Hkv, Lq, E).to(dtype) if new else None
    vn = torch.randn(B, Hkv, Lq, E).to(dtype) if new else None

    kc_ref, vc_ref = kc.clone(), vc.clone()
    out = fastattn.attention_with_kvcache(q, kc, vc, sl, kn, vn, causal=causal, backend="cpu")
    lowp = reference.attention_with_kvcache(q, kc_ref, vc_ref, sl, kn, vn, causal=causal)
    hi = reference.attention_with_kvcache(q.double(), kc_ref.double().clone(), vc_ref.double().clone(), sl,
                                          None, None, causal=causal) if not new else None
    if new:
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref), "cache after append differs"
        hi = reference.attention_with_kvcache(q.double(), kc_ref.double(), vc_ref.double(),
                                              sl + Lq, None, None, causal=causal)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_rule(out, hi, lowp)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"], indirect=True)
def test_kvcache_instruction_sets(isa):
    B, Hkv, G, cap, E = 2, 2, 2, 300, 72
    for Lq in (1, 12):
        q = torch.randn(B, Hkv * G, Lq, E)
        kc, vc = torch.randn(B, Hkv, cap, E), torch.randn(B, Hkv, cap, E)
        sl = torch.tensor([100, 250], dtype=torch.int32)
        kn, vn = torch.randn(B, Hkv, Lq, E), torch.randn(B, Hkv, Lq, E)
        kc_ref, vc_ref = kc.clone(), vc.clone()
        out = fastattn.attention_with_kvcache(q, kc, vc, sl, kn, vn, backend="cpu")
        lowp = reference.attention_with_kvcache(q, kc_ref, vc_ref, sl, kn, vn)
        hi = reference.attention_with_kvcache(q.double(), kc_ref.double(), vc_ref.double(), sl + Lq)
        assert torch.equal(kc, kc_ref)
        assert_close_rule(out, hi, lowp)


def test_kvcache_strided_cache():
    # caches stored (B, capacity, Hkv, E) and viewed as (B, Hkv, capacity, E)
    B, Hkv, cap, E = 2, 4, 90, 48
    q = torch.randn(B, Hkv, 1, E)
    kc = torch.randn(B, cap, Hkv, E).transpose(1, 2)
    vc = torch.randn(B, cap, Hkv, E).transpose(1, 2)
    sl = torch.tensor([10, 60], dtype=torch.int32)
    kn, vn = torch.randn(B, Hkv, 1, E), torch.randn(B, Hkv, 1, E)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    out = fastattn.attention_with_kvcache(q, kc, vc, sl, kn, vn, backend="cpu")
    lowp = reference.attention_with_kvcache(q, kc_ref, vc_ref, sl, kn, vn)
    hi = reference.attention_with_kvcache(q.double(), kc_ref.double(), vc_ref.double(), sl + 1)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert_close_rule(out, hi, lowp)


# ---- bad input ------------------------------------------------------------------------------------
def test_bad_input_raises_naming_the_argument():
    q, k, v, m, *rest = _fwd_args()
    q, k, v = q.detach(), k.detach(), v.detach()
    fwd = torch.ops.fastattn.attention_fwd
    with pytest.raises(RuntimeError, match="q must be 4-D"):
        fwd(q[0], k, v, m, *rest)
    with pytest.raises(RuntimeError, match="k must have q's dtype"):
        fwd(q, k.half(), v, m, *rest)
    with pytest.raises(RuntimeError, match="attn_mask must be expanded"):
        fwd(q, k, v, m[:, :, :3], *rest)
    with pytest.raises(RuntimeError, match="attn_mask must be an additive mask"):
        fwd(q, k, v, m > 0, *rest)
    with pytest.raises(RuntimeError, match="multiple of k/v heads"):
        fwd(q[:, :3], k, v, None, *rest)
    with pytest.raises(RuntimeError, match="dropout_p"):
        fwd(q, k, v, m, *rest[:4], 1.5, 0)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        fwd(q.double(), k.double(), v.double(), None, *rest)
    qc, kc, vc, sl, kn, vn = _kv_args()
    kvc = torch.ops.fastattn.attention_kvcache
    # the op takes the public function's rules (csrc/checks.cpp)
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, capacity - new tokens\]"):
        kvc(qc, kc, vc, sl + 5, kn, vn, 0.2, True)
    with pytest.raises(TypeError, match="cache_seqlens must be an int32"):
        kvc(qc, kc, vc, sl.long(), kn, vn, 0.2, True)
    with pytest.raises(ValueError, match="k_new and v_new must be given together"):
        kvc(qc, kc, vc, sl, kn, None, 0.2, True)


def test_bad_instruction_set_cap_raises(monkeypatch):
    # one variable caps every CPU family (attention, int8, LayerNorm); a bad value lists the good ones
    monkeypatch.setenv("FASTATTN_CPU_ISA", "sse9")
    q = torch.randn(1, 1, 4, 8)
    msg = "FASTATTN_CPU_ISA must be one of portable, avx2, avx512, avx512_vnni, avx512_bf16, amx"
    with pytest.raises(RuntimeError, match=msg):
        fastattn.scaled_dot_product_attention(q, q, q, backend="cpu")
    with pytest.raises(RuntimeError, match=msg):
        fastattn.layer_norm(torch.randn(2, 8), 8, backend="cpu")
    a = torch.randint(-128, 128, (2, 4), dtype=torch.int8)
    with pytest.raises(RuntimeError, match=msg):
        fastattn.int8_gemm(a, a, backend="cpu")


# ---- long sequences in little memory ---------------------------------------------------------------
def test_32k_sequence_runs_in_megabytes():
    # L = S = 32768, one head, E = 64, fp32: an L x S float32 score matrix would be 4 GiB. The child
    # caps its address space at what it already maps plus 1 GiB, so any such buffer fails to
    # allocate, and reports its peak RSS growth; a few rows are checked against float64.
    code = textwrap.dedent("""
        import resource, torch, fastattn
        from fastattn import reference
        torch.manual_seed(0)
        N, E = 32768, 64
        q, k, v = (torch.randn(1, 1, N, E) for _ in range(3))
        fastattn.scaled_dot_product_attention(q[:, :, :256], k[:, :, :256], v[:, :, :256], backend="cpu")
        vm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")][0] * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu")
        grow = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        rows = torch.tensor([0, 4097, 32767])
        ref = reference.scaled_dot_product_attention(q[:, :, rows].double(), k.double(), v.double(),
            attn_mask=torch.arange(N)[None, :] <= rows[:, None])
        err = (out[:, :, rows].double() - ref).abs().max().item()
        print(f"growth_mib={grow:.1f} err={err:.2e}")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-3000:]
    fields = dict(x.split("=") for x in r.stdout.split())
    assert float(fields["growth_mib"]) < 64, r.stdout  # inputs are 8 MiB each; out 8 MiB
    assert float(fields["err"]) < 1e-5, r.stdout
