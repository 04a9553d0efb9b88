"""fastattn.layer_norm / fastattn.rms_norm on every backend, forward and backward, against the
float64 reference by the correctness rule (docs/design.md) (outputs 2x, gradients 3x PyTorch's own low-precision error).

Row counts stay tiny (the Triton interpreter runs numpy per program, one program per row) while
the normalized sizes cover the register-resident Triton path, its column loop (> 16K in the
backward, > 64K in the forward) and odd sizes that leave SIMD tails on the C++ path.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference
from fastattn.ops import _backend
from tests.helpers import (
    BACKENDS_UNDER_TEST,
    assert_close_rule,
    is_interpret,
    nan_padded,
    skip_unless_backend,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (input shape, normalized_shape, weight, bias, residual): every dtype, norm and backend
CASES = [
    ((3, 768), 768, True, True, False),
    ((3, 1000), 1000, True, True, True),
    ((2, 3, 111), 111, False, False, True),
    ((2, 2, 2, 17), (17,), True, False, False),
    ((3, 4, 25), (4, 25), True, True, True),  # multi-dim normalized shape: N = 100
    ((3, 1), 1, True, True, False),
    ((3, 4096), 4096, True, False, True),
    ((1, 8192), 8192, True, True, True),
]
# long rows, on the kernel backends, one (norm, dtype) pair each to keep the interpreter short.
# Triton keeps rows of up to 16K (forward) / 8K (backward) elements in registers and loops over
# column blocks beyond; (1, 8192) above is the largest register-resident backward.
LONG_CASES = [
    # register-resident forward, column-looping backward
    ((2, 16384), 16384, False, False, False, False, torch.float16),
    ((2, 16384), 16384, True, True, True, True, torch.bfloat16),
    # column loops forward and backward
    ((2, 65536), 65536, True, True, True, False, torch.bfloat16),
    ((2, 65536), 65536, True, False, False, True, torch.float32),
    ((1, 66001), 66001, True, True, False, False, torch.float32),
    ((1, 66001), 66001, True, False, True, True, torch.bfloat16),
]


def _case_id(case):
    shape, ns, w, b, r = case
    return "x".join(map(str, shape)) + ("-w" if w else "") + ("-b" if b else "") + ("-r" if r else "")


def _make(shape, ns, dtype, weight, bias, residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    ns = (ns,) if isinstance(ns, int) else tuple(ns)
    # an offset well above the spread: a one-pass E[x^2] - mean^2 variance would fail here
    x = (torch.randn(shape, generator=g) * 2 + 3).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype) if residual else None
    w = (torch.randn(ns, generator=g) * 0.5 + 1).to(dtype) if weight else None
    b = torch.randn(ns, generator=g).to(dtype) if bias else None
    dy = torch.randn(shape, generator=g).to(dtype)
    ds = torch.randn(shape, generator=g).to(dtype) if residual else None
    return x, r, w, b, dy, ds


def _leaf(t, dtype=None):
    if t is None:
        return None
    t = t.detach().to(dtype or t.dtype).clone()
    return t.requires_grad_()


def _run(fn, x, r, w, b, dy, ds, ns, eps, rms):
    """Forward + backward of one norm call; returns (out, summed or None, grads of x, r, w, b)."""
    x, r, w, b = _leaf(x), _leaf(r), _leaf(w), _leaf(b)
    if rms:
        res = fn(x, ns, w, eps, residual=r) if r is not None else fn(x, ns, w, eps)
    else:
        res = fn(x, ns, w, b, eps, residual=r) if r is not None else fn(x, ns, w, b, eps)
    out, summed = res if r is not None else (res, None)
    loss = (out.float() * dy.float()).sum()
    if summed is not None:
        loss = loss + (summed.float() * ds.float()).sum()
    leaves = [t for t in (x, r, w, b) if t is not None]
    grads = iter(torch.autograd.grad(loss, leaves))
    return out, summed, [next(grads) if t is not None else None for t in (x, r, w, b)]


def _torch_fn(rms):
    """Plain PyTorch in the inputs' dtype: the low-precision baseline of the rule."""
    def fn(x, ns, w, *rest, residual=None):
        s = x if residual is None else x + residual
        if rms:
            out = F.rms_norm(s, ns, w, rest[0])
        else:
            out = F.layer_norm(s, ns, w, rest[0], rest[1])
        return out if residual is None else (out, s)

    return fn


