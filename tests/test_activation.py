"""fastattn.silu_mul on every backend, forward and backward, against the float64 reference by the
correctness rule (docs/design.md): outputs within 2x, gradients within 3x of PyTorch's own error
in the same dtype, PyTorch's own being ``F.silu(x[..., :I]) * x[..., I:]`` and its autograd.

The C++ kernels run on each instruction-set path (FASTATTN_CPU_ISA caps the choice: the
AVX-512, AVX2 and portable builds), Triton under the interpreter on small shapes. Sizes cover
I = 1 (a row shorter than any vector), odd I that leave vector tails, and rows longer than the
CPU kernel's 4096-column pieces and the Triton kernel's 1024-column blocks.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference
from fastattn.ops import _backend
from fastattn.ops import activation as ops_activation
from tests.helpers import assert_close_rule, is_interpret, nan_padded, skip_unless_backend

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (backend, FASTATTN_CPU_ISA): the C++ kernels on each build (None: the best this machine has),
# Triton interpreted, the reference
KERNELS = [("cpu", None), ("cpu", "avx2"), ("cpu", "portable"), ("triton", None),
           ("reference", None)]
KERNEL_IDS = ["cpu", "cpu-avx2", "cpu-portable", "triton", "reference"]

# x shapes (..., 2*I): I = 1, 7, 33, 1000+, leading dims of rank 0 to 3
SHAPES = [(3, 2), (14,), (2, 3, 66), (2, 1, 3, 14), (2, 2002), (1, 2 * 1536)]
# rows longer than a CPU piece (4096 columns) and a Triton block (1024), with a tail
LONG_SHAPES = [(3, 2 * 4100)]


@pytest.fixture(params=KERNELS, ids=KERNEL_IDS)
def kernel(request, monkeypatch):
    backend, isa = request.param
    skip_unless_backend(backend)
    if isa is not None:
        monkeypatch.setenv("FASTATTN_CPU_ISA", isa)
    return backend


def _make(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    # gates well into both saturated ends of silu (|g| up to ~15)
    x = (torch.randn(shape, generator=g) * scale).to(dtype)
    dy = torch.randn((*shape[:-1], shape[-1] // 2), generator=g).to(dtype)
    return x, dy


def _torch_silu_mul(x):
    """Plain PyTorch in x's dtype: the low-precision baseline of the rule."""
    i = x.shape[-1] // 2
    return F.silu(x[..., :i]) * x[..., i:]


def _run(fn, x, dy):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    (dx,) = torch.autograd.grad(out, x, dy)
    return out, dx


def _check(backend, x, dy):
    out, dx = _run(lambda t: fastattn.silu_mul(t, backend=backend), x, dy)
    ref, rdx = _run(reference.silu_mul, x.double(), dy.double())
    low, ldx = _run(_torch_silu_mul, x, dy)
    i = x.shape[-1] // 2
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], i)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert_close_rule(out, ref, low, name="out")
    assert_close_rule(dx, rdx, ldx, factor=3.0, name="dx")
    return out, dx


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward(kernel, dtype, shape):
    _check(kernel, *_make(shape, dtype))


