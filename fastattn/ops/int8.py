"""int8 op layer: validation, backend choice, torch.library registration (fake tensors and the
inference-only autograd guard) of the C++ ops and of the Triton custom ops, and the public
functions quantize_per_token, quantize_per_channel, int8_gemm, int8_weight_only_linear and
int8_linear.

Quantization is symmetric: q = clamp(round_half_even(x * 127 / absmax), -127, 127) per row, with
the exact float32 contract of ``fastattn.reference.quantize_per_token`` that every backend
reproduces bit for bit. The int8 GEMM is exact (int32); its dequantizing epilogue follows the
reference's order of float32 operations.

These are inference ops: an int8 operand has no gradient, and a backward through
quantize_per_token, int8_gemm, int8_weight_only_linear or int8_linear raises (instead of silently
returning no gradient). Use ``torch.no_grad()``/``torch.inference_mode()`` around int8 models.
"""

from __future__ import annotations

import math

import torch

from fastattn import reference
from fastattn.ops import _backend

# int8_linear takes the weight-only path (float activations times int8 weights dequantized on
# the fly) for M <= this many rows, and W8A8 (per-token quantization + int8 GEMM) above.
# cpu: never. Measured on 2 Sapphire Rapids cores, one thread, K = N = 4096 and K = 768,
#   N = 3072: even at M = 1 W8A8 is 1.3-1.4x faster (quantizing one row costs ~40 us; the int8
#   GEMM's dot-product kernel streams the weight at 64 MACs per VNNI instruction, while the
#   weight-only kernel spends two conversions per 16 weights before each float32 FMA), and the gap
#   widens with M (AMX tiles). The weight-only op stays available as int8_weight_only_linear.
# cuda: both paths read the int8 weight once and are bandwidth-bound while M is within one 16-row
#   tensor-core tile; weight-only saves the quantization launch there. Not measured on a GPU yet.
WEIGHT_ONLY_MAX_M = {"cpu": 0, "cuda": 16}

_backend.register_op("quantize_per_token", "quantize_per_token")
_backend.register_op("quantize_per_channel", "quantize_per_token")
_backend.register_op("int8_gemm", "int8_gemm")
_backend.register_op("int8_weight_only_linear", "int8_weight_only_linear")
_backend.register_op("int8_linear", "int8_gemm")


# ---------------------------------------------------------------------------------------------
# argument checking
# ---------------------------------------------------------------------------------------------
def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_float(name: str, t, allow_float64: bool = True) -> None:
    _check_tensor(name, t)
    ok = _backend.FLOAT_DTYPES + ((torch.float64,) if allow_float64 else ())
    if t.dtype not in ok:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def _check_int8_matrix(name: str, t) -> None:
    _check_tensor(name, t)
    if t.dtype != torch.int8:
        raise TypeError(f"{name} must be an int8 tensor, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def _check_vector(name: str, t, n: int, device: torch.device, what: str) -> None:
    if t is None:
        return
    _check_tensor(name, t)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) ({what}), got {tuple(t.shape)}")
    if t.device != device:
        raise RuntimeError(f"{name} must be on {device}, got {t.device}")


def _check_finite(name: str, t: torch.Tensor | None) -> None:
    """Non-finite scales turn whole rows/columns into NaN. Checked for CPU tensors only (a GPU
    check would synchronise the host) and not while torch.compile traces."""
    if t is None or t.device.type != "cpu" or torch.compiler.is_compiling():
        return
    # one reduction (a float64 sum cannot overflow on float32 scales; inf/NaN propagate): ~3 us,
    # against ~20 us for isfinite().all() (~7% of a decode-sized 4096 x 4096 int8 linear)
    if not math.isfinite(float(t.detach().sum(dtype=torch.float64))):
        raise ValueError(f"{name} has non-finite values")


def _check_same_device(**tensors) -> torch.device:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    device = items[0][1].device
    for k, v in items[1:]:
        if v.device != device:
            raise RuntimeError(f"{k} must be on {device} like {items[0][0]}, got {v.device}")
    return device


def _supports(backend: str, device: torch.device, key: tuple) -> str | None:
    """key = (the float dtype the kernels must handle: x's, or the GEMM's out_dtype; None for
    int32,)."""
    (dtype,) = key
    return None if dtype is None or dtype in _backend.FLOAT_DTYPES else f"dtype {dtype}"


def _choose(op: str, device: torch.device, backend: str, dtype: torch.dtype | None) -> str:
    return _backend.pick(op, device, backend, (dtype,), _supports)