def _check(backend, rms, dtype, shape, ns, weight, bias, residual, *, eps=1e-5):
    if rms:
        bias = False
    x, r, w, b, dy, ds = _make(shape, ns, dtype, weight, bias, residual)
    ns_t = (ns,) if isinstance(ns, int) else tuple(ns)
    ours_fn = ((lambda *a, **k: fastattn.rms_norm(*a, **k, backend=backend)) if rms
               else (lambda *a, **k: fastattn.layer_norm(*a, **k, backend=backend)))
    ref_fn = reference.rms_norm if rms else reference.layer_norm
    out, summed, grads = _run(ours_fn, x, r, w, b, dy, ds, ns, eps, rms)
    d = torch.float64
    ref = _run(ref_fn, *(t.to(d) if t is not None else None for t in (x, r, w, b, dy, ds)),
               ns_t, eps, rms)
    low = _run(_torch_fn(rms), x, r, w, b, dy, ds, ns_t, eps, rms)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_rule(out, ref[0], low[0], name="out")
    if residual:
        assert summed.dtype == dtype
        assert_close_rule(summed, ref[1], low[1], name="residual_out")
    for name, g, gr, gl in zip(("dinput", "dresidual", "dweight", "dbias"), grads, ref[2], low[2],
                               strict=True):
        if gr is None:
            assert g is None, name
            continue
        assert g.dtype == dtype, name
        assert_close_rule(g, gr, gl, factor=3.0, name=name)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_forward_backward(backend, rms, dtype, case):
    skip_unless_backend(backend)
    _check(backend, rms, dtype, *case)


@pytest.mark.parametrize("case", LONG_CASES,
                         ids=lambda c: f"{_case_id(c[:5])}-{'rms' if c[5] else 'ln'}-{c[6]}")
@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_forward_backward_long_rows(backend, case):
    skip_unless_backend(backend)
    *case, rms, dtype = case
    _check(backend, rms, dtype, *case)


