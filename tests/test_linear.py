"""fastattn.linear: F.linear with a CPU kernel that streams the weight for few rows of x.

The kernel is held to the float64 reference with F.linear in x's dtype setting the tolerance, on
every CPU path (FASTATTN_CPU_ISA caps the choice: AVX-512, AVX2, and at::linear on the portable
build): M from 1 to 16 in row blocks of 1-4, K tails under the 8- and 16-element vectors, N off
the 4- and 16-row blocks, strided rows of x and w inside NaN padding, and M above 16 (a GEMM
inside the op: oneDNN's matmul or at::linear, FASTATTN_CPU_GEMM picks, each one tested).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rule, nan_padded, skip_unless_backend

import fastattn

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# cpu: the machine's best path (vdpbf16ps for bfloat16 on AVX512-BF16); avx512 / avx2: float32 FMA
# on widened weights, 16 / 8 per vector (a cap above the machine runs its best path); portable:
# at::linear
KERNELS = [("cpu", None), ("cpu", "avx512"), ("cpu", "avx2"), ("cpu", "portable"), ("reference", None)]


@pytest.fixture(params=KERNELS, ids=["cpu", "cpu-avx512", "cpu-avx2", "cpu-portable", "reference"])
def kernel(request, monkeypatch):
    backend, isa = request.param
    skip_unless_backend(backend)
    if isa is not None:
        monkeypatch.setenv("FASTATTN_CPU_ISA", isa)
    return backend


def _check(backend, x, w, b):
    out = fastattn.linear(x, w, b, backend=backend)
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], w.shape[0])
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert_close_rule(out, ref, F.linear(x, w, b), name=f"linear {tuple(x.shape)} x {tuple(w.shape)}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (1, 576, 37), (2, 17, 5), (3, 130, 19), (4, 64, 16),
                                   (5, 300, 23), (16, 96, 33), (17, 40, 9), (40, 33, 7)])
def test_linear_matches_reference(kernel, dtype, M, K, N):
    torch.manual_seed(M * 1000 + K)
    x = nan_padded(torch.randn(M, K).to(dtype))  # strided rows: a read past K sees NaN
    w = nan_padded((torch.randn(N, K) / K ** 0.5).to(dtype))
    b = torch.randn(N).to(dtype) if N % 2 else None
    _check(kernel, x, w, b)


@pytest.mark.parametrize("gemm", ["aten", "onednn"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M,K,N", [(17, 40, 9), (130, 384, 1152), (300, 1536, 67)])
def test_linear_gemm_paths(monkeypatch, gemm, dtype, M, K, N):
    """Above 16 rows: both GEMMs FASTATTN_CPU_GEMM chooses between (oneDNN takes float32 and
    bfloat16; float16 stays on at::linear), strided x/w inside NaN padding, leading dims."""
    skip_unless_backend("cpu")
    monkeypatch.setenv("FASTATTN_CPU_GEMM", gemm)
    torch.manual_seed(M + K + N)
    x = nan_padded(torch.randn(M, K).to(dtype))
    w = nan_padded((torch.randn(N, K) / K ** 0.5).to(dtype))
    _check("cpu", x, w, torch.randn(N).to(dtype))
    _check("cpu", x.view(M, 1, K)[:, 0].reshape(1, M, K), w, None)


def test_linear_gemm_choice_bad_value(monkeypatch):
    skip_unless_backend("cpu")
    monkeypatch.setenv("FASTATTN_CPU_GEMM", "mkl")
    with pytest.raises(RuntimeError, match="FASTATTN_CPU_GEMM must be aten or onednn"):
        fastattn.linear(torch.randn(40, 8), torch.randn(4, 8))


def test_linear_leading_dims_and_non_finite(kernel):
    x = torch.randn(2, 3, 48)
    x[0, 1, 5], x[1, 2, 0] = float("inf"), float("nan")
    w = torch.randn(10, 48)
    w[3, 5] = 0  # inf * 0: NaN, as F.linear gives
    _check(kernel, x, w, torch.randn(10))
    empty = fastattn.linear(torch.randn(0, 48), w, backend=kernel)
    assert empty.shape == (0, 10)


def test_linear_gradients():
    skip_unless_backend("cpu")
    x = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 20, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    # float64 runs on the reference; the op's own autograd is checked through torch.ops
    assert torch.autograd.gradcheck(lambda *a: torch.ops.fastattn.linear(*a), (x, w, b))
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    fastattn.linear(xf, wf).sum().backward()
    x2, w2 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    F.linear(x2, w2).sum().backward()
    torch.testing.assert_close(xf.grad, x2.grad)
    torch.testing.assert_close(wf.grad, w2.grad)


def test_linear_opcheck_and_compile():
    skip_unless_backend("cpu")
    x, w, b = torch.randn(2, 24), torch.randn(9, 24), torch.randn(9)
    torch.library.opcheck(torch.ops.fastattn.linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.fastattn.linear.default, (x.bfloat16(), w.bfloat16(), None))
    f = torch.compile(lambda x: fastattn.linear(x, w, b), fullgraph=True)
    torch.testing.assert_close(f(x), F.linear(x, w, b))


@pytest.mark.parametrize("args,err,match", [
    (lambda: (torch.randn(2, 8), torch.randn(4, 8).double(), None), TypeError,
     "weight must have x's dtype"),
    (lambda: (torch.randn(2, 8), torch.randn(4, 9), None), ValueError, r"x.shape\[-1\] \(8\) must equal"),
    (lambda: (torch.randn(2, 8), torch.randn(4, 8, 1), None), ValueError, "weight must be 2-D"),
    (lambda: (torch.randn(2, 8), torch.randn(4, 8), torch.randn(5)), ValueError, "bias"),
    (lambda: (torch.randn(2, 8), torch.randn(4, 8), torch.randn(4).half()), TypeError,
     "bias must have x's dtype"),
    (lambda: (torch.randint(0, 3, (2, 8)), torch.randn(4, 8), None), TypeError, "x must be"),
])
def test_linear_bad_input(args, err, match):
    with pytest.raises(err, match=match):
        fastattn.linear(*args())
