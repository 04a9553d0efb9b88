"""Linear op layer for decoding: validation, backend choice, torch.library registration (fake
tensors + autograd) of the C++ op ``fastattn::linear``, and the public function.

``fastattn.linear(x, weight, bias)`` computes exactly ``F.linear`` (float32 accumulation, one
rounding to x's dtype). Its CPU kernel is for decoding: with few rows of x (M <= 16) the GEMM is a
pass over the weight, and the kernel streams it at the memory's speed (rows of the weight
prefetched ahead, one pass per call) where oneDNN's GEMM for M = 1 reaches about half of it on
the 2-core machines measured (``python -m fastattn.bench --op linear``). More rows run a GEMM
inside the same op: oneDNN's matmul (bundled with PyTorch) for float32 on CPUs other than Intel's,
where MKL's sgemm behind ``at::linear`` does not take its AVX-512 path (1.26-2.0x faster on a
2-core AMD EPYC, Zen 4), ``at::linear`` otherwise; ``FASTATTN_CPU_GEMM=aten|onednn`` overrides. There is no CUDA or Triton kernel: cuBLAS' GEMV is at memory
speed already, so other devices run the reference (``F.linear``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastattn.ops import _backend

_backend.register_op("linear", "linear", auto_order={"cpu": ("cpu",), "cuda": ()})

_FN = "fastattn.linear"


def _check(x, weight, bias) -> None:
    """The argument rules (csrc/checks.cpp: check_linear). While torch.compile traces, or
    without the extension, the same rules in Python."""
    if _backend.NATIVE is not None and not torch.compiler.is_compiling():
        _backend.NATIVE.check_linear(x, weight, bias)
        return
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_FN}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in _backend.FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"{_FN}: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{_FN}: x must have at least one dimension (..., K)")
    if weight.dtype != x.dtype:
        raise TypeError(f"{_FN}: weight must have x's dtype ({x.dtype}), got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{_FN}: weight must be 2-D (N, K), got shape {list(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{_FN}: x.shape[-1] ({x.shape[-1]}) must equal weight.shape[1] "
                         f"({weight.shape[1]}): weight is (N, K)")
    if weight.device != x.device:
        raise RuntimeError(f"{_FN}: weight must be on the same device as x ({x.device}), got "
                           f"{weight.device}")
    if bias is not None:
        if bias.dtype != x.dtype:
            raise TypeError(f"{_FN}: bias must have x's dtype ({x.dtype}), got {bias.dtype}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{_FN}: bias must be 1-D of size {weight.shape[0]} (one value per "
                             f"output channel), got shape {list(bias.shape)}")
        if bias.device != x.device:
            raise RuntimeError(f"{_FN}: bias must be on the same device as x ({x.device}), got "
                               f"{bias.device}")


def _supports(backend: str, device: torch.device, key: tuple) -> str | None:
    (dtype,) = key
    if dtype not in _backend.FLOAT_DTYPES:
        return f"x dtype {dtype}"
    if backend in ("cuda", "triton"):
        return f"fastattn has no {backend} kernel for linear (cuBLAS' GEMV is at memory speed)"
    return None


def _fake(x, weight, bias):
    _check(x, weight, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = grad @ weight if ctx.needs_input_grad[0] else None
    g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    grad_w = g2.t() @ x2 if ctx.needs_input_grad[1] else None
    grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b


if _backend._load_extension()[0]:
    torch.library.register_fake("fastattn::linear")(_fake)
    torch.library.register_autograd("fastattn::linear", _backward, setup_context=_setup_context)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           backend: str = "auto") -> torch.Tensor:
    """``F.linear`` with a CPU kernel for decoding (few rows of x: the weight streamed at the
    memory's speed).

    Args:
        x: (..., K) float16/bfloat16/float32 (float64 runs on the reference).
        weight: (N, K) of x's dtype and device (nn.Linear's layout); bias: (N,) or None.
        backend: "auto" | "cpu" | "reference" (no CUDA or Triton kernel: "auto" runs the
            reference, i.e. F.linear / cuBLAS, on other devices).

    Returns:
        (..., N) in x's dtype: x @ weight.T + bias accumulated in float32, rounded once.
        Differentiable with respect to x, weight and bias.
    """
    if _backend.fast_path(backend):
        out = _backend.NATIVE.linear(x, weight, bias)
        if out is not None:
            return out
    _backend.check_backend(backend)
    _check(x, weight, bias)
    chosen = _backend.pick("linear", x.device, backend, (x.dtype,), _supports)
    if chosen == "reference":
        return F.linear(x, weight, bias)
    return torch.ops.fastattn.linear(x, weight, bias)