@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_mixed_dtype_weight(backend):
    """bf16 input with float32 weight/bias (as torch's CPU LayerNorm allows): output bf16,
    gradients in each tensor's own dtype."""
    skip_unless_backend(backend)
    x = torch.randn(3, 300).bfloat16().requires_grad_()
    w = torch.randn(300).requires_grad_()
    b = torch.randn(300).requires_grad_()
    out = fastattn.layer_norm(x, 300, w, b, backend=backend)
    assert out.dtype == torch.bfloat16
    dy = torch.randn_like(out)
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), dy)
    assert (gx.dtype, gw.dtype, gb.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = reference.layer_norm(x64, 300, w64, b64)
    rx, rw, rb = torch.autograd.grad(ref, (x64, w64, b64), dy.double())
    xl, wl, bl = (t.detach().requires_grad_() for t in (x, w.bfloat16(), b.bfloat16()))
    low = F.layer_norm(xl, (300,), wl, bl)
    lx, lw, lb = torch.autograd.grad(low, (xl, wl, bl), dy)
    assert_close_rule(out, ref, low)
    assert_close_rule(gx, rx, lx, factor=3.0, name="dinput")
    assert_close_rule(gw, rw, lw, factor=3.0, name="dweight")
    assert_close_rule(gb, rb, lb, factor=3.0, name="dbias")


# ---------------------------------------------------------------------------------------------
# strides: views, copies, out-of-bounds reads
# ---------------------------------------------------------------------------------------------
def _layouts(x):
    """(name, tensor with x's values, whether the (M, N) rows are a view) for several layouts."""
    B, T, N = x.shape
    wide = torch.empty(B, T, N + 24, dtype=x.dtype)
    wide[..., 5:5 + N] = x  # rows strided, last dim contiguous: a view
    tr = x.transpose(0, 1).contiguous().transpose(0, 1)  # (B, T) dims permuted: one copy
    return [("row_strided", wide[..., 5:5 + N]), ("permuted", tr), ("nan_padded", nan_padded(x))]


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_non_contiguous(backend, rms):
    """Strided inputs give bitwise the same result as the contiguous input (same per-row
    computation), gradients included, and never read past the tensor (NaN padding)."""
    skip_unless_backend(backend)
    torch.manual_seed(0)
    N = 257
    x0 = torch.randn(2, 3, N).bfloat16()
    r0 = torch.randn(2, 3, N).bfloat16()
    w = torch.randn(N).bfloat16()
    b = None if rms else torch.randn(N).bfloat16()
    dy = torch.randn(2, 3, N).bfloat16()

    def run(x, r):
        x, r = x.detach().requires_grad_(), r.detach().requires_grad_()
        wl = w.clone().requires_grad_()
        if rms:
            out, s = fastattn.rms_norm(x, N, wl, 1e-6, residual=r, backend=backend)
        else:
            out, s = fastattn.layer_norm(x, N, wl, b, residual=r, backend=backend)
        gx, gr, gw = torch.autograd.grad((out * dy).sum() + s.float().sum(), (x, r, wl))
        return out, s, gx, gr, gw

    expect = run(x0, r0)
    for (name, x), (_, r) in zip(_layouts(x0), _layouts(r0), strict=True):
        got = run(x, r)
        for e, g in zip(expect, got, strict=True):
            assert not torch.isnan(g).any(), name
            assert torch.equal(e, g), name


def test_row_strided_input_is_not_copied():
    """The kernel reads the rows of a row-strided input in place: no copy runs (the profiler
    records every op the kernel calls), while a transposed input, whose rows are not
    contiguous, is copied once."""
    skip_unless_backend("cpu")

    def ops_run(x):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fastattn.layer_norm(x, 64, backend="cpu")
        return {e.name for e in prof.events()}

    big = torch.randn(4, 6, 80)
    copies = {"aten::copy_", "aten::clone", "aten::contiguous"}
    assert not ops_run(big[..., 8:72]) & copies
    assert ops_run(torch.randn(64, 24).t()) & copies


def test_residual_sum_is_rounded():
    """With residual, what is normalised is the sum rounded to the input dtype."""
    skip_unless_backend("cpu")
    x = torch.randn(4, 96).bfloat16()
    r = torch.randn(4, 96).bfloat16()
    out, s = fastattn.layer_norm(x, 96, residual=r, backend="cpu")
    assert torch.equal(s, x + r)
    assert torch.equal(out, fastattn.layer_norm(x + r, 96, backend="cpu"))


# ---------------------------------------------------------------------------------------------
# torch.library / torch.compile
# ---------------------------------------------------------------------------------------------
def _op_args(residual, weight, bias, rms, dtype=torch.float32):
    shape, N = (2, 3, 40), 40  # rows of N = 40, M = 6
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    return (x, [N],
            torch.randn(N, dtype=dtype, requires_grad=True) if weight else None,
            torch.randn(N, dtype=dtype, requires_grad=True) if bias else None,
            torch.randn(shape, dtype=dtype, requires_grad=True) if residual else None,
            1e-5, rms)


OPCHECK_CASES = [(True, True, True, False), (False, True, False, True), (True, False, False, True),
                 (False, False, False, False)]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=["res-w-b", "rms-w", "rms-res", "plain"])
@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_opcheck(backend, case):
    skip_unless_backend(backend)
    fwd = (torch.ops.fastattn.layer_norm_fwd if backend == "cpu"
           else torch.ops.fastattn.triton_layer_norm_fwd)
    bwd = (torch.ops.fastattn.layer_norm_bwd if backend == "cpu"
           else torch.ops.fastattn.triton_layer_norm_bwd)
    residual, weight, bias, rms = case
    args = _op_args(residual, weight, bias, rms)
    torch.library.opcheck(fwd, args)
    with torch.no_grad():
        out, res_out, mean, rstd = fwd(*args)
    # the backward op has no autograd of its own (no double backward): plain tensors, on rows
    w, b = (t.detach() if t is not None else None for t in args[2:4])
    x = (res_out if residual else args[0].detach()).reshape(-1, 40)
    bwd_args = (torch.randn_like(x), torch.randn_like(x) if residual else None, x, w, b,
                mean, rstd, rms)
    torch.library.opcheck(bwd, bwd_args)