def _flatten_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (M, K) without a copy when possible."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


# ---------------------------------------------------------------------------------------------
# Triton custom ops (the launchers live in fastattn/triton/int8_gemm.py)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastattn::triton_quantize_per_token", mutates_args=())
def triton_quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from fastattn.triton.int8_gemm import quantize_per_token as launch

    return launch(x)


@torch.library.custom_op("fastattn::triton_int8_gemm", mutates_args=())
def triton_int8_gemm(
    a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor | None, b_scale: torch.Tensor | None,
    bias: torch.Tensor | None, out_dtype: torch.dtype | None,
) -> torch.Tensor:
    from fastattn.triton.int8_gemm import int8_gemm as launch

    return launch(a, b, a_scale, b_scale, bias, out_dtype)


@torch.library.custom_op("fastattn::triton_int8_weight_only_linear", mutates_args=())
def triton_int8_weight_only_linear(
    x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
) -> torch.Tensor:
    from fastattn.triton.int8_gemm import int8_weight_only_linear as launch

    out = launch(_flatten_rows(x), w_int8, w_scale, bias)  # (M, N)
    return out.view(*x.shape[:-1], w_int8.shape[0])


# ---------------------------------------------------------------------------------------------
# fake tensors and the autograd guard, shared by the C++ ops and the Triton custom ops
# ---------------------------------------------------------------------------------------------
def _quantize_fake(x):
    M, K = x.shape
    return x.new_empty((M, K), dtype=torch.int8), x.new_empty((M,), dtype=torch.float32)


def _gemm_fake(a, b, a_scale, b_scale, bias, out_dtype):
    dequant = a_scale is not None or b_scale is not None
    dtype = (out_dtype or torch.float32) if dequant else torch.int32
    return a.new_empty((a.shape[0], b.shape[0]), dtype=dtype)


def _weight_only_fake(x, w_int8, w_scale, bias):
    _check_linear_args("int8_weight_only_linear", x, w_int8, w_scale, bias)
    return x.new_empty((*x.shape[:-1], w_int8.shape[0]))


def _inference_only(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"fastattn.{name} is inference-only: int8 quantization has no gradient. Run the int8 "
            "model under torch.no_grad() / torch.inference_mode(), or train the float model.")

    return backward


def _no_context(ctx, inputs, output) -> None:
    return None


_backend.register_family(
    fakes={"quantize_per_token": _quantize_fake, "int8_gemm": _gemm_fake,
           "int8_weight_only_linear": _weight_only_fake,
           "int8_weight_only_linear_bf16": _weight_only_fake},
    autograd={name: (_inference_only(name), _no_context)
              for name in ("quantize_per_token", "int8_gemm", "int8_weight_only_linear")},
    triton_ops=("quantize_per_token", "int8_gemm", "int8_weight_only_linear"))


def _op(chosen: str, name: str):
    return getattr(torch.ops.fastattn, f"triton_{name}" if chosen == "triton" else name)


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------
def _quantize_rows(op_name: str, x: torch.Tensor, backend: str):
    chosen = _choose(op_name, x.device, backend, x.dtype)
    x2 = _flatten_rows(x)  # (M, K)
    if chosen == "reference":
        q, scale = reference.quantize_per_token(x2)
    else:
        q, scale = _op(chosen, "quantize_per_token")(x2)
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


