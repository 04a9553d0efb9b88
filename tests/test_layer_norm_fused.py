"""fastattn.layer_norm / rms_norm with FlashAttention's layer_norm_fn keywords (x1, weight1,
bias1, rowscale, dropout_p, residual_in_fp32, prenorm, return_dropout_mask), Gemma's offset and
the fused int8 output, on every backend, forward and backward, against the float64 reference by
the correctness rule (outputs 2x, gradients 3x PyTorch's own error in the input dtype).

Dropout is checked exactly: the kernels return their masks and the reference replays them. The
grid is representative rather than a full product (each row mixes several keywords); rows are
few and short for the Triton interpreter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference
from tests.helpers import BACKENDS_UNDER_TEST, assert_close_rule, skip_unless_backend

# (id, rms, dtype, input shape, normalized_shape, keywords). Keywords name tensors to make:
# "residual": dtype or True (input's), "x1", "weight1", "bias1", "rowscale", "bias" as bools;
# the rest are passed as they are.
CASES = [
    ("gemma-offset", True, torch.bfloat16, (3, 96), 96, dict(offset=1.0)),
    ("gemma-offset-residual", True, torch.float16, (2, 3, 77), 77,
     dict(offset=1.0, residual=True, prenorm=True)),
    ("rowscale-dropout-residual", False, torch.float16, (5, 64), 64,
     dict(rowscale=True, dropout_p=0.25, residual=True, bias=True)),
    ("x1-weight1-dropout", False, torch.float32, (4, 111), 111,
     dict(x1=True, weight1=True, bias1=True, dropout_p=0.1, residual=True, bias=True)),
    ("fp32-residual-first-block", True, torch.bfloat16, (3, 130), 130,
     dict(residual_in_fp32=True, prenorm=True)),
    ("fp32-residual", False, torch.bfloat16, (3, 200), 200,
     dict(residual=torch.float32, bias=True)),
    ("bf16-residual-in-fp32", True, torch.bfloat16, (4, 33), 33,
     dict(residual=True, residual_in_fp32=True, dropout_p=0.5, x1=True)),
    ("x1-weight1-rowscale-offset", True, torch.float16, (3, 1000), 1000,
     dict(x1=True, weight1=True, rowscale=True, residual=True, offset=1.0)),
    ("multi-dim-shape", False, torch.float32, (2, 4, 25), (4, 25),
     dict(x1=True, dropout_p=0.3, weight1=True, rowscale=True)),
    ("prenorm-false", False, torch.bfloat16, (3, 17), 17,
     dict(residual=True, prenorm=False, bias=True)),
]


def _make(rms, dtype, shape, ns, kw, seed=0):
    g = torch.Generator().manual_seed(seed)
    ns = (ns,) if isinstance(ns, int) else tuple(ns)
    lead = shape[:len(shape) - len(ns)]

    def rn(s, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(s, generator=g) * scale + shift).to(dt)

    t = {"input": rn(shape, 2.0, 1.0), "weight": rn(ns, 0.5, 0.0 if kw.get("offset") else 1.0)}
    t["bias"] = rn(ns) if kw.get("bias") and not rms else None
    res = kw.get("residual")
    t["residual"] = rn(shape, dt=dtype if res is True else res) if res else None
    t["x1"] = rn(shape) if kw.get("x1") else None
    t["weight1"] = rn(ns, 0.5, 1.0) if kw.get("weight1") else None
    t["bias1"] = rn(ns) if kw.get("bias1") else None
    t["rowscale"] = (torch.rand(lead, generator=g) + 0.5) if kw.get("rowscale") else None
    opts = {k: v for k, v in kw.items()
            if k in ("dropout_p", "residual_in_fp32", "prenorm", "offset")}
    return t, opts


def _call(fn, rms, t, ns, opts, **extra):
    kw = dict(residual=t["residual"], x1=t["x1"], weight1=t["weight1"], rowscale=t["rowscale"],
              return_dropout_mask=True, **opts, **extra)
    if rms:
        return fn(t["input"], ns, t["weight"], 1e-5, **kw)
    return fn(t["input"], ns, t["weight"], t["bias"], 1e-5, bias1=t["bias1"], **kw)


def _split(res, t, opts):
    """FlashAttention's return order -> dict."""
    res = list(res)
    d = {"out": res.pop(0)}
    if t["weight1"] is not None:
        d["out1"] = res.pop(0)
    prenorm = opts.get("prenorm")
    if prenorm if prenorm is not None else t["residual"] is not None:
        d["residual_out"] = res.pop(0)
    d["mask"], d["mask1"] = res
    assert not res[2:]
    return d


