"""Property-based tests (hypothesis): random shapes, strides, dtypes, masks and options for every
op family on every backend that runs here, held to the correctness rule (docs/design.md) against the float64 reference
(int8: bit-exact, or the float reference of the same quantized operands).

Examples are derandomized (the same ones on every run, so CI is reproducible) and few per op and
backend; Triton shapes are tiny because the interpreter runs every program instance in numpy.
Layouts drawn per tensor: contiguous, a transposed view (the memory order of a (B, L, H, E)
projection), a slice of a wider last dim (row stride > width), and a feature-major view (last dim
not unit-stride) where the op takes any strides.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rule
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reliability import BACKENDS, need_op

import fastattn
from fastattn import reference

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def examples(backend: str, cpu_n: int = 25, triton_n: int = 8) -> settings:
    return settings(max_examples=triton_n if backend == "triton" else cpu_n, deadline=None,
                    derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def relayout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout (a view; the storage may be larger)."""
    if kind == "contiguous" or t.dim() < 2:
        return t
    if kind == "transposed":  # dims 1 and 2 swapped in memory (B, L, H, E) for a 4-D tensor
        d0, d1 = (1, 2) if t.dim() == 4 else (0, 1)
        return t.transpose(d0, d1).contiguous().transpose(d0, d1)
    if kind == "sliced":  # the last dim carved out of a wider one
        pad = 3
        big = torch.zeros(*t.shape[:-1], t.shape[-1] + 2 * pad, dtype=t.dtype)
        view = big[..., pad:pad + t.shape[-1]]
        view.copy_(t)
        return view
    if kind == "feature_major":  # the last dim is the outermost in memory
        return t.movedim(-1, 0).contiguous().movedim(0, -1)
    raise KeyError(kind)


def _absmax(t: torch.Tensor) -> float:
    f = t[torch.isfinite(t)]
    return float(f.abs().max()) if f.numel() else 0.0


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
@st.composite
def attention_calls(draw, backend: str):
    tiny = backend == "triton"
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    H = Hkv * draw(st.sampled_from([1, 2]))
    L = draw(st.integers(1, 9 if tiny else 40))
    S = draw(st.integers(1, 9 if tiny else 40))
    E = draw(st.sampled_from([16, 40] if tiny else [8, 40, 64, 80, 111, 128]))
    Ev = draw(st.sampled_from([E, 24]))
    dtype = draw(st.sampled_from(FLOATS))
    layouts = [draw(st.sampled_from(["contiguous", "transposed", "sliced", "feature_major"]))
               for _ in range(3)]
    mask_kind = draw(st.sampled_from(["none", "bool", "float", "float_neg_inf"]))
    mask_shape = draw(st.sampled_from([(L, S), (1, 1, L, S), (B, 1, L, S), (B, H, L, S),
                                       (1, H, 1, S), (S,)]))
    causal = draw(st.booleans())
    align = draw(st.sampled_from(["top_left", "bottom_right"]))
    window = draw(st.one_of(st.none(), st.tuples(st.integers(-1, 6), st.integers(-1, 6))))
    scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
    mask_grad = mask_kind.startswith("float") and draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(B=B, H=H, Hkv=Hkv, L=L, S=S, E=E, Ev=Ev, dtype=dtype, layouts=layouts,
                mask_kind=mask_kind, mask_shape=mask_shape, causal=causal, align=align,
                window=window, scale=scale, mask_grad=mask_grad, seed=seed)