def quantize_per_token(x: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of each row (token) of x.

    Args:
        x: (..., K) float16/bfloat16/float32 (float64 runs on the reference).
        backend: "auto" | "triton" | "cuda" | "cpu" | "reference".

    Per row: absmax = max|x| in float32, scale = absmax / 127,
    q = clamp(round_half_even(x * (127 / absmax)), -127, 127); rows of zeros give q = 0, scale 0.
    Bit-exact with ``fastattn.reference.quantize_per_token`` on every backend. Rows holding NaN
    get a NaN scale and q = 0; inf gives an inf scale.

    Returns:
        (x_int8 (..., K) int8, scale (...) float32), x ~= x_int8 * scale[..., None].
    """
    _check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., K)")
    return _quantize_rows("quantize_per_token", x, backend)


def quantize_per_channel(w: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of each output channel (row) of a weight.

    Args:
        w: (N, K) float16/bfloat16/float32, the nn.Linear weight layout.

    Returns:
        (w_int8 (N, K) int8, scale (N,) float32), w ~= w_int8 * scale[:, None].
    """
    _check_float("w", w)
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (N, K), got shape {tuple(w.shape)}")
    return _quantize_rows("quantize_per_channel", w, backend)


def int8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """int8 matrix product a @ b.T with an optional fused dequantizing epilogue.

    Args:
        a: int8 (M, K).
        b: int8 (N, K), the nn.Linear weight layout.
        a_scale: float (M,) per-row scale of a, or None.
        b_scale: float (N,) per-column scale of the output (per-row of b), or None.
        bias: float (N,), only with a scale.
        out_dtype: the dequantized output dtype, float32 (default), float16 or bfloat16
            (float64 runs on the reference); None or torch.int32 without scales.
        backend: "auto" | "triton" | "cuda" | "cpu" | "reference".

    Non-finite scales raise for CPU tensors; on GPU they are not checked (that would
    synchronise) and give NaN in the affected rows/columns.

    Returns:
        Without scales the exact int32 accumulator (M, N) (wrapping like int32 if K * 127^2
        overflows it); else (acc * a_scale[:, None] * b_scale[None, :] + bias) computed in float32
        and cast to out_dtype.
    """
    _check_int8_matrix("a", a)
    _check_int8_matrix("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a.shape[1] ({a.shape[1]}) must equal b.shape[1] ({b.shape[1]}): "
                         "a is (M, K) and b is (N, K)")
    M, N = a.shape[0], b.shape[0]
    device = _check_same_device(a=a, b=b)
    _check_vector("a_scale", a_scale, M, device, "one scale per row of a")
    _check_vector("b_scale", b_scale, N, device, "one scale per row of b")
    _check_vector("bias", bias, N, device, "one value per output column")
    dequant = a_scale is not None or b_scale is not None
    if dequant:
        if out_dtype is None:
            out_dtype = torch.float32
        if out_dtype not in _backend.FLOAT_DTYPES + (torch.float64,):
            raise TypeError(f"out_dtype must be torch.float32, torch.float16 or torch.bfloat16, "
                            f"got {out_dtype}")
    else:
        if bias is not None:
            raise ValueError("bias needs a_scale and/or b_scale: without scales int8_gemm "
                             "returns the raw int32 accumulator")
        if out_dtype not in (None, torch.int32):
            raise TypeError(f"without scales the result is int32: out_dtype must be None or "
                            f"torch.int32, got {out_dtype}")
        out_dtype = None
    _check_finite("a_scale", a_scale)
    _check_finite("b_scale", b_scale)
    chosen = _choose("int8_gemm", device, backend, out_dtype)
    if chosen == "reference":
        return reference.int8_gemm(a, b, a_scale, b_scale, bias, out_dtype)
    return _op(chosen, "int8_gemm")(a, b, a_scale, b_scale, bias, out_dtype)


def _check_linear_args(fn: str, x, w_int8, w_scale, bias) -> None:
    """The argument rules of int8_linear / int8_weight_only_linear (csrc/checks.cpp, shared with
    the kernels). Without the extension there are no kernels but the reference, which raises
    PyTorch's own errors. While torch.compile traces, the op's fake function runs them."""
    if _backend.NATIVE is not None and not torch.compiler.is_compiling():
        _backend.NATIVE.check_int8_linear(f"fastattn.{fn}", x, w_int8, w_scale, bias)


def _weight_only(x, w_int8, w_scale, bias, backend: str, bf16_products: bool = False):
    chosen = _choose("int8_weight_only_linear", x.device, backend, x.dtype)
    if bf16_products and chosen == "cpu":
        return torch.ops.fastattn.int8_weight_only_linear_bf16(x, w_int8, w_scale, bias)
    if chosen != "reference":
        return _op(chosen, "int8_weight_only_linear")(x, w_int8, w_scale, bias)
    out = reference.int8_weight_only_linear(_flatten_rows(x), w_int8, w_scale, bias)
    return out.reshape(*x.shape[:-1], w_int8.shape[0])


def int8_weight_only_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    bf16_products: bool = False,
) -> torch.Tensor:
    """Weight-only int8 linear: x (..., K) float times int8 weights dequantized on the fly.

    Args:
        x: (..., K) float16/bfloat16/float32.
        w_int8: int8 (N, K); w_scale: float (N,); bias: float (N,) or None.
        bf16_products: on the CPU backend, float32 x of 16 rows or more is rounded to bfloat16
            for the products where the CPU multiplies bfloat16 natively (AMX-BF16 or
            AVX512-BF16), at the speed of a bfloat16 GEMM (about 2x float32's on AVX512-BF16),
            still accumulated and returned in float32. The int8 weights are exact in bfloat16, so
            the only change is x's rounding (relative 2^-9), below the weights' own quantization
            error. Every other call (other dtypes, fewer rows, other CPUs, other backends) is
            computed exactly as without it. What ``fastattn.nn.Int8Linear(activations="auto")``
            runs on the CPU above 16 rows.

    Returns:
        (x @ (w_int8 * w_scale[:, None]).T + bias) (..., N) in x's dtype, float32 accumulation.
    """
    if not bf16_products and _backend.fast_path(backend):
        out = _backend.NATIVE.int8_weight_only_linear(x, w_int8, w_scale, bias)
        if out is not None:
            return out
    _backend.check_backend(backend)
    _check_linear_args("int8_weight_only_linear", x, w_int8, w_scale, bias)
    return _weight_only(x, w_int8, w_scale, bias, backend, bf16_products)