def _torch_lowp(rms, t, ns, opts, mask, mask1):
    """The same computation as unfused eager PyTorch in the inputs' dtypes: the baseline."""
    x = t["input"]
    p = opts.get("dropout_p", 0.0)
    if t["rowscale"] is not None:
        rs = t["rowscale"]
        x = x * rs.to(x.dtype).reshape(rs.shape + (1,) * (x.dim() - rs.dim()))
    if mask is not None:
        x = x * mask / (1 - p)
    if t["x1"] is not None:
        x = x + (t["x1"] * mask1 / (1 - p) if mask1 is not None else t["x1"])
    if opts.get("residual_in_fp32"):
        x = x.float()
    if t["residual"] is not None:
        x = x + t["residual"]
    off = opts.get("offset", 0.0)
    w = t["weight"] + off if off else t["weight"]
    nsl = (ns,) if isinstance(ns, int) else list(ns)
    if rms:
        out = F.rms_norm(x, nsl, w.to(x.dtype), 1e-5)
    else:
        b = t["bias"].to(x.dtype) if t["bias"] is not None else None
        out = F.layer_norm(x, nsl, w.to(x.dtype), b, 1e-5)
    d = {"out": out.to(t["input"].dtype), "residual_out": x}
    if t["weight1"] is not None:
        w1 = t["weight1"] + off if off else t["weight1"]
        y1 = F.rms_norm(x, nsl, w1.to(x.dtype), 1e-5) if rms else F.layer_norm(
            x, nsl, w1.to(x.dtype), t["bias1"].to(x.dtype) if t["bias1"] is not None else None,
            1e-5)
        d["out1"] = y1.to(t["input"].dtype)
    return d


def _leaves(t, dtype=None):
    out = {}
    for k, v in t.items():
        if v is None:
            out[k] = None
        elif k == "rowscale":
            out[k] = v.to(dtype) if dtype is not None else v
        else:
            out[k] = v.detach().to(dtype or v.dtype).clone().requires_grad_()
    return out


def _grads(d, leaves, cot):
    loss = sum((d[k].double() * cot[k]).sum() for k in cot if k in d)
    names = [k for k, v in leaves.items() if v is not None and v.requires_grad]
    gs = torch.autograd.grad(loss, [leaves[k] for k in names])
    return dict(zip(names, gs, strict=True))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_fused_forward_backward(backend, case):
    skip_unless_backend(backend)
    _, rms, dtype, shape, ns, kw = case
    t, opts = _make(rms, dtype, shape, ns, kw)
    fn = fastattn.rms_norm if rms else fastattn.layer_norm
    ours_t = _leaves(t)
    ours = _split(_call(lambda *a, **k: fn(*a, **k, backend=backend), rms, ours_t, ns, opts),
                  t, opts)
    mask, mask1 = ours["mask"], ours["mask1"]
    p = opts.get("dropout_p", 0.0)
    assert (mask is not None) == (p > 0) and (mask1 is not None) == (p > 0 and t["x1"] is not None)
    ref_fn = reference.rms_norm if rms else reference.layer_norm
    ref_t = _leaves(t, torch.float64)
    ref = _split(_call(ref_fn, rms, ref_t, ns, opts, dropout_mask=mask, dropout_mask1=mask1),
                 t, opts)
    low_t = _leaves(t)
    low = _torch_lowp(rms, low_t, ns, opts, mask, mask1)
    res_dtype = (torch.float32 if opts.get("residual_in_fp32")
                 else t["residual"].dtype if t["residual"] is not None else dtype)
    for k in ("out", "out1", "residual_out"):
        if k in ours:
            want = res_dtype if k == "residual_out" else dtype
            assert ours[k].dtype == want and ours[k].shape == t["input"].shape, k
            assert_close_rule(ours[k], ref[k], low[k], name=k)
    g = torch.Generator().manual_seed(1)
    cot = {k: torch.randn(ours[k].shape, generator=g, dtype=torch.float64)
           for k in ("out", "out1", "residual_out") if k in ours}
    gd, gr, gl = _grads(ours, ours_t, cot), _grads(ref, ref_t, cot), _grads(low, low_t, cot)
    assert set(gd) == set(gr)
    for k in gd:
        assert gd[k].dtype == t[k].dtype and gd[k].shape == t[k].shape, k
        assert_close_rule(gd[k], gr[k], gl[k], factor=3.0, name=f"d{k}")