def test_torch_compile_fullgraph():
    skip_unless_backend("cpu")
    torch._dynamo.reset()

    def f(x, r, w, b):
        out, s = fastattn.layer_norm(x, x.shape[-1], w, b, residual=r, backend="cpu")
        return out * 2 + fastattn.rms_norm(s, (x.shape[-1],), w, backend="cpu")

    x, r = torch.randn(2, 7, 96), torch.randn(2, 7, 96)
    w, b = torch.randn(96), torch.randn(96)
    leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
    leaves_c = [t.clone().requires_grad_() for t in (x, r, w, b)]
    dy = torch.randn(2, 7, 96)
    expect = f(*leaves)
    got = torch.compile(f, fullgraph=True)(*leaves_c)
    torch.testing.assert_close(got, expect)
    ge = torch.autograd.grad(expect, leaves, dy)
    gg = torch.autograd.grad(got, leaves_c, dy)
    for a, b_ in zip(gg, ge, strict=True):
        torch.testing.assert_close(a, b_)


# ---------------------------------------------------------------------------------------------
# determinism, instruction-set builds
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_weight_grad_deterministic(backend):
    """dW/dB are bitwise repeatable, on the CPU for any number of threads."""
    skip_unless_backend(backend)
    M, N = (300, 512) if backend == "cpu" else (20, 96)
    x = torch.randn(M, N).requires_grad_()
    w = torch.randn(N).requires_grad_()
    b = torch.randn(N).requires_grad_()
    dy = torch.randn(M, N) * 10

    def grads():
        out = fastattn.layer_norm(x, N, w, b, backend=backend)
        return torch.autograd.grad(out, (w, b), dy)

    first = grads()
    threads = torch.get_num_threads()
    try:
        for n in ((1, 3, threads) if backend == "cpu" else (threads, threads)):
            torch.set_num_threads(n)
            for a, b_ in zip(grads(), first, strict=True):
                assert torch.equal(a, b_), f"{n} threads"
    finally:
        torch.set_num_threads(threads)


_ISA_SCRIPT = r"""
import torch, fastattn
from fastattn import reference
import torch.nn.functional as F
from tests.helpers import assert_close_rule
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for N in (5, 1000):
        x = torch.randn(3, N).to(dtype).requires_grad_()
        r = torch.randn(3, N).to(dtype)
        w = torch.randn(N).to(dtype).requires_grad_()
        out, s = fastattn.layer_norm(x, N, w, None, residual=r, backend="cpu")
        dy = torch.randn(3, N).to(dtype)
        gx, gw = torch.autograd.grad(out, (x, w), dy)
        x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        ref = reference.layer_norm(x64 + r.double(), N, w64)
        rx, rw = torch.autograd.grad(ref, (x64, w64), dy.double())
        xl, wl = x.detach().requires_grad_(), w.detach().requires_grad_()
        low = F.layer_norm(xl + r, (N,), wl)
        lx, lw = torch.autograd.grad(low, (xl, wl), dy)
        assert_close_rule(out, ref, low)
        assert_close_rule(gx, rx, lx, factor=3.0)
        assert_close_rule(gw, rw, lw, factor=3.0)
# FlashAttention's keywords (the fused kernels of the same builds)
from tests import test_layer_norm_fused as fused
for case in fused.CASES[2:5] + fused.CASES[7:8]:
    fused.test_fused_forward_backward("cpu", case)
for dtype in (torch.bfloat16, torch.float16):
    fused.test_quantize_int8("cpu", dtype, True)
print("ok", torch.backends.cpu.get_cpu_capability())
"""