def int8_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    outlier_threshold: float | None = None,
) -> torch.Tensor:
    """W8A8 int8 linear layer: quantize x per token, int8 GEMM, dequantize (+ bias) in one epilogue.

    Args:
        x: (..., K) float16/bfloat16/float32 (float64 runs on the reference).
        w_int8: int8 (N, K) from ``quantize_per_channel(weight)``.
        w_scale: float (N,) per-output-channel scale.
        bias: float (N,) or None.
        backend: "auto" | "triton" | "cuda" | "cpu" | "reference".
        outlier_threshold: LLM.int8()'s mixed-precision decomposition (Dettmers et al., 2022;
            bitsandbytes' ``threshold``): the columns k of x with max |x[:, k]| above it stay in
            float and multiply the dequantized weight columns; the other columns are quantized
            per token without them (an outlier feature would otherwise set every token's scale
            and wash out the rest). None: no decomposition. Eager only: under torch.compile
            (data-dependent column count) a call with a threshold takes the weight-only path.

    When x has at most ``WEIGHT_ONLY_MAX_M[device type]`` rows (decoding), the weight-only path
    is taken instead, on every backend alike: x stays in float and multiplies the dequantized int8
    weight, which is faster there (see WEIGHT_ONLY_MAX_M) and slightly more accurate.

    Inference-only: a backward through it raises.

    Returns:
        (..., N) in x's dtype.
    """
    _backend.check_backend(backend)
    _check_linear_args("int8_linear", x, w_int8, w_scale, bias)
    device = x.device
    M = math.prod(x.shape[:-1])
    if M <= WEIGHT_ONLY_MAX_M.get(device.type, 0):
        return _weight_only(x, w_int8, w_scale, bias, backend)
    if outlier_threshold is not None:
        if not outlier_threshold > 0:
            raise ValueError("fastattn.int8_linear: outlier_threshold must be > 0 or None, got "
                             f"{outlier_threshold!r}")
        if torch.compiler.is_compiling():
            return _weight_only(x, w_int8, w_scale, bias, backend)
    chosen = _choose("int8_linear", device, backend, x.dtype)
    x2 = _flatten_rows(x)  # (M, K)
    outliers = None
    if outlier_threshold is not None:
        x2, outliers = _split_outliers(x2, w_int8, w_scale, outlier_threshold)
    if chosen == "reference":
        out = reference.int8_linear(x2, w_int8, w_scale, bias)
    else:
        q, scale = _op(chosen, "quantize_per_token")(x2)
        out = _op(chosen, "int8_gemm")(q, w_int8, scale, w_scale, bias, x.dtype)
    if outliers is not None:
        x_cols, w_cols = outliers
        out = out.addmm_(x_cols.to(out.dtype), w_cols.T.to(out.dtype))  # += x_cols @ w_cols.T
    return out.reshape(*x.shape[:-1], w_int8.shape[0])


def _split_outliers(x2, w_int8, w_scale, threshold: float):
    """(x2 with its outlier columns zeroed, (x2's outlier columns (M, c), the dequantized weight
    columns (N, c)) or None)."""
    lo, hi = torch.aminmax(x2, dim=0)  # one pass over x
    cols = ((hi > threshold) | (lo < -threshold)).nonzero().flatten()  # (c,) one host sync
    if cols.numel() == 0:
        return x2, None
    acc = torch.promote_types(x2.dtype, torch.float32)
    w_cols = w_int8.index_select(1, cols).to(acc) * w_scale.to(acc)[:, None]  # (N, c)
    return x2.index_fill(1, cols, 0), (x2.index_select(1, cols), w_cols)