@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_dropout_masks(backend):
    """Keep rate 1 - p, independent masks for input and x1, reproducible under manual_seed."""
    skip_unless_backend(backend)
    x = torch.randn(16, 256)
    x1 = torch.randn(16, 256)

    def run():
        return fastattn.layer_norm(x, 256, x1=x1, dropout_p=0.3, return_dropout_mask=True,
                                   backend=backend)

    torch.manual_seed(0)
    out, m, m1 = run()
    torch.manual_seed(0)
    out_b, m_b, m1_b = run()
    assert torch.equal(m, m_b) and torch.equal(m1, m1_b) and torch.equal(out, out_b)
    for mk in (m, m1):
        assert mk.dtype == torch.bool and mk.shape == x.shape
        assert abs(mk.float().mean().item() - 0.7) < 0.03
    assert (m != m1).float().mean().item() > 0.3  # 2 * 0.3 * 0.7 = 0.42 when independent
    torch.manual_seed(1)
    _, m_c, _ = run()
    assert not torch.equal(m, m_c)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_quantize_int8(backend, dtype, rms):
    """quantize="int8" is quantize_per_token of the norm's output, bit for bit: with and without
    a residual (float32 x alone is read in place on the CPU), widths under and over the CPU
    kernel's unrolled steps, rows with inf / NaN, and a weight with inf (the rows then take the
    kernel's NaN-tracking maximum)."""
    skip_unless_backend(backend)
    g = torch.Generator().manual_seed(0)
    fn = fastattn.rms_norm if rms else fastattn.layer_norm
    for N, with_residual, inf_weight in [(67, True, False), (67, False, False),
                                         (300, False, False), (300, True, True)]:
        x = (torch.randn(5, 3, N, generator=g) * 3).to(dtype)
        r = torch.randn(5, 3, N, generator=g).to(dtype)
        w = (torch.randn(N, generator=g) * 0.5 + 1).to(dtype)
        x[1, 2] = 0  # an all-zero row: scale 0, q 0 (with r, the residual row is zeroed too)
        r[1, 2] = 0
        x[2, 0, 7] = float("inf")
        x[3, 1, N - 1] = float("nan")
        if inf_weight:
            w[5] = float("inf")
        kw = dict(residual=r) if with_residual else {}
        q, scale, *res = fn(x, N, w, quantize="int8", backend=backend, **kw)
        out = fn(x, N, w, prenorm=with_residual, backend=backend, **kw)
        out, res2 = out if with_residual else (out, None)
        want_q, want_scale = reference.quantize_per_token(out)
        assert q.dtype == torch.int8 and q.shape == x.shape
        assert scale.dtype == torch.float32 and scale.shape == (5, 3)
        assert torch.equal(q, want_q), (N, with_residual, inf_weight)
        torch.testing.assert_close(scale, want_scale, rtol=0, atol=0, equal_nan=True)
        if with_residual:
            torch.testing.assert_close(res[0], res2, rtol=0, atol=0, equal_nan=True)
        else:
            assert res == []
        if not inf_weight:  # (0 * inf is NaN)
            assert scale[1, 2] == 0 and not q[1, 2].any()
        assert scale[3, 1].isnan()


def test_gemma_offset_matches_transformers_formula():
    """offset=1.0 is GemmaRMSNorm: x_hat * (1 + w) computed in float32, then cast."""
    x = torch.randn(4, 64).to(torch.bfloat16)
    w = (torch.randn(64) * 0.1).to(torch.bfloat16)
    xf = x.float()
    want = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + w.float())).to(
        torch.bfloat16)
    for backend in ("reference", "cpu"):
        skip_unless_backend(backend)
        got = fastattn.rms_norm(x, 64, w, 1e-6, offset=1.0, backend=backend)
        assert (got.float() - want.float()).abs().max().item() <= 2 ** -7 * 4