def test_other_instruction_set_builds():
    """The generic and AVX2 builds of the C++ kernels (picked from ATen's capability, which
    ATEN_CPU_CAPABILITY lowers) are correct too; this machine otherwise runs its best one."""
    skip_unless_backend("cpu")
    capabilities = ["default"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        capabilities.append("avx2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = {}
    for cap in capabilities:  # both at once: most of the time is the interpreter start-up
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap, PYTHONPATH=root, OMP_NUM_THREADS="1")
        procs[cap] = subprocess.Popen([sys.executable, "-c", _ISA_SCRIPT], cwd=root, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for cap, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{cap}: {err[-3000:]}"
        assert out.split() == ["ok", cap.upper()], out


# ---------------------------------------------------------------------------------------------
# backend choice and bad input
# ---------------------------------------------------------------------------------------------
def test_backends_lists_the_ops():
    auto = fastattn.backends()["auto"]
    assert "layer_norm" in auto and "rms_norm" in auto


def test_float64_falls_back_to_reference_with_warning():
    _backend._warn_fallback.cache_clear()
    _backend._CHOICES.clear()
    x = torch.randn(3, 10, dtype=torch.float64)
    with pytest.warns(UserWarning, match="layer_norm"):
        out = fastattn.layer_norm(x, 10)
    torch.testing.assert_close(out, F.layer_norm(x, (10,)))
    with pytest.raises(RuntimeError, match="backend='cpu'.*dtype"):
        fastattn.layer_norm(x, 10, backend="cpu")


def test_rms_norm_default_eps_matches_torch():
    x = torch.randn(4, 32).bfloat16()
    for backend in ("reference", "cpu"):
        skip_unless_backend(backend)
        out = fastattn.rms_norm(x, 32, backend=backend)
        torch.testing.assert_close(out, F.rms_norm(x.float(), (32,), eps=torch.finfo(
            torch.bfloat16).eps).bfloat16(), atol=1e-2, rtol=1e-2)


def test_empty_input():
    for backend in ("reference", "cpu"):
        skip_unless_backend(backend)
        x = torch.randn(0, 16, requires_grad=True)
        out = fastattn.layer_norm(x, 16, backend=backend)
        assert out.shape == (0, 16)
        out.sum().backward()
        assert x.grad.shape == (0, 16)


_X = torch.randn(2, 3, 8)
BAD_INPUT = [
    ("input", lambda: fastattn.layer_norm([1.0, 2.0], 2), TypeError, "input"),
    ("int_input", lambda: fastattn.layer_norm(torch.ones(2, 8, dtype=torch.int64), 8),
     TypeError, "input must be a floating-point"),
    ("shape_mismatch", lambda: fastattn.layer_norm(_X, 7), ValueError, "normalized_shape"),
    ("shape_too_long", lambda: fastattn.layer_norm(_X, (1, 2, 3, 8)), ValueError,
     "normalized_shape"),
    ("shape_empty", lambda: fastattn.layer_norm(_X, ()), ValueError, "normalized_shape"),
    ("shape_type", lambda: fastattn.layer_norm(_X, 8.0), TypeError, "normalized_shape"),
    ("weight_shape", lambda: fastattn.layer_norm(_X, 8, torch.ones(7)), ValueError, "weight"),
    ("bias_shape", lambda: fastattn.layer_norm(_X, 8, None, torch.ones(3, 8)), ValueError,
     "bias"),
    ("weight_int", lambda: fastattn.layer_norm(_X, 8, torch.ones(8, dtype=torch.int32)),
     TypeError, "weight"),
    ("weight_device", lambda: fastattn.layer_norm(_X, 8, torch.ones(8, device="meta")),
     RuntimeError, "weight must be on the same device"),
    ("residual_shape", lambda: fastattn.layer_norm(_X, 8, residual=torch.ones(3, 8)),
     ValueError, "residual"),
    ("residual_dtype", lambda: fastattn.layer_norm(_X, 8, residual=_X.half()), TypeError,
     "residual"),
    ("eps_negative", lambda: fastattn.layer_norm(_X, 8, eps=-1e-5), ValueError, "eps"),
    ("eps_nan", lambda: fastattn.rms_norm(_X, 8, eps=float("nan")), ValueError, "eps"),
    ("rms_weight_shape", lambda: fastattn.rms_norm(_X, 8, torch.ones(2)), ValueError, "weight"),
    ("backend", lambda: fastattn.layer_norm(_X, 8, backend="tpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("fn,exc,match", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_cpp_op_rejects_bad_tensors():
    """The C++ op takes the public function's arguments and rules (csrc/checks.cpp); the backward
    op checks its own (M, N) contract."""
    skip_unless_backend("cpu")
    op = torch.ops.fastattn.layer_norm_fwd
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="normalized_shape"):
        op(torch.randn(8), [4], None, None, None, 1e-5, False)
    with pytest.raises(ValueError, match=r"weight must have shape \[8\], got \[7\]"):
        op(x, [8], torch.ones(7), None, None, 1e-5, False)
    with pytest.raises(TypeError, match="residual must have input's dtype"):
        op(x, [8], None, None, x.double(), 1e-5, False)
    with pytest.raises(RuntimeError, match="input must be float32, bfloat16 or float16"):
        op(x.double(), [8], None, None, None, 1e-5, False)
    with pytest.raises(ValueError, match="eps"):
        op(x, [8], None, None, None, -1.0, False)
    out, _, mean, rstd = op(x, [8], None, None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="rstd must be a float32"):
        torch.ops.fastattn.layer_norm_bwd(out, None, x, None, None, mean, rstd[:2], False)


# ---------------------------------------------------------------------------------------------
# the Triton kernels compile for the H200 without spilling (CI has no GPU; the interpreter does
# not check what the compiler does)
# ---------------------------------------------------------------------------------------------
_AOT_SCRIPT = r"""
import os, re, subprocess, sys, tempfile
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fastattn.triton.layer_norm as L

ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
flags = dict(HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=True, RMS=False)
bwd_flags = dict(HAS_DRES=True, HAS_WEIGHT=True, PARTIALS=True, RMS=False)
fp32 = {"Mean", "Rstd", "DW", "DB", "P"}
kernels = [  # (kernel, constexprs, num_warps): the largest register-resident rows and the loops
    (L._layer_norm_fwd_kernel, dict(flags, BLOCK_N=L._MAX_FUSED_FWD, SINGLE_BLOCK=True),
     L._num_warps(L._MAX_FUSED_FWD)),
    (L._layer_norm_fwd_kernel, dict(flags, BLOCK_N=L._LOOP_BLOCK, SINGLE_BLOCK=False),
     L._num_warps(L._LOOP_BLOCK)),
    (L._layer_norm_bwd_kernel, dict(bwd_flags, BLOCK_N=L._MAX_FUSED_BWD, SINGLE_BLOCK=True),
     L._num_warps_bwd(L._MAX_FUSED_BWD)),
    (L._layer_norm_bwd_kernel, dict(bwd_flags, BLOCK_N=L._LOOP_BLOCK, SINGLE_BLOCK=False),
     L._num_warps_bwd(L._LOOP_BLOCK)),
]
jobs = [(k, dt) for dt in ("bf16", "fp32") for k in kernels]
jobs.append(((L._sum_partials_kernel, dict(BLOCK_N=1024), 4), "fp32"))
for (fn, const, warps), dt in jobs:
    sig = {}
    for n in fn.arg_names:
        if n in const:
            sig[n] = "constexpr"
        elif n[0].isupper() and n not in ("M", "N", "G"):  # pointers; M, N, G are sizes
            sig[n] = "*fp32" if n in fp32 or fn is L._sum_partials_kernel else "*" + dt
        else:
            sig[n] = "fp32" if n == "eps" else "i32"
    k = triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    r = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                       capture_output=True, text=True)
    os.unlink(f.name)
    assert r.returncode == 0, r.stderr
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill", r.stderr)]
    regs = re.findall(r"Used (\d+) registers", r.stderr)
    print(fn.__name__, dt, const.get("BLOCK_N"), warps, "registers", regs, "spill bytes", spills)
    assert spills and not any(spills), r.stderr
"""


def test_triton_kernels_compile_for_sm90_without_spills():
    """The register-resident limits (_MAX_FUSED_FWD/_BWD) and warp counts hold on the H200:
    every kernel, bf16 and fp32, compiles for sm_90a with triton's bundled ptxas (no GPU
    needed) and spills nothing."""
    pytest.importorskip("triton", reason="needs triton installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=root)
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True,
                       env=env, cwd=root, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count("spill bytes") == 9, r.stdout


# ---------------------------------------------------------------------------------------------
# GPU: real sizes on the compiled kernels (skips without a CUDA device)
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
class TestGPU:
    @pytest.fixture(autouse=True)
    def _compiled(self):
        if is_interpret():
            pytest.skip("GPU tests run compiled kernels: set TRITON_INTERPRET=0")

    @staticmethod
    def _check_gpu(backend, rms, dtype, M, N, residual):
        """As _check, with the float32 reference on the GPU as the oracle (docs/design.md)."""
        skip_unless_backend(backend, "cuda")
        g = torch.Generator(device="cuda").manual_seed(0)
        x = (torch.randn(M, N, device="cuda", generator=g) * 2 + 3).to(dtype)
        r = torch.randn(M, N, device="cuda", generator=g).to(dtype) if residual else None
        w = (torch.randn(N, device="cuda", generator=g) * 0.5 + 1).to(dtype)
        b = None if rms else torch.randn(N, device="cuda", generator=g).to(dtype)
        dy = torch.randn(M, N, device="cuda", generator=g).to(dtype)
        ds = torch.randn(M, N, device="cuda", generator=g).to(dtype) if residual else None
        ours_fn = ((lambda *a, **k: fastattn.rms_norm(*a, **k, backend=backend)) if rms
                   else (lambda *a, **k: fastattn.layer_norm(*a, **k, backend=backend)))
        ref_fn = reference.rms_norm if rms else reference.layer_norm
        eps = 1e-5
        out, summed, grads = _run(ours_fn, x, r, w, b, dy, ds, N, eps, rms)
        f32 = torch.float32
        ref = _run(ref_fn, *(t.to(f32) if t is not None else None for t in (x, r, w, b, dy, ds)),
                   (N,), eps, rms)
        low = _run(_torch_fn(rms), x, r, w, b, dy, ds, (N,), eps, rms)
        assert_close_rule(out, ref[0], low[0], name="out")
        if residual:
            assert_close_rule(summed, ref[1], low[1], name="residual_out")
        for name, gg, gr, gl in zip(("dinput", "dresidual", "dweight", "dbias"), grads, ref[2],
                                    low[2], strict=True):
            if gr is not None:
                assert_close_rule(gg, gr, gl, factor=3.0, name=name)

    @pytest.mark.parametrize("N", [768, 1000, 4096, 8192, 16384, 65536])
    @pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
    @pytest.mark.parametrize("backend", ["triton", "cuda"])
    def test_forward_backward(self, backend, rms, N):
        self._check_gpu(backend, rms, torch.bfloat16, 4096 if N <= 8192 else 256, N, True)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    @pytest.mark.parametrize("backend", ["triton", "cuda"])
    def test_dtypes(self, backend, dtype):
        self._check_gpu(backend, False, dtype, 1000, 1111, False)

    @pytest.mark.parametrize("backend", ["triton", "cuda"])
    def test_weight_grad_deterministic(self, backend):
        skip_unless_backend(backend, "cuda")
        x = torch.randn(8192, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn(1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        out = fastattn.layer_norm(x, 1024, w, b, backend=backend)
        first = torch.autograd.grad(out, (w, b), dy, retain_graph=True)
        for _ in range(3):
            for a, b_ in zip(torch.autograd.grad(out, (w, b), dy, retain_graph=True), first,
                             strict=True):
                assert torch.equal(a, b_)