@pytest.mark.parametrize("shape", LONG_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_forward_backward_long_rows(kernel, dtype, shape):
    _check(kernel, *_make(shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_saturated_and_special_gates(kernel, dtype):
    """Gates where exp(-g) overflows or underflows (|g| up to 1e4, in range for every dtype)
    and +-0: the output and gradients are finite and within the rule, like PyTorch's."""
    gates = torch.tensor([-1e4, -1000.0, -100.0, -88.8, -20.0, -1e-3, -0.0, 0.0, 1e-3, 20.0,
                          88.8, 100.0, 1000.0, 1e4])
    x = torch.cat([gates, torch.randn(gates.numel())]).to(dtype)[None]
    dy = torch.randn(1, gates.numel()).to(dtype)
    out, dx = _check(kernel, x, dy)
    assert torch.isfinite(out.float()).all() and torch.isfinite(dx.float()).all()


def test_reference_gradcheck():
    """The oracle itself: float64 gradients against finite differences, through the public
    function and directly."""
    x = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(reference.silu_mul, (x,))
    assert torch.autograd.gradgradcheck(reference.silu_mul, (x,))
    assert torch.autograd.gradcheck(lambda t: fastattn.silu_mul(t, backend="reference"), (x,))
    torch.testing.assert_close(reference.silu_mul(x), F.silu(x[..., :5]) * x[..., 5:])


# ---------------------------------------------------------------------------------------------
# empty inputs, layouts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(0, 14), (2, 0, 6), (0, 2)], ids=lambda s: "x".join(map(str, s)))
def test_zero_size(kernel, shape):
    x = torch.randn(shape, requires_grad=True)
    out = fastattn.silu_mul(x, backend=kernel)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad.shape == x.shape


def _layouts(x):
    """(name, tensor with x's values) for layouts other than contiguous: rows a stride apart
    (read in place), permuted leading dims and a strided last dim (each copied once), and a
    copy carved out of NaN-filled storage (a read past the tensor shows as NaN)."""
    B, T, N = x.shape
    wide = torch.full((B, T, N + 24), float("nan"), dtype=x.dtype)
    wide[..., 5:5 + N] = x
    permuted = x.transpose(0, 1).contiguous().transpose(0, 1)
    strided = torch.stack([x, torch.full_like(x, float("nan"))], dim=-1)[..., 0]
    return [("row_strided", wide[..., 5:5 + N]), ("permuted", permuted),
            ("last_dim_strided", strided), ("nan_padded", nan_padded(x))]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_non_contiguous(kernel, dtype):
    """Strided inputs and gradients give bitwise the results of the contiguous ones (the kernels
    compute every element the same way whatever the layout), contiguous, and nothing past a
    tensor is read."""
    x0, dy0 = _make((2, 3, 2 * 37), dtype)

    def run(x, dy):
        x = x.detach().requires_grad_()
        out = fastattn.silu_mul(x, backend=kernel)
        (dx,) = torch.autograd.grad(out, x, dy)
        return out, dx

    expect = run(x0, dy0)
    for (name, x), (_, dy) in zip(_layouts(x0), _layouts(dy0), strict=True):
        got = run(x, dy)
        for e, g in zip(expect, got, strict=True):
            assert not torch.isnan(g).any(), name
            if kernel == "reference":  # PyTorch's strided loops may round differently
                torch.testing.assert_close(g, e, msg=name)
                continue
            assert torch.equal(e, g), name
            assert g.is_contiguous(), name


def test_expanded_gradient(kernel):
    """out.sum().backward() hands the backward a stride-0 gradient."""
    x = torch.randn(3, 4, 18, requires_grad=True)
    fastattn.silu_mul(x, backend=kernel).sum().backward()
    xd = x.detach().double().requires_grad_()
    reference.silu_mul(xd).sum().backward()
    torch.testing.assert_close(x.grad, xd.grad.float(), rtol=1e-5, atol=1e-6)


def test_row_strided_input_is_not_copied():
    """The fused gate/up output read in place when its rows are a stride apart (a slice of a
    wider buffer); a transposed input, whose rows are not contiguous, is copied once."""
    skip_unless_backend("cpu")

    def ops_run(x):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fastattn.silu_mul(x, backend="cpu")
        return {e.name for e in prof.events()}

    copies = {"aten::copy_", "aten::clone", "aten::contiguous"}
    assert not ops_run(torch.randn(4, 6, 80)[..., 8:72]) & copies
    assert ops_run(torch.randn(64, 24).t()) & copies


# ---------------------------------------------------------------------------------------------
# threads and instruction sets
# ---------------------------------------------------------------------------------------------
def test_threads_do_not_change_the_result():
    """Large calls are split among threads by row pieces: every element is computed the same
    way whatever the split."""
    skip_unless_backend("cpu")
    x, dy = _make((37, 2 * 4500), torch.float32)
    x.requires_grad_()
    threads = torch.get_num_threads()

    def run():
        out = fastattn.silu_mul(x, backend="cpu")
        return out, torch.autograd.grad(out, x, dy)[0]

    first = run()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            for a, b in zip(run(), first, strict=True):
                assert torch.equal(a, b), f"{n} threads"
    finally:
        torch.set_num_threads(threads)


def test_instruction_set_builds_agree():
    """The AVX2 and portable builds (FASTATTN_CPU_ISA) agree with the best build within a few
    float32 ulps (their exp may differ in the last bit: SLEEF vs the C library)."""
    skip_unless_backend("cpu")
    x, dy = _make((7, 2 * 333), torch.float32)
    results = {}
    old = os.environ.get("FASTATTN_CPU_ISA")
    try:
        for isa in ("", "avx2", "portable"):
            os.environ["FASTATTN_CPU_ISA"] = isa
            results[isa] = _run(lambda t: fastattn.silu_mul(t, backend="cpu"), x, dy)
    finally:
        if old is None:
            os.environ.pop("FASTATTN_CPU_ISA", None)
        else:
            os.environ["FASTATTN_CPU_ISA"] = old
    for isa in ("avx2", "portable"):
        for a, b in zip(results[isa], results[""], strict=True):
            torch.testing.assert_close(a, b, rtol=4e-7, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# torch.library / torch.compile
# ---------------------------------------------------------------------------------------------
def _ops(backend):
    if backend == "cpu":
        return torch.ops.fastattn.silu_mul_fwd, torch.ops.fastattn.silu_mul_bwd
    return torch.ops.fastattn.triton_silu_mul_fwd, torch.ops.fastattn.triton_silu_mul_bwd


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 2 * 20), (5, 2)], ids=["3d", "I1"])
@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_opcheck(backend, shape, dtype):
    skip_unless_backend(backend)
    fwd, bwd = _ops(backend)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    torch.library.opcheck(fwd, (x,))
    # the backward op has no autograd of its own (no double backward): plain tensors
    dy = torch.randn((*shape[:-1], shape[-1] // 2), dtype=dtype)
    torch.library.opcheck(bwd, (dy, x.detach()))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_torch_compile_fullgraph(backend, dynamic):
    skip_unless_backend(backend)
    torch._dynamo.reset()

    def f(x, w):
        h = fastattn.silu_mul(x, backend=backend)  # (B, L, I)
        return h @ w

    x, w = torch.randn(2, 5, 2 * 24), torch.randn(24, 8)
    leaves = [t.clone().requires_grad_() for t in (x, w)]
    leaves_c = [t.clone().requires_grad_() for t in (x, w)]
    dy = torch.randn(2, 5, 8)
    expect = f(*leaves)
    got = torch.compile(f, fullgraph=True, dynamic=dynamic)(*leaves_c)
    torch.testing.assert_close(got, expect)
    ge = torch.autograd.grad(expect, leaves, dy)
    gg = torch.autograd.grad(got, leaves_c, dy)
    for a, b in zip(gg, ge, strict=True):
        torch.testing.assert_close(a, b)


def test_torch_compile_rejects_odd_width():
    """The argument rules run on the traced shapes too."""
    torch._dynamo.reset()
    f = torch.compile(lambda x: fastattn.silu_mul(x, backend="reference"), fullgraph=True)
    with pytest.raises(Exception, match=r"x.shape\[-1\] must be even"):
        f(torch.randn(3, 7))


# ---------------------------------------------------------------------------------------------
# backend choice, per-call path, bad input
# ---------------------------------------------------------------------------------------------
def test_backends_lists_the_op():
    b = fastattn.backends()
    assert "silu_mul" in b["auto"]
    assert b["auto"]["silu_mul"]["cpu"] == ("cpu" if b["available"]["cpu"]["cpu"] else "reference")
    assert "silu_mul" in fastattn.__all__


def test_cuda_backend_refuses():
    """No CUDA kernel: the cuda backend refuses, auto takes Triton on CUDA tensors."""
    cuda = torch.device("cuda", 0)
    assert "no CUDA kernel" in ops_activation._supports("cuda", cuda, (torch.float16,))
    assert ops_activation._supports("triton", torch.device("cpu"), (torch.float32,)) is None
    assert "dtype" in ops_activation._supports("triton", torch.device("cpu"), (torch.float64,))


def test_cpu_call_takes_the_extension_entry_point(monkeypatch):
    """An eager CPU call goes straight from the public function to the C++ entry point (no
    Python backend choice), with and without autograd."""
    skip_unless_backend("cpu")

    def fail(*args, **kwargs):
        raise AssertionError("the Python path ran")

    monkeypatch.setattr(ops_activation, "_silu_mul", fail)
    x = torch.randn(1, 2 * 1536)
    with torch.no_grad():
        torch.testing.assert_close(fastattn.silu_mul(x), _torch_silu_mul(x))
    xg = x.clone().requires_grad_()
    out = fastattn.silu_mul(xg)
    assert out.grad_fn is not None
    out.sum().backward()
    assert xg.grad.shape == x.shape


def test_float64_falls_back_to_reference_with_warning():
    _backend._warn_fallback.cache_clear()
    _backend._CHOICES.clear()
    x = torch.randn(3, 10, dtype=torch.float64)
    with pytest.warns(UserWarning, match="silu_mul"):
        out = fastattn.silu_mul(x)
    torch.testing.assert_close(out, _torch_silu_mul(x))
    skip_unless_backend("cpu")
    with pytest.raises(RuntimeError, match="backend='cpu'.*dtype"):
        fastattn.silu_mul(x, backend="cpu")


_X = torch.randn(2, 3, 8)
BAD_INPUT = [
    ("not_tensor", lambda b: fastattn.silu_mul([1.0, 2.0], backend=b), TypeError, "x"),
    ("int", lambda b: fastattn.silu_mul(torch.ones(2, 8, dtype=torch.int64), backend=b),
     TypeError, "x must be a floating-point"),
    ("bool", lambda b: fastattn.silu_mul(torch.ones(2, 8, dtype=torch.bool), backend=b),
     TypeError, "x must be a floating-point"),
    ("complex", lambda b: fastattn.silu_mul(torch.ones(2, 8, dtype=torch.complex64), backend=b),
     TypeError, "x must be a floating-point"),
    ("0d", lambda b: fastattn.silu_mul(torch.tensor(1.0), backend=b), ValueError,
     "at least one dimension"),
    ("odd", lambda b: fastattn.silu_mul(torch.randn(2, 7), backend=b), ValueError,
     r"x.shape\[-1\] must be even and > 0 .*got 7"),
    ("width_0", lambda b: fastattn.silu_mul(torch.randn(2, 0), backend=b), ValueError,
     r"x.shape\[-1\] must be even and > 0"),
]


@pytest.mark.parametrize("backend", ("auto", "cpu", "triton", "reference"))
@pytest.mark.parametrize("fn,exc,match", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input(backend, fn, exc, match):
    if backend != "auto":
        skip_unless_backend(backend)
    with pytest.raises(exc, match=match):
        fn(backend)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        fastattn.silu_mul(_X, backend="gpu")
    with pytest.raises(ValueError, match="backend"):
        fastattn.silu_mul(_X, backend=None)
    with pytest.raises(TypeError):
        fastattn.silu_mul(_X, "cpu")  # backend is keyword-only
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        fastattn.silu_mul(_X, backend="cuda")


@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_ops_reject_bad_tensors(backend):
    """The ops take the public function's rules (csrc/checks.cpp), the backward op its own grad
    rules."""
    skip_unless_backend(backend)
    fwd, bwd = _ops(backend)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] must be even"):
        fwd(torch.randn(4, 7))
    with pytest.raises(TypeError, match="floating-point"):
        fwd(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"grad must have the output's shape \[4, 4\], got \[4, 8\]"):
        bwd(torch.randn(4, 8), x)
    with pytest.raises(TypeError, match="grad must have x's dtype"):
        bwd(torch.randn(4, 4, dtype=torch.float64), x)
    if backend == "cpu":
        with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16"):
            fwd(x.double())


# ---------------------------------------------------------------------------------------------
# GPU: real sizes on the compiled kernel (skips without a CUDA device)
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
class TestGPU:
    @pytest.fixture(autouse=True)
    def _compiled(self):
        if is_interpret():
            pytest.skip("GPU tests run compiled kernels: set TRITON_INTERPRET=0")
        skip_unless_backend("triton", "cuda")

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("M,n", [(1, 1536), (128, 1536), (4096, 11008), (3, 7), (77, 14336)])
    def test_forward_backward(self, dtype, M, n):
        """Against the float32 reference on the GPU (docs/design.md's oracle there)."""
        g = torch.Generator(device="cuda").manual_seed(0)
        x = (torch.randn(M, 2 * n, device="cuda", generator=g) * 3).to(dtype)
        dy = torch.randn(M, n, device="cuda", generator=g).to(dtype)
        out, dx = _run(lambda t: fastattn.silu_mul(t), x, dy)
        ref, rdx = _run(reference.silu_mul, x.float(), dy.float())
        low, ldx = _run(_torch_silu_mul, x, dy)
        assert_close_rule(out, ref, low, name="out")
        assert_close_rule(dx, rdx, ldx, factor=3.0, name="dx")

    def test_auto_picks_triton(self):
        assert fastattn.backends()["auto"]["silu_mul"]["cuda"] == "triton"
        with pytest.raises(RuntimeError, match="backend='cuda'"):
            fastattn.silu_mul(torch.randn(2, 8, device="cuda"), backend="cuda")
