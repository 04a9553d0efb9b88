"""int8 family: quantize_per_token / quantize_per_channel, int8_gemm, int8_weight_only_linear,
int8_linear, Int8Linear and SmoothQuant.

int8 results are exact: int32 GEMM outputs equal the reference (and torch._int_mm) bit for bit,
quantization equals fastattn.reference.quantize_per_token bit for bit. Dequantized outputs are
held to the float reference of the same quantized operands. The C++ CPU kernels are run on every
instruction-set path the machine has (FASTATTN_CPU_ISA caps the choice); Triton runs under
the interpreter on small shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rule, nan_padded, skip_unless_backend
from torch import nn

import fastattn
from fastattn import reference
from fastattn.nn import Int8Linear
from fastattn.smoothquant import collect_act_scales, smooth_layer_norm_linear

# (backend, FASTATTN_CPU_ISA): the CPU kernels on each path (amx: AMX tiles; avx512_bf16: vpdpbusd,
# and vdpbf16ps for bf16 weight-only linear; avx512_vnni: vpdpbusd, fp32 panels and the split
# weight-only kernel for small M; avx512: the FMA weight-only kernel; avx2: the AVX2 weight-only
# kernel; portable: scalar loops), Triton interpreted
KERNELS = [
    ("cpu", "amx"), ("cpu", "avx512_bf16"), ("cpu", "avx512_vnni"), ("cpu", "avx512"),
    ("cpu", "avx2"), ("cpu", "portable"), ("triton", None), ("reference", None),
]
KERNEL_IDS = ["cpu-amx", "cpu-avx512_bf16", "cpu-avx512_vnni", "cpu-avx512", "cpu-avx2",
              "cpu-portable", "triton", "reference"]
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=KERNELS, ids=KERNEL_IDS)
def kernel(request, monkeypatch):
    backend, isa = request.param
    skip_unless_backend(backend)
    if isa is not None:
        monkeypatch.setenv("FASTATTN_CPU_ISA", isa)
    return backend


def _is_triton(backend: str) -> bool:
    return backend == "triton"


def _randint8(*shape) -> torch.Tensor:
    return torch.randint(-128, 128, shape, dtype=torch.int8)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return 10 * math.log10(ref.pow(2).sum().item() / (ref - out).pow(2).sum().clamp_min(1e-300).item())


def _assert_same_quantization(got, want) -> None:
    (q, s), (q_ref, s_ref) = got, want
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q, q_ref), f"{(q != q_ref).sum().item()} int8 values differ"
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# quantization: bit-exact
# ---------------------------------------------------------------------------------------------
def _special_rows(K: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows that probe the contract: zeros, round-half-even ties, huge and tiny magnitudes,
    subnormal absmax (127/absmax overflows to inf), a lone nonzero."""
    rows = torch.randn(8, K) * torch.logspace(-3, 3, 8)[:, None]
    rows[0] = 0.0
    # absmax 127 -> 127/absmax == 1.0 exactly: x * inv are the ties themselves
    ties = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -126.5])
    rows[1] = 0.0
    rows[1, : min(K, ties.numel())] = ties[:K]
    rows[2] = torch.randn(K) * (3e38 if dtype == torch.float32 else 1e4)
    rows[3] = torch.randn(K) * (1e-30 if dtype == torch.float32 else 1e-4)
    if dtype == torch.float32:
        rows[4] = 0.0
        rows[4, 0] = 1e-40  # subnormal absmax: inv = inf, zeros become NaN -> 0
        rows[4, K // 2] = -7e-41
    rows[5] = 0.0
    rows[5, K - 1] = -3.0
    return rows.to(dtype)


# inf/NaN/subnormal rows are the point here: the interpreter's numpy warns about them
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("K", [1, 3, 10, 127, 1000])
def test_quantize_per_token_bit_exact(kernel, dtype, K):
    if _is_triton(kernel) and K > 127:
        K = 300  # the interpreter: small rows
    x = torch.cat([_special_rows(K, dtype), (torch.randn(9, K) * 4).to(dtype)])
    got = fastattn.quantize_per_token(x, backend=kernel)
    _assert_same_quantization(got, reference.quantize_per_token(x))
    if K >= 10:  # the ties row rounds half to even
        assert got[0][1, :8].tolist() == [127, 0, 2, 2, 0, -2, -2, 4]


def test_quantize_premise_exact_inverse():
    # the ties row relies on (1 / 127) * 127 == 1 in float32 (torch's evaluation of 127 / absmax)
    a = torch.tensor([127.0])
    assert (127.0 / a).item() == 1.0


def test_quantize_long_rows_and_leading_dims(kernel):
    K = 9000 if _is_triton(kernel) else 20000  # Triton: the two-pass path starts at 8192
    x = torch.randn(2, 3, K)
    q, s = fastattn.quantize_per_token(x, backend=kernel)
    assert q.shape == (2, 3, K) and s.shape == (2, 3)
    _assert_same_quantization((q.reshape(6, K), s.reshape(6)),
                              reference.quantize_per_token(x.reshape(6, K)))


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
def test_quantize_non_finite_rows(kernel):
    x = torch.randn(3, 40)
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    q, s = fastattn.quantize_per_token(x, backend=kernel)
    _assert_same_quantization((q, s), reference.quantize_per_token(x))
    assert torch.isnan(s[0]) and torch.isinf(s[1]) and torch.all(q[:2] == 0)


def test_quantize_strided_rows(kernel):
    big = torch.randn(7, 50)
    x = big[::2, 3:40]  # row stride 100, last dim contiguous
    _assert_same_quantization(fastattn.quantize_per_token(x, backend=kernel),
                              reference.quantize_per_token(x))
    xt = torch.randn(30, 6).t()  # last dim strided
    _assert_same_quantization(fastattn.quantize_per_token(xt, backend=kernel),
                              reference.quantize_per_token(xt))


def test_quantize_per_channel(kernel):
    w = torch.randn(33, 65)
    w_int8, scale = fastattn.quantize_per_channel(w, backend=kernel)
    _assert_same_quantization((w_int8, scale), reference.quantize_per_channel(w))
    assert scale.shape == (33,)
    # dequantized weight within half a quantization step per channel
    err = (w_int8.float() * scale[:, None] - w).abs()
    assert torch.all(err <= scale[:, None] * 0.5 * (1 + 1e-6))


# ---------------------------------------------------------------------------------------------
# int8 GEMM: exact int32
# ---------------------------------------------------------------------------------------------
GEMM_SHAPES = [  # (M, K, N)
    (1, 1, 1), (2, 3, 5), (1, 127, 33), (17, 33, 127), (2, 64, 3), (33, 64, 64), (64, 256, 96),
    (129, 96, 300),  # the AMX path packs b (plain epilogue)
    (20, 640, 200),  # the AMX path packs a (transposed epilogue)
    (5, 4100, 40),   # K beyond one cache block, K % 64 != 0
]
TRITON_GEMM_SHAPES = [(1, 1, 1), (2, 3, 5), (17, 33, 40), (33, 64, 3), (1, 70, 33)]


def _gemm_shapes(backend):
    return TRITON_GEMM_SHAPES if _is_triton(backend) else GEMM_SHAPES


def test_int8_gemm_int32_exact(kernel):
    for M, K, N in _gemm_shapes(kernel):
        a, b = _randint8(M, K), _randint8(N, K)
        out = fastattn.int8_gemm(a, b, backend=kernel)
        assert out.dtype == torch.int32 and out.shape == (M, N)
        assert torch.equal(out, reference.int8_gemm(a, b)), (M, K, N)


@pytest.mark.parametrize("M,K,N", [(17, 32, 48), (64, 256, 96), (128, 768, 200), (300, 64, 16)])
def test_int8_gemm_matches_int_mm(kernel, M, K, N):
    if _is_triton(kernel) and M * K * N > 20000:
        M, K, N = 17, 32, 48
    a, b = _randint8(M, K), _randint8(N, K)
    assert torch.equal(fastattn.int8_gemm(a, b, backend=kernel), torch._int_mm(a, b.t()))


def test_int8_gemm_extreme_values(kernel):
    # all -128 (the u8 shift of the VNNI path maps it to 0) and all 127: largest |acc|
    for M, K, N in [(3, 130, 20), (33, 64, 17)]:
        for va, vb in [(-128, -128), (127, -128), (127, 127)]:
            a = torch.full((M, K), va, dtype=torch.int8)
            b = torch.full((N, K), vb, dtype=torch.int8)
            assert torch.equal(fastattn.int8_gemm(a, b, backend=kernel), reference.int8_gemm(a, b))


def test_int8_gemm_non_contiguous(kernel):
    M, K, N = (9, 40, 24) if _is_triton(kernel) else (40, 200, 70)
    a = _randint8(M, K + 9)[:, 5 : 5 + K]            # row stride K + 9
    b = _randint8(K, N).t()                         # column-major b
    assert not a.is_contiguous() and not b.is_contiguous()
    assert torch.equal(fastattn.int8_gemm(a, b, backend=kernel), reference.int8_gemm(a, b))


def test_int8_gemm_empty(kernel):
    a, b = _randint8(0, 8), _randint8(5, 8)
    assert fastattn.int8_gemm(a, b, backend=kernel).shape == (0, 5)
    a, b = _randint8(3, 0), _randint8(4, 0)
    out = fastattn.int8_gemm(a, b, torch.ones(3), torch.ones(4), torch.arange(4.0), backend=kernel)
    assert torch.equal(out, torch.arange(4.0).expand(3, 4))


# ---------------------------------------------------------------------------------------------
# int8 GEMM: dequantizing epilogue
# ---------------------------------------------------------------------------------------------
_OUT_ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("scales", ["both", "a", "b", "both+bias"])
def test_int8_gemm_dequant(kernel, out_dtype, scales):
    for M, K, N in _gemm_shapes(kernel)[1:6]:
        a, b = _randint8(M, K), _randint8(N, K)
        sa = torch.rand(M) * 0.02 + 1e-3 if scales != "b" else None
        sb = torch.rand(N) * 0.02 + 1e-3 if scales != "a" else None
        bias = torch.randn(N) if scales.endswith("bias") else None
        out = fastattn.int8_gemm(a, b, sa, sb, bias, out_dtype=out_dtype, backend=kernel)
        assert out.dtype == out_dtype and out.shape == (M, N)
        # the same quantized operands in float64 (ref_hi) and in plain PyTorch float32 -> out_dtype
        ref_hi = reference.int8_gemm(a, b, *(None if t is None else t.double() for t in (sa, sb, bias)),
                                     out_dtype=torch.float64)
        ref_lo = reference.int8_gemm(a, b, sa, sb, bias, out_dtype=out_dtype)
        assert_close_rule(out, ref_hi, ref_lo)
        # tight: at most one ulp of the output dtype from the float32 reference epilogue
        tol = _OUT_ULP[out_dtype]
        torch.testing.assert_close(out.double(), ref_lo.double(), rtol=tol, atol=tol * 1e-3)


# ---------------------------------------------------------------------------------------------
# weight-only and W8A8 linear
# ---------------------------------------------------------------------------------------------
def _linear_operands(M, K, N, dtype, bias=True):
    x = torch.randn(M, K).to(dtype)
    w_int8, w_scale = reference.quantize_per_channel(torch.randn(N, K) / math.sqrt(K))
    b = torch.randn(N).to(dtype) if bias else None
    return x, w_int8, w_scale, b


def _check_weight_only(kernel, x, w_int8, w_scale, b):
    """The op against the float64 reference, with plain PyTorch in x's dtype (F.linear on the
    dequantized weight) setting the tolerance."""
    (M, K), N = x.shape, w_int8.shape[0]
    out = fastattn.int8_weight_only_linear(x, w_int8, w_scale, b, backend=kernel)
    assert out.dtype == x.dtype and out.shape == (M, N)
    ref_hi = reference.int8_weight_only_linear(x.double(), w_int8, w_scale.double(),
                                               None if b is None else b.double())
    w_lp = (w_int8.float() * w_scale[:, None]).to(x.dtype)
    assert_close_rule(out, ref_hi, F.linear(x, w_lp, b), name=f"out {M}x{K}x{N}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_int8_weight_only_linear(kernel, dtype):
    shapes = [(1, 33, 17), (3, 64, 40)] if _is_triton(kernel) else [(1, 1, 1), (1, 127, 33), (3, 256, 70), (17, 1000, 129)]
    for M, K, N in shapes:
        x, w_int8, w_scale, b = _linear_operands(M, K, N, dtype, bias=N % 2 == 1)
        _check_weight_only(kernel, x, w_int8, w_scale, b)


# M from 1 to 17: the dot-product kernels (x rows in blocks of 1-4; on AVX2 CPUs every M) with K
# tails under each vector width (8, 16, 32 and 64 k), N off the 4- and 16-row blocks of w, x rows
# strided inside NaN padding, raw int8 weights including -128.
WO_SMALL_M_KN = [(7, 5), (45, 19), (131, 37), (300, 18)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_int8_weight_only_linear_small_m(kernel, dtype):
    ms = [1, 5] if _is_triton(kernel) else range(1, 18)
    for M in ms:
        K, N = WO_SMALL_M_KN[M % len(WO_SMALL_M_KN)]
        x, _, _, b = _linear_operands(M, K, N, dtype, bias=M % 2 == 1)
        w_int8 = _randint8(N, K)
        w_int8[:, -1] = -128
        w_scale = torch.rand(N) * 1e-2 + 1e-3
        x = nan_padded(x)
        _check_weight_only(kernel, x, w_int8, w_scale, b)


# Small M on VNNI CPUs writes each row of x as int8 parts (three for float32, two for bfloat16 /
# float16): rows whose range spans many orders of magnitude (one outlier 1e4 x the rest, tiny
# values 1e-6 x), a zero row, rows with inf / NaN (the exact kernel's results: inf * 0 weights give
# NaN), K over 64-byte chunks and tails, weights at -128 and 127.
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_int8_weight_only_linear_split_rows(kernel, dtype):
    torch.manual_seed(3)
    for M, K, N in [(1, 576, 37), (6, 130, 21), (16, 1000, 9)]:
        x = torch.randn(M, K)
        x[0, K // 3] = 1e4  # an outlier channel: the first part's step is 1e4 / 127
        if M > 1:
            x[1] *= 1e-6
        if M > 2:
            x[2] = 0
            x[3, 7], x[4, K - 1], x[5, 0] = float("inf"), float("nan"), float("-inf")
        x = x.to(dtype)
        w_int8 = _randint8(N, K)
        w_int8[:, 0], w_int8[:, 1] = -128, 127
        w_int8[0, 7] = 0  # inf * 0 in row 3: NaN, as the reference
        w_scale = torch.rand(N) * 1e-2 + 1e-3
        b = torch.randn(N).to(dtype) if M % 2 == 0 else None
        _check_weight_only(kernel, nan_padded(x), w_int8, w_scale, b)


# M from 12 up takes the CPU kernel's GEMM path (w converted panel by panel; AMX tiles for
# bfloat16 x): odd N and K (column, K-block and tile tails), K over one K block (192), M over one
# row block (512), several row chunks (few column panels), x rows strided inside NaN padding,
# raw int8 weights including -128.
WO_LARGE_M = [(12, 64, 48), (16, 129, 77), (48, 77, 129), (67, 400, 77), (130, 256, 100),
              (530, 200, 50)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_int8_weight_only_linear_large_m(kernel, dtype):
    shapes = [(20, 40, 17)] if _is_triton(kernel) else WO_LARGE_M
    for i, (M, K, N) in enumerate(shapes):
        x, w_int8, w_scale, b = _linear_operands(M, K, N, dtype, bias=i % 2 == 0)
        if i == 1:
            w_int8 = _randint8(N, K)
            w_scale = torch.rand(N) * 1e-2 + 1e-3
        if i == 2:  # non-finite inputs reach their rows only (inf * 0 weights: NaN)
            x[3, 5], x[7, 0], x[M - 1, K - 1] = float("inf"), float("nan"), float("-inf")
            w_int8[:, 5] = 0
        x = nan_padded(x)  # strided rows; a read past a row's K values sees NaN
        _check_weight_only(kernel, x, w_int8, w_scale, b)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_int8_weight_only_bf16_products(kernel, dtype):
    """bf16_products=True: on the CPU backend at the avx512_bf16 level or above, float32 x of 16
    rows or more is rounded to bfloat16 for the products (float32 accumulation and output): the
    result is the reference's for the rounded x, by the rule, and differs from the exact op.
    Every other call (fewer rows, other dtypes, lower ISA levels, other backends) is bit-identical
    to the op without it."""
    shapes = [(20, 40, 17)] if _is_triton(kernel) else [(15, 64, 33)] + WO_LARGE_M[1:]
    level = fastattn._C.cpu_isa() if kernel == "cpu" else None
    for i, (M, K, N) in enumerate(shapes):
        x, w_int8, w_scale, b = _linear_operands(M, K, N, dtype, bias=i % 2 == 0)
        x = nan_padded(x)
        out = fastattn.int8_weight_only_linear(x, w_int8, w_scale, b, backend=kernel,
                                               bf16_products=True)
        exact = fastattn.int8_weight_only_linear(x, w_int8, w_scale, b, backend=kernel)
        assert out.dtype == dtype and out.shape == (M, N)
        if level in ("avx512_bf16", "amx") and dtype == torch.float32 and M >= 16:
            xb = x.bfloat16()
            ref_hi = reference.int8_weight_only_linear(xb.double(), w_int8, w_scale.double(),
                                                       None if b is None else b.double())
            lowp = reference.int8_weight_only_linear(xb.float(), w_int8, w_scale, b)
            assert_close_rule(out, ref_hi, lowp, name=f"bf16 products {M}x{K}x{N}")
            assert not torch.equal(out, exact), "bf16_products=True computed the exact products"
        else:
            assert torch.equal(out, exact), (level, dtype, M)
    if kernel == "reference":
        return  # the reference is plain differentiable PyTorch
    with pytest.raises(RuntimeError, match="inference-only"):
        x = torch.randn(20, 8, requires_grad=True)
        w_int8, w_scale = fastattn.quantize_per_channel(torch.randn(4, 8))
        fastattn.int8_weight_only_linear(x, w_int8, w_scale, backend=kernel,
                                         bf16_products=True).sum().backward()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_int8_linear_w8a8(kernel, dtype):
    shapes = [(17, 33, 20), (24, 64, 3)] if _is_triton(kernel) else [(5, 1, 1), (17, 33, 127), (64, 256, 96), (300, 96, 40)]
    for M, K, N in shapes:
        x, w_int8, w_scale, b = _linear_operands(M, K, N, dtype)
        x = x.reshape(1, M, K)
        out = fastattn.int8_linear(x, w_int8, w_scale, b, backend=kernel)
        assert out.dtype == dtype and out.shape == (1, M, N)
        ref_hi = reference.int8_linear(x.double(), w_int8, w_scale.double(), b.double())
        assert_close_rule(out, ref_hi, reference.int8_linear(x, w_int8, w_scale, b))


def test_int8_linear_small_m_dispatch(kernel, monkeypatch):
    # rows <= WEIGHT_ONLY_MAX_M[device] take the weight-only path on every backend alike
    monkeypatch.setitem(fastattn.ops.int8.WEIGHT_ONLY_MAX_M, "cpu", 3)
    for M, path in [(3, "weight_only"), (4, "w8a8")]:
        x, w_int8, w_scale, b = _linear_operands(M, 40, 24, torch.float32)
        out = fastattn.int8_linear(x, w_int8, w_scale, b, backend=kernel)
        if path == "weight_only":
            want = reference.int8_weight_only_linear(x.double(), w_int8, w_scale.double(), b.double())
            lowp = reference.int8_weight_only_linear(x, w_int8, w_scale, b)
        else:
            want = reference.int8_linear(x.double(), w_int8, w_scale.double(), b.double())
            lowp = reference.int8_linear(x, w_int8, w_scale, b)
        assert_close_rule(out, want, lowp, name=f"{path} M={M}")
        other = (reference.int8_linear(x, w_int8, w_scale, b) if path == "weight_only"
                 else reference.int8_weight_only_linear(x, w_int8, w_scale, b))
        assert not torch.equal(out, other)  # the two paths round differently: it took `path`


def _with_outlier_columns(M, K, N, dtype, cols=(3, 17)):
    x, w_int8, w_scale, b = _linear_operands(M, K, N, dtype)
    x = x.float()
    x[:, list(cols)] *= 40.0  # feature columns far above the rest, as LayerNorm outputs have
    return x.to(dtype), w_int8, w_scale, b


def test_int8_linear_outlier_decomposition(kernel):
    """LLM.int8(): columns above the threshold multiply the dequantized weight in float, the rest
    is quantized per token without them; the result is exactly that sum."""
    M, K, N = 40, 64, 24
    for dtype in FLOAT_DTYPES:
        x, w_int8, w_scale, b = _with_outlier_columns(M, K, N, dtype)
        out = fastattn.int8_linear(x, w_int8, w_scale, b, backend=kernel, outlier_threshold=6.0)
        cols = (x.float().abs().amax(0) > 6.0)
        assert cols.sum() == 2
        x_in = x.masked_fill(cols, 0)
        w_deq = w_int8.double() * w_scale.double()[:, None]
        want = (reference.int8_linear(x_in, w_int8, w_scale, b).double()
                + x.double()[:, cols] @ w_deq[:, cols].T)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol * want.abs().max())
        # far closer to the float product than per-token W8A8 without the split
        exact = x.double() @ w_deq.T + b.double()
        plain = fastattn.int8_linear(x, w_int8, w_scale, b, backend=kernel)
        assert sqnr_db(exact, out) > sqnr_db(exact, plain) + 6
    # no column above the threshold: the plain W8A8 result, bit for bit
    x, w_int8, w_scale, b = _linear_operands(M, K, N, torch.float32)
    assert torch.equal(
        fastattn.int8_linear(x, w_int8, w_scale, b, backend=kernel, outlier_threshold=1e9),
        fastattn.int8_linear(x, w_int8, w_scale, b, backend=kernel))
    with pytest.raises(ValueError, match="outlier_threshold must be > 0"):
        fastattn.int8_linear(x, w_int8, w_scale, b, backend=kernel, outlier_threshold=0.0)


def test_int8linear_auto_chooses_per_call(monkeypatch):
    """activations="auto": weight-only up to 16 rows; above, W8A8 with the outlier split on the
    devices listed in AUTO_W8A8_DEVICES (CUDA), weight-only elsewhere (the CPU)."""
    skip_unless_backend("cpu")
    calls = []
    import fastattn.nn.linear as linear_mod

    real_wo, real_w8 = linear_mod.int8_weight_only_linear, linear_mod.int8_linear
    monkeypatch.setattr(linear_mod, "int8_weight_only_linear",
                        lambda *a, **k: calls.append(("weight_only", k["bf16_products"]))
                        or real_wo(*a, **k))
    monkeypatch.setattr(linear_mod, "int8_linear",
                        lambda *a, **k: calls.append(("w8a8", k["outlier_threshold"]))
                        or real_w8(*a, **k))
    q = Int8Linear.from_float(nn.Linear(64, 32), activations="auto")
    with torch.no_grad():
        # the weight-only calls of "auto" ask for bfloat16 products (taken only above 16 rows of
        # float32 x on CPUs that multiply bfloat16 natively: test_int8_weight_only_bf16_products)
        wo = ("weight_only", True)
        for devices, M, want in [((), 1, wo), ((), 17, wo),
                                 (("cpu",), 16, wo), (("cpu",), 17, ("w8a8", 6.0))]:
            monkeypatch.setattr(linear_mod, "AUTO_W8A8_DEVICES", devices)
            calls.clear()
            q(torch.randn(M, 64))
            assert calls == [want], (devices, M, calls)


def test_cpu_isa_reports_the_capped_level(monkeypatch):
    skip_unless_backend("cpu")
    levels = ("portable", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx")
    native = fastattn._C.cpu_isa()
    assert native in levels
    monkeypatch.setenv("FASTATTN_CPU_ISA", "portable")
    assert fastattn._C.cpu_isa() == "portable"


@pytest.mark.parametrize("M", [1, 64])
def test_int8_linear_sqnr_vs_float(M):
    K, N = 512, 384
    lin = nn.Linear(K, N)
    x = torch.randn(M, K)
    ref = lin(x).detach()
    q = Int8Linear.from_float(lin)
    with torch.no_grad():
        out = q(x)
    db = sqnr_db(ref, out)
    assert db >= 30.0, f"SQNR of Int8Linear vs nn.Linear at M={M}: {db:.1f} dB < 30 dB"


# ---------------------------------------------------------------------------------------------
# Int8Linear
# ---------------------------------------------------------------------------------------------
def test_int8linear_state_dict_round_trip(tmp_path):
    lin = nn.Linear(48, 20)
    q = Int8Linear.from_float(lin)
    assert q.weight.dtype == torch.int8 and q.weight_scale.dtype == torch.float32
    assert set(q.state_dict()) == {"weight", "weight_scale", "bias"}
    torch.save(q.state_dict(), tmp_path / "q.pt")
    q2 = Int8Linear(48, 20)
    q2.load_state_dict(torch.load(tmp_path / "q.pt"))
    x = torch.randn(7, 48)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))
    # an nn.Linear checkpoint loads too: the float weight is quantized on the way in
    q3 = Int8Linear(48, 20)
    q3.load_state_dict(lin.state_dict())
    assert torch.equal(q3.weight, q.weight) and torch.equal(q3.weight_scale, q.weight_scale)


def test_int8linear_module_behaviour():
    lin = nn.Linear(32, 16, bias=False)
    q = Int8Linear.from_float(lin)
    assert q.bias is None and "in_features=32, out_features=16, bias=False" in repr(q)
    qb = Int8Linear.from_float(nn.Linear(32, 16)).to(torch.bfloat16)
    assert qb.bias.dtype == torch.bfloat16 and qb.weight_scale.dtype == torch.float32
    assert qb.weight.dtype == torch.int8
    x = torch.randn(2, 9, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert qb(x).dtype == torch.bfloat16 and qb(x).shape == (2, 9, 16)
    with pytest.raises(TypeError, match="nn.Linear"):
        Int8Linear.from_float(nn.Conv1d(3, 3, 1))


def test_backward_raises():
    q = Int8Linear.from_float(nn.Linear(16, 8))
    x = torch.randn(20, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        q(x).sum().backward()
    x1 = torch.randn(1, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        fastattn.int8_weight_only_linear(x1, q.weight, q.weight_scale).sum().backward()


# ---------------------------------------------------------------------------------------------
# opcheck, torch.compile
# ---------------------------------------------------------------------------------------------
def _op_samples():
    a, b = _randint8(17, 33), _randint8(20, 33)
    sa, sb, bias = torch.rand(17), torch.rand(20), torch.randn(20)
    x = torch.randn(3, 33)
    w_scale = torch.rand(20)
    return {
        "quantize_per_token": [(torch.randn(5, 33),), (torch.randn(3, 40, dtype=torch.bfloat16),)],
        "int8_gemm": [(a, b, None, None, None, None), (a, b, sa, sb, bias, torch.bfloat16),
                      (a, b, sa, None, None, None)],
        "int8_weight_only_linear": [(x, b, w_scale, bias), (x.half(), b, w_scale, None)],
        "int8_weight_only_linear_bf16": [(torch.randn(2, 9, 33), b, w_scale, bias),
                                         (x.bfloat16(), b, w_scale, None)],
    }


@pytest.mark.parametrize("name", ["quantize_per_token", "int8_gemm", "int8_weight_only_linear",
                                  "int8_weight_only_linear_bf16"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend, name):
    skip_unless_backend(backend)
    if name == "int8_weight_only_linear_bf16" and backend == "triton":
        pytest.skip("a CPU op: int8_weight_only_linear's bf16_products applies to the CPU only")
    op = getattr(torch.ops.fastattn, name if backend == "cpu" else f"triton_{name}")
    for args in _op_samples()[name]:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    skip_unless_backend("cpu")
    x, w_int8, w_scale, b = _linear_operands(40, 64, 48, torch.float32)

    @torch.compile(fullgraph=True)
    def f(x, w_int8, w_scale, b):
        a, s = fastattn.quantize_per_token(x)
        y = fastattn.int8_gemm(a, w_int8, s, w_scale, b)
        return y + fastattn.int8_linear(x, w_int8, w_scale, b)

    want = 2 * reference.int8_linear(x, w_int8, w_scale, b)
    torch.testing.assert_close(f(x, w_int8, w_scale, b), want, rtol=1e-6, atol=1e-6)
    x1 = x[:2]  # decode-sized, and the weight-only op
    g = torch.compile(lambda *a: fastattn.int8_linear(*a) + fastattn.int8_weight_only_linear(*a),
                      fullgraph=True)
    want1 = (reference.int8_linear(x1, w_int8, w_scale, b)
             + reference.int8_weight_only_linear(x1, w_int8, w_scale, b))
    torch.testing.assert_close(g(x1, w_int8, w_scale, b), want1, rtol=1e-5, atol=1e-5)


def test_torch_compile_triton():
    skip_unless_backend("triton")
    x, w_int8, w_scale, b = _linear_operands(20, 32, 24, torch.float32)
    f = torch.compile(lambda *a: fastattn.int8_linear(*a, backend="triton"), fullgraph=True)
    torch.testing.assert_close(f(x, w_int8, w_scale, b), reference.int8_linear(x, w_int8, w_scale, b),
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# bad input, fallback, dispatch
# ---------------------------------------------------------------------------------------------
def test_bad_input():
    a, b = _randint8(4, 8), _randint8(5, 8)
    with pytest.raises(TypeError, match="a must be an int8"):
        fastattn.int8_gemm(a.float(), b)
    with pytest.raises(TypeError, match="b must be an int8"):
        fastattn.int8_gemm(a, b.to(torch.int16))
    with pytest.raises(ValueError, match=r"a.shape\[1\] \(8\) must equal b.shape\[1\] \(7\)"):
        fastattn.int8_gemm(a, _randint8(5, 7))
    with pytest.raises(ValueError, match="a must be 2-D"):
        fastattn.int8_gemm(a[None], b)
    with pytest.raises(ValueError, match=r"a_scale must have shape \(4,\)"):
        fastattn.int8_gemm(a, b, torch.ones(5), torch.ones(5))
    with pytest.raises(ValueError, match=r"b_scale must have shape \(5,\)"):
        fastattn.int8_gemm(a, b, torch.ones(4), torch.ones(5, 1))
    with pytest.raises(TypeError, match="b_scale must be a floating-point"):
        fastattn.int8_gemm(a, b, torch.ones(4), torch.ones(5, dtype=torch.int32))
    with pytest.raises(ValueError, match="a_scale has non-finite"):
        fastattn.int8_gemm(a, b, torch.tensor([1.0, float("nan"), 1.0, 1.0]), torch.ones(5))
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        fastattn.int8_gemm(a, b, torch.ones(4), torch.ones(5), torch.ones(4))
    with pytest.raises(ValueError, match="bias needs a_scale"):
        fastattn.int8_gemm(a, b, bias=torch.ones(5))
    with pytest.raises(TypeError, match="out_dtype must be"):
        fastattn.int8_gemm(a, b, torch.ones(4), torch.ones(5), out_dtype=torch.int8)
    with pytest.raises(TypeError, match="without scales the result is int32"):
        fastattn.int8_gemm(a, b, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastattn.int8_gemm(a, b, backend="fast")
    x = torch.randn(3, 8)
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        fastattn.quantize_per_token(x.int())
    with pytest.raises(ValueError, match="w must be 2-D"):
        fastattn.quantize_per_channel(torch.randn(8))
    with pytest.raises(ValueError, match=r"x.shape\[-1\] \(8\) must equal w_int8.shape\[1\] \(7\)"):
        fastattn.int8_linear(x, _randint8(5, 7), torch.ones(5))
    with pytest.raises(TypeError, match="w_int8 must be an int8"):
        fastattn.int8_linear(x, torch.randn(5, 8), torch.ones(5))
    with pytest.raises(ValueError, match=r"w_scale must have shape \(5,\)"):
        fastattn.int8_linear(x, b, torch.ones(8))
    with pytest.raises(ValueError, match="w_scale has non-finite"):
        fastattn.int8_linear(x, b, torch.tensor([1.0, 1.0, float("inf"), 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        fastattn.int8_linear(x, b, torch.ones(5), torch.ones(3))


def test_cpp_op_checks():
    skip_unless_backend("cpu")
    a, b = _randint8(4, 8), _randint8(5, 8)
    with pytest.raises(RuntimeError, match="int8_gemm: a must be int8"):
        torch.ops.fastattn.int8_gemm(a.float(), b, None, None, None, None)
    with pytest.raises(RuntimeError, match="must equal b.shape"):
        torch.ops.fastattn.int8_gemm(a, _randint8(5, 9), None, None, None, None)
    with pytest.raises(RuntimeError, match=r"b_scale must have shape \(5,\)"):
        torch.ops.fastattn.int8_gemm(a, b, torch.ones(4), torch.ones(4), None, None)
    with pytest.raises(RuntimeError, match="out_dtype must be float32"):
        torch.ops.fastattn.int8_gemm(a, b, torch.ones(4), None, None, torch.int8)
    with pytest.raises(RuntimeError, match="quantize_per_token: x must be float32"):
        torch.ops.fastattn.quantize_per_token(torch.ones(2, 3, dtype=torch.float64))
    # the weight-only op takes the public function's arguments and rules (csrc/checks.cpp)
    with pytest.raises(TypeError, match="int8_weight_only_linear: w_int8 must be an int8 tensor"):
        torch.ops.fastattn.int8_weight_only_linear(torch.randn(2, 8), b.float(), torch.ones(5), None)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] \(9\) must equal w_int8.shape\[1\]"):
        torch.ops.fastattn.int8_weight_only_linear(torch.randn(2, 3, 9), b, torch.ones(5), None)


def test_isa_env_is_checked(monkeypatch):
    skip_unless_backend("cpu")
    monkeypatch.setenv("FASTATTN_CPU_ISA", "avx9000")
    with pytest.raises(RuntimeError, match="FASTATTN_CPU_ISA must be one of portable, avx2, avx512, "
                                           "avx512_vnni, avx512_bf16, amx"):
        fastattn.int8_gemm(_randint8(2, 4), _randint8(2, 4), backend="cpu")


def test_float64_falls_back_to_reference():
    x, w_int8, w_scale, b = _linear_operands(20, 16, 8, torch.float64)
    with pytest.warns(UserWarning, match="pure-PyTorch reference"):
        out = fastattn.int8_linear(x, w_int8, w_scale, b)
    assert out.dtype == torch.float64
    assert torch.equal(out, reference.int8_linear(x, w_int8, w_scale, b))
    skip_unless_backend("cpu")
    with pytest.raises(RuntimeError, match="backend='cpu' cannot run this call"):
        fastattn.int8_linear(x, w_int8, w_scale, b, backend="cpu")


def test_backends_report_int8_ops():
    auto = fastattn.backends()["auto"]
    for op in ("quantize_per_token", "int8_gemm", "int8_linear", "int8_weight_only_linear"):
        assert op in auto


# ---------------------------------------------------------------------------------------------
# SmoothQuant
# ---------------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, K, N, dtype=torch.float32):
        super().__init__()
        self.ln = nn.LayerNorm(K, dtype=dtype)
        self.q = nn.Linear(K, N, dtype=dtype)
        self.k = nn.Linear(K, N, dtype=dtype)

    def forward(self, x):
        h = self.ln(x)
        return self.q(h) + 2 * self.k(h)


def _outlier_block(K=256, N=128, dtype=torch.float32) -> _Block:
    blk = _Block(K, N, dtype)
    with torch.no_grad():
        # a few LayerNorm channels with 30-60x gain: the activation outliers of LLMs
        blk.ln.weight.copy_(1 + 0.1 * torch.randn(K))
        blk.ln.weight[[3, 70, 200]] = torch.tensor([40.0, -60.0, 30.0], dtype=dtype)
        blk.ln.bias.copy_(0.1 * torch.randn(K))
    return blk.eval()


def test_collect_act_scales():
    blk = _outlier_block()
    batches = [torch.randn(4, 256), (torch.randn(3, 5, 256),), {"x": torch.randn(2, 256)}]
    scales = collect_act_scales(blk, batches)
    assert set(scales) == {"q", "k"}
    with torch.no_grad():
        want = torch.stack([blk.ln(b if isinstance(b, torch.Tensor) else (b[0] if isinstance(b, tuple) else b["x"]))
                            .reshape(-1, 256).abs().amax(0) for b in batches]).amax(0)
    torch.testing.assert_close(scales["q"], want)
    assert torch.equal(scales["q"], scales["k"])
    only_k = collect_act_scales(blk, batches[:1], filter_fn=lambda m, name: name == "k")
    assert set(only_k) == {"k"}
    assert not blk.q._forward_pre_hooks  # hooks removed


def test_smoothing_keeps_float_function():
    blk = _outlier_block(dtype=torch.float64)
    x = torch.randn(16, 256, dtype=torch.float64)
    with torch.no_grad():
        before = blk(x)
        scales = collect_act_scales(blk, [x])
        s = smooth_layer_norm_linear(blk.ln, [blk.q, blk.k], scales["q"], alpha=0.5)
        after = blk(x)
    assert s.shape == (256,) and torch.all(s > 0)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)


def test_smoothing_improves_int8_sqnr():
    blk = _outlier_block()
    calib = [torch.randn(64, 256) for _ in range(4)]
    x = torch.randn(96, 256)

    def int8_error_db(b: _Block) -> float:
        with torch.no_grad():
            h = b.ln(x)
            ref = b.q(h)
            out = Int8Linear.from_float(b.q)(h)
        return sqnr_db(ref, out)

    before = int8_error_db(blk)
    scales = collect_act_scales(blk, calib)
    smooth_layer_norm_linear(blk.ln, [blk.q, blk.k], scales["q"], alpha=0.5)
    after = int8_error_db(blk)
    assert after > before + 6.0, f"SQNR {before:.1f} dB -> {after:.1f} dB after smoothing"


def test_smoothing_bad_input():
    blk = _outlier_block()
    with pytest.raises(ValueError, match="in_features == 256"):
        smooth_layer_norm_linear(blk.ln, [nn.Linear(10, 3)], torch.ones(256))
    with pytest.raises(ValueError, match=r"act_scales must be a \(256,\)"):
        smooth_layer_norm_linear(blk.ln, blk.q, torch.ones(10))
    with pytest.raises(ValueError, match="alpha must be in"):
        smooth_layer_norm_linear(blk.ln, blk.q, torch.ones(256), alpha=2.0)
    with pytest.raises(ValueError, match="affine weight"):
        smooth_layer_norm_linear(nn.LayerNorm(256, elementwise_affine=False), blk.q, torch.ones(256))


# ---------------------------------------------------------------------------------------------
# GPU (skipped without a CUDA device): the Triton kernels compiled, at real sizes
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N", [(1, 4096, 4096), (16, 4096, 11008), (1024, 4096, 4096), (333, 1000, 777)])
def test_gpu_triton_int8(M, K, N):
    skip_unless_backend("triton", "cuda")
    dev = "cuda"
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, device=dev)
    b = torch.randint(-128, 128, (N, K), dtype=torch.int8, device=dev)
    acc = fastattn.int8_gemm(a, b, backend="triton")
    assert torch.equal(acc.cpu(), reference.int8_gemm(a.cpu(), b.cpu()))
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16) * 3
    _assert_same_quantization(fastattn.quantize_per_token(x, backend="triton"),
                              reference.quantize_per_token(x))
    w_int8, w_scale = fastattn.quantize_per_channel(torch.randn(N, K, device=dev) / 64, backend="triton")
    bias = torch.randn(N, device=dev, dtype=torch.bfloat16)
    out = fastattn.int8_linear(x, w_int8, w_scale, bias, backend="triton")
    ref = reference.int8_linear(x.float(), w_int8, w_scale, bias.float())
    assert out.dtype == torch.bfloat16
    assert_close_rule(out, ref, reference.int8_linear(x, w_int8, w_scale, bias))
    wo = fastattn.int8_weight_only_linear(x[:4], w_int8, w_scale, bias, backend="triton")
    ref_wo = reference.int8_weight_only_linear(x[:4].double(), w_int8, w_scale.double(), bias.double())
    assert_close_rule(wo, ref_wo, F.linear(x[:4], (w_int8.float() * w_scale[:, None]).bfloat16(), bias))