def check_attention_call(backend: str, c: dict) -> None:
    g = torch.Generator().manual_seed(c["seed"])
    B, H, Hkv, L, S, E, Ev, dtype = (c[k] for k in ("B", "H", "Hkv", "L", "S", "E", "Ev", "dtype"))
    base = [torch.randn(B, H, L, E, generator=g), torch.randn(B, Hkv, S, E, generator=g),
            torch.randn(B, Hkv, S, Ev, generator=g)]
    mask = None
    if c["mask_kind"] == "bool":
        mask = torch.rand(c["mask_shape"], generator=g) > 0.3
    elif c["mask_kind"].startswith("float"):
        mask = torch.randn(c["mask_shape"], generator=g)
        if c["mask_kind"] == "float_neg_inf":
            mask.masked_fill_(torch.rand(c["mask_shape"], generator=g) < 0.3, float("-inf"))
    kw = dict(is_causal=c["causal"], causal_alignment=c["align"], window=c["window"],
              scale=c["scale"], enable_gqa=H != Hkv)

    def leaves(dtype, layouts=("contiguous",) * 3):
        # the same values as the kernel's inputs (rounded to the kernel's dtype), in ``dtype``
        ts = [relayout(t.to(c["dtype"]).to(dtype, copy=True), lay).requires_grad_(True)
              for t, lay in zip(base, layouts, strict=True)]
        m = mask
        if m is not None and m.dtype != torch.bool:
            m = m.to(c["dtype"]).to(dtype, copy=True)
            if c["mask_grad"]:
                # the leaf is the broadcast view itself (stride 0 where broadcast): its gradient
                # is the kernel's per-element dmask, which the rule judges; summing it over the
                # broadcast dims is torch's job (in tiny bf16 cases with 1-2 visible keys per row,
                # the sum of the FlashAttention-style dS = P (dP - rowsum(dO O)) over many rows
                # drifts past 3x torch's own error while every element is within it)
                m = m.expand(B, H, L, S).detach().requires_grad_(True)
        return ts, m

    (q, k, v), m = leaves(dtype, c["layouts"])
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, m, return_lse=True,
                                                     backend=backend, **kw)
    assert out.shape == (B, H, L, Ev) and out.dtype == dtype and lse.shape == (B, H, L)
    (qh, kh, vh), mh = leaves(torch.float64)
    (ql, kl, vl), ml = leaves(dtype)
    o_hi, l_hi = reference.scaled_dot_product_attention(qh, kh, vh, mh, return_lse=True, **kw)
    o_lo, l_lo = reference.scaled_dot_product_attention(ql, kl, vl, ml, return_lse=True, **kw)
    assert_close_rule(out, o_hi, o_lo, name="out")
    assert_close_rule(lse, l_hi.float(), l_lo.float(), name="lse")

    g_out = torch.randn(o_hi.shape, generator=g, dtype=torch.float64)
    g_lse = torch.randn(l_hi.shape, generator=g, dtype=torch.float64)
    # lse is -inf on rows with no visible key: those rows take no lse gradient (torch.where)
    for o, lse_ in ((out, lse), (o_hi, l_hi), (o_lo, l_lo)):
        lse_ = lse_.double()
        finite_lse = torch.where(torch.isfinite(lse_), lse_, torch.zeros_like(lse_))
        ((o.double() * g_out).sum() + (finite_lse * g_lse).sum()).backward()
    names = ["dq", "dk", "dv"] + (["dmask"] if c["mask_grad"] else [])
    # one eps for all gradients, from their common scale: a gradient that is exactly 0 (dk with
    # a single visible key per row: dS = P (dP - rowsum(dO O)) = 0) is ~1e-5 of float32 noise
    # in any kernel that forms dS that way, and the rule's default eps would be absolute there
    scale = max(1.0, *(_absmax(t.grad) for t in (qh, kh, vh)))
    for name, t, hi, lo in zip(names, [q, k, v, m], [qh, kh, vh, mh], [ql, kl, vl, ml],
                               strict=False):
        assert t.grad is not None and t.grad.shape == t.shape, name
        assert_close_rule(t.grad, hi.grad, lo.grad, factor=3.0, name=name,
                          eps=1e-5 * max(scale, _absmax(hi.grad)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_properties(backend):
    need_op("scaled_dot_product_attention", backend)

    @examples(backend)
    @given(c=attention_calls(backend))
    def run(c):
        check_attention_call(backend, c)

    run()


@st.composite
def kvcache_calls(draw, backend: str):
    tiny = backend == "triton"
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 2))
    H = Hkv * draw(st.sampled_from([1, 2, 4]))
    cap = draw(st.integers(1, 24 if tiny else 64))
    Lq = draw(st.integers(1, min(4, cap)))
    new = draw(st.booleans())
    hi = cap - (Lq if new else 0)
    # at least one visible key: an empty cache without new tokens is a catalogue entry
    # (kv_empty_cache_no_new_tokens, a known reference bug)
    seqlens = [draw(st.integers(0 if new else 1, hi)) for _ in range(B)]
    return dict(B=B, H=H, Hkv=Hkv, cap=cap, Lq=Lq, new=new, seqlens=seqlens,
                E=draw(st.sampled_from([16, 40] if tiny else [16, 40, 64, 128])),
                dtype=draw(st.sampled_from(FLOATS)), causal=draw(st.booleans()),
                layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
                seed=draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_properties(backend):
    need_op("attention_with_kvcache", backend)

    @examples(backend)
    @given(c=kvcache_calls(backend))
    def run(c):
        g = torch.Generator().manual_seed(c["seed"])
        B, H, Hkv, cap, Lq, E, dtype = (c[k] for k in ("B", "H", "Hkv", "cap", "Lq", "E", "dtype"))
        q = torch.randn(B, H, Lq, E, generator=g)
        kc, vc = torch.randn(B, Hkv, cap, E, generator=g), torch.randn(B, Hkv, cap, E, generator=g)
        kn, vn = torch.randn(B, Hkv, Lq, E, generator=g), torch.randn(B, Hkv, Lq, E, generator=g)
        if not c["new"]:
            kn = vn = None
        seqlens = torch.tensor(c["seqlens"], dtype=torch.int32)

        def call(fn, dtype, layout, **kw):
            cast = lambda t: None if t is None else relayout(t.to(dtype), layout)
            caches = (cast(kc), cast(vc))
            out = fn(cast(q), *caches, seqlens, cast(kn), cast(vn), causal=c["causal"], **kw)
            return out, caches

        out, (k1, v1) = call(fastattn.attention_with_kvcache, dtype, c["layout"], backend=backend)
        hi, _ = call(reference.attention_with_kvcache, torch.float64, "contiguous")
        lo, (k2, v2) = call(reference.attention_with_kvcache, dtype, "contiguous")
        assert_close_rule(out, hi, lo)
        # the appended tokens are written in place, exactly; nothing else in the caches moves
        assert torch.equal(k1, k2) and torch.equal(v1, v2), "cache contents differ"

    run()


# ---------------------------------------------------------------------------------------------
# layer_norm / rms_norm
# ---------------------------------------------------------------------------------------------
@st.composite
def norm_calls(draw, backend: str):
    tiny = backend == "triton"
    lead = draw(st.lists(st.integers(1, 5), min_size=0, max_size=2))
    N = draw(st.integers(1, 300 if tiny else 2100))
    dtype = draw(st.sampled_from(FLOATS))
    return dict(lead=lead, N=N, dtype=dtype,
                layout=draw(st.sampled_from(["contiguous", "transposed", "sliced", "feature_major"])),
                weight=draw(st.sampled_from(["none", "same", "float32"])),
                bias=draw(st.sampled_from(["none", "same", "float32"])),
                residual=draw(st.booleans()), eps=draw(st.sampled_from([1e-5, 1e-6, 0.1, None])),
                scale=draw(st.sampled_from([1.0, 1e-3, 1e3])), seed=draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("fn", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_properties(backend, fn):
    need_op(fn, backend)

    @examples(backend, triton_n=12)
    @given(c=norm_calls(backend))
    def run(c):
        g = torch.Generator().manual_seed(c["seed"])
        shape = (*c["lead"], c["N"])
        x = torch.randn(shape, generator=g) * c["scale"] + 0.5
        r = torch.randn(shape, generator=g) if c["residual"] else None
        w = torch.randn(c["N"], generator=g) if c["weight"] != "none" else None
        b = torch.randn(c["N"], generator=g) if c["bias"] != "none" and fn == "layer_norm" else None
        eps = c["eps"] if c["eps"] is not None or fn == "rms_norm" else 1e-5

        def call(f, dtype, layout="contiguous", **kw):
            # every backend and reference sees the kernel's input values (rounded to its dtypes)
            kdt = lambda which: c["dtype"] if c[which] == "same" else torch.float32
            ins = [relayout(x.to(c["dtype"]).to(dtype, copy=True), layout).requires_grad_(True)]
            if r is not None:
                ins.append(relayout(r.to(c["dtype"]).to(dtype, copy=True), layout)
                           .requires_grad_(True))
            params = [None if t is None else
                      t.to(kdt(n)).to(dtype if dtype == torch.float64 else kdt(n), copy=True)
                      .requires_grad_(True) for t, n in ((w, "weight"), (b, "bias"))]
            res = ins[1] if r is not None else None
            if fn == "layer_norm":
                y = f(ins[0], c["N"], params[0], params[1], eps, residual=res, **kw)
            else:
                # eps=None means finfo(input dtype).eps: the references get the kernel's value
                e = eps if eps is not None or kw else torch.finfo(c["dtype"]).eps
                y = f(ins[0], c["N"], params[0], e, residual=res, **kw)
            # outputs in the input's dtype, as F.layer_norm with a float32 weight on bf16 input
            outs = [o.to(dtype) for o in (y if isinstance(y, tuple) else (y,))]
            return outs, ins + [p for p in params if p is not None]

        outs, leaves = call(getattr(fastattn, fn), c["dtype"], c["layout"], backend=backend)
        his, hi_leaves = call(getattr(reference, fn), torch.float64)
        los, lo_leaves = call(getattr(reference, fn), c["dtype"])
        for i, (o, h, lo) in enumerate(zip(outs, his, los, strict=True)):
            assert o.dtype == c["dtype"] and o.shape == x.shape
            assert_close_rule(o, h, lo, name=f"out[{i}]")
        gs = [torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in outs]
        for os_ in (outs, his, los):
            sum((o.double() * gg).sum() for o, gg in zip(os_, gs, strict=True)).backward()
        for i, (t, h, lo) in enumerate(zip(leaves, hi_leaves, lo_leaves, strict=True)):
            assert t.grad is not None and t.grad.dtype == t.dtype, f"grad[{i}]"
            assert_close_rule(t.grad, h.grad, lo.grad, factor=3.0, name=f"grad[{i}]")

    run()


# ---------------------------------------------------------------------------------------------
# silu_mul
# ---------------------------------------------------------------------------------------------
@st.composite
def silu_mul_calls(draw, backend: str):
    tiny = backend == "triton"
    return dict(lead=draw(st.lists(st.integers(0 if not tiny else 1, 5), min_size=0, max_size=3)),
                I=draw(st.integers(1, 300 if tiny else 5000)), dtype=draw(st.sampled_from(FLOATS)),
                layout=draw(st.sampled_from(["contiguous", "transposed", "sliced",
                                             "feature_major"])),
                scale=draw(st.sampled_from([1.0, 4.0, 30.0, 1e-3])),
                seed=draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_silu_mul_properties(backend):
    need_op("silu_mul", backend)

    @examples(backend, triton_n=12)
    @given(c=silu_mul_calls(backend))
    def run(c):
        g = torch.Generator().manual_seed(c["seed"])
        shape = (*c["lead"], 2 * c["I"])
        x = torch.randn(shape, generator=g) * c["scale"]
        dy = torch.randn((*c["lead"], c["I"]), generator=g, dtype=torch.float64)

        def call(f, dtype, layout="contiguous", **kw):
            t = relayout(x.to(c["dtype"]).to(dtype, copy=True), layout).requires_grad_(True)
            return f(t, **kw), t

        out, xt = call(fastattn.silu_mul, c["dtype"], c["layout"], backend=backend)
        hi, xh = call(reference.silu_mul, torch.float64)
        lo, xl = call(reference.silu_mul, c["dtype"])
        assert out.dtype == c["dtype"] and out.shape == dy.shape
        assert_close_rule(out, hi, lo)
        for o in (out, hi, lo):
            (o.double() * dy).sum().backward()
        assert xt.grad.dtype == c["dtype"] and xt.grad.shape == x.shape
        assert_close_rule(xt.grad, xh.grad, xl.grad, factor=3.0, name="dx")

    run()


# ---------------------------------------------------------------------------------------------
# int8
# ---------------------------------------------------------------------------------------------
@st.composite
def int8_calls(draw, backend: str):
    tiny = backend == "triton"
    return dict(lead=draw(st.lists(st.integers(1, 6), min_size=1, max_size=2)),
                K=draw(st.integers(1, 80 if tiny else 600)), N=draw(st.integers(1, 40 if tiny else 200)),
                dtype=draw(st.sampled_from(FLOATS)),
                layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
                scale=draw(st.sampled_from([1.0, 1e-3, 1e3])), zero_row=draw(st.booleans()),
                with_scales=draw(st.booleans()), bias=draw(st.booleans()),
                out_dtype=draw(st.sampled_from(FLOATS)), seed=draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_properties(backend):
    need_op("quantize_per_token", backend)

    @examples(backend)
    @given(c=int8_calls(backend))
    def run(c):
        g = torch.Generator().manual_seed(c["seed"])
        x = (torch.randn(*c["lead"], c["K"], generator=g) * c["scale"]).to(c["dtype"])
        if c["zero_row"]:
            x.view(-1, c["K"])[0] = 0
        q, s = fastattn.quantize_per_token(relayout(x, c["layout"]), backend=backend)
        q_ref, s_ref = reference.quantize_per_token(x.reshape(-1, c["K"]))
        assert q.shape == x.shape and s.shape == x.shape[:-1]
        assert torch.equal(q.reshape(-1, c["K"]), q_ref), "quantized values differ"
        assert torch.equal(s.reshape(-1), s_ref), "scales differ"
        if len(c["lead"]) == 1:
            qc, sc = fastattn.quantize_per_channel(relayout(x, c["layout"]), backend=backend)
            assert torch.equal(qc, q_ref) and torch.equal(sc, s_ref)

    run()


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_gemm_properties(backend):
    need_op("int8_gemm", backend)

    @examples(backend)
    @given(c=int8_calls(backend))
    def run(c):
        g = torch.Generator().manual_seed(c["seed"])
        M = c["lead"][0]
        a = torch.randint(-128, 128, (M, c["K"]), generator=g, dtype=torch.int8)
        b = torch.randint(-128, 128, (c["N"], c["K"]), generator=g, dtype=torch.int8)
        la, lb = relayout(a, c["layout"]), relayout(b, c["layout"])
        acc = fastattn.int8_gemm(la, lb, backend=backend)
        want = torch.matmul(a.long(), b.long().t()).to(torch.int32)
        assert acc.dtype == torch.int32 and torch.equal(acc, want), "int32 product differs"
        if not c["with_scales"]:
            return
        sa = torch.rand(M, generator=g) * c["scale"]
        sb = torch.rand(c["N"], generator=g) / 100
        bias = torch.randn(c["N"], generator=g) if c["bias"] else None
        od = c["out_dtype"]
        out = fastattn.int8_gemm(la, lb, sa, sb, bias, out_dtype=od, backend=backend)
        hi = reference.int8_gemm(a, b, sa.double(), sb.double(),
                                 None if bias is None else bias.double(), torch.float64)
        lo = reference.int8_gemm(a, b, sa, sb, bias, od)
        assert out.dtype == od
        assert_close_rule(out, hi, lo)

    run()


@pytest.mark.parametrize("fn", ["int8_linear", "int8_weight_only_linear"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_linear_properties(backend, fn):
    need_op(fn, backend)

    @examples(backend)
    @given(c=int8_calls(backend))
    def run(c):
        g = torch.Generator().manual_seed(c["seed"])
        # |x| ~ 1e3 makes float16 outputs overflow (~1e5): not a property of the kernel
        scale = min(c["scale"], 1.0) if c["dtype"] == torch.float16 else c["scale"]
        x = (torch.randn(*c["lead"], c["K"], generator=g) * scale).to(c["dtype"])
        if c["zero_row"]:
            x.view(-1, c["K"])[0] = 0
        w = torch.randn(c["N"], c["K"], generator=g)
        w_int8, w_scale = reference.quantize_per_token(w)
        bias = torch.randn(c["N"], generator=g) if c["bias"] else None
        out = getattr(fastattn, fn)(relayout(x, c["layout"]), w_int8, w_scale, bias,
                                    backend=backend)
        assert out.shape == (*x.shape[:-1], c["N"]) and out.dtype == x.dtype
        # held to the float reference of the same quantized operands: int8_linear quantizes x
        # itself on its W8A8 path and keeps x in float on its weight-only path (small M)
        x2 = x.reshape(-1, c["K"])
        ref_fn = getattr(reference, fn)
        if fn == "int8_linear":
            from fastattn.ops.int8 import WEIGHT_ONLY_MAX_M
            if x2.shape[0] <= WEIGHT_ONLY_MAX_M.get("cpu", 0):
                ref_fn = reference.int8_weight_only_linear
        d = lambda t: None if t is None else t.double()
        hi = ref_fn(x2.double(), w_int8, w_scale.double(), d(bias))
        lo = ref_fn(x2, w_int8, w_scale, bias)
        assert_close_rule(out.reshape(x2.shape[0], -1), hi, lo)

    run()


def test_reference_lse_gradient_on_empty_rows():
    """A gradient into lse (here 0, through torch.where) on a row with no visible key leaves the
    reference's gradients finite: the backward of log(denom) at denom = 0 must not be 0 / 0."""
    q, k, v = (torch.randn(1, 1, 2, 8, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[0.0, 0.0], [float("-inf"), float("-inf")]])  # row 1 sees no key
    out, lse = reference.scaled_dot_product_attention(q, k, v, mask, return_lse=True)
    assert torch.isneginf(lse[0, 0, 1]) and (out[0, 0, 1] == 0).all()
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    (out.sum() + finite_lse.sum()).backward()
    for name, t in (("dq", q), ("dk", k), ("dv", v)):
        assert not torch.isnan(t.grad).any(), f"{name} has NaN"