def _ln(**kw):
    x = torch.randn(4, 32)
    return fastattn.layer_norm(x, 32, torch.ones(32), **kw)


@pytest.mark.parametrize("backend", ("reference", "cpu", "triton"))
@pytest.mark.parametrize("kw, exc, match", [
    (dict(x1=torch.randn(4, 31)), ValueError, "x1 must have input's shape"),
    (dict(x1=torch.randn(4, 32, dtype=torch.float16)), TypeError, "x1 must have input's dtype"),
    (dict(weight1=torch.ones(31)), ValueError, "weight1 must have shape"),
    (dict(weight1=torch.ones(32, dtype=torch.int32)), TypeError, "weight1 must be"),
    (dict(bias1=torch.ones(32)), ValueError, "bias1 needs weight1"),
    (dict(rowscale=torch.ones(5)), ValueError, "rowscale must have input's leading shape"),
    (dict(rowscale=torch.ones(4, dtype=torch.int64)), TypeError, "rowscale must be"),
    (dict(residual=torch.randn(4, 32, dtype=torch.float16)), TypeError,
     "residual of dtype Half cannot hold"),
    (dict(residual=torch.randn(32)), ValueError, "residual must have input's shape"),
    (dict(dropout_p=1.0), ValueError, "dropout_p must be in"),
    (dict(quantize="int4"), ValueError, "quantize must be"),
    (dict(quantize="int8", weight1=torch.ones(32)), ValueError, "quantize takes no weight1"),
])
def test_bad_input(backend, kw, exc, match):
    skip_unless_backend(backend)
    with pytest.raises(exc, match=match):
        _ln(backend=backend, **kw)


def test_offset_needs_weight():
    with pytest.raises(ValueError, match="offset needs weight"):
        fastattn.rms_norm(torch.randn(2, 8), 8, offset=1.0)
    with pytest.raises(TypeError):
        fastattn.rms_norm(torch.randn(2, 8), 8, torch.ones(8), bias1=torch.ones(8))


@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_opcheck(backend):
    skip_unless_backend(backend)
    x = torch.randn(3, 40)
    args = (x, [40], torch.randn(40), torch.randn(40), torch.randn(3, 40), torch.randn(3, 40),
            torch.randn(40), None, torch.rand(3) + 0.5, 1e-5, False, 1.0, 0.0, 0, True, False)
    op = (torch.ops.fastattn.triton_layer_norm_fused_fwd if backend == "triton"
          else torch.ops.fastattn.layer_norm_fused_fwd)
    torch.library.opcheck(op, args)


def test_supports_fused():
    """CUDA: offset (and a residual of input's dtype) only, the rest refused with the reason so
    "auto" moves on; Triton: register-resident rows only."""
    from fastattn.ops import layer_norm as ops

    cuda = torch.device("cuda", 0)
    bf = torch.bfloat16
    dt = (bf, bf, bf, None, None, None, None)
    assert ops._supports_fused("cuda", torch.device("cpu"), (dt, 4096, True)) is None
    why = ops._supports_fused("cuda", cuda, (dt, 4096, False))
    assert why is not None and "dropout" in why
    why = ops._supports_fused("triton", torch.device("cpu"), ((torch.float32,) * 7, 8193, False))
    assert why is not None and "8192" in why
    assert ops._supports_fused("cpu", torch.device("cpu"), ((torch.float32,) * 7, 1 << 16,
                                                              False)) is None
    why = ops._supports_fused("cpu", torch.device("cpu"), ((torch.float64,) + (None,) * 6, 8,
                                                            False))
    assert why is not None and "float64" in why


@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_torch_compile_fullgraph(backend):
    """The fused call is one graph node (dropout_p = 0: drawing a seed is a host read)."""
    skip_unless_backend(backend)
    x, x1, r = torch.randn(3, 48), torch.randn(3, 48), torch.randn(3, 48)
    w, w1 = torch.randn(48), torch.randn(48)

    def f(x, x1, r, w, w1):
        return fastattn.rms_norm(x, 48, w, 1e-5, residual=r, x1=x1, weight1=w1, offset=1.0,
                                 residual_in_fp32=True, backend=backend)

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, x1, r, w, w1)
    want = f(x, x1, r, w, w1)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
