"""LayerNorm / RMSNorm op layer: validation, reshaping to rows, backend choice, torch.library
registration (fake tensors + autograd) of the C++ ops and of the Triton custom ops.

Every backend computes the same thing on an (M, N) view of the input (csrc/fastattn.cpp has the
contract): N = prod(normalized_shape) contiguous elements per row, rows any stride apart,
statistics in float32, and with ``residual=`` the sum ``input + residual`` rounded to the input
dtype is both returned and normalised.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch

from fastattn import reference
from fastattn.ops import _backend

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_backend.register_op("layer_norm", "layer_norm_fwd")
_backend.register_op("rms_norm", "layer_norm_fwd")


# ---------------------------------------------------------------------------------------------
# argument checking and normalisation
# ---------------------------------------------------------------------------------------------
def _normalized_shape(fn: str, input, normalized_shape) -> tuple[int, ...]:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{fn}: input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{fn}: input must be a floating-point tensor, got {input.dtype}")
    if type(normalized_shape) is int:  # the common case, checked first: this runs every call
        shape = (normalized_shape,)
    elif isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        shape = (int(normalized_shape),)
    elif isinstance(normalized_shape, (tuple, list, torch.Size)) and all(
            isinstance(s, (numbers.Integral, torch.SymInt)) and not isinstance(s, bool)
            for s in normalized_shape):
        shape = tuple(normalized_shape)
    else:
        raise TypeError(f"{fn}: normalized_shape must be an int or a sequence of ints, "
                        f"got {normalized_shape!r}")
    if len(shape) == 0:
        raise ValueError(f"{fn}: normalized_shape must have at least one dimension")
    if len(shape) > input.dim() or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(f"{fn}: normalized_shape={list(shape)} must match the trailing "
                         f"dimensions of input, got input of shape {tuple(input.shape)}")
    return shape


def _check_param(fn: str, name: str, t, input: torch.Tensor, shape: tuple[int, ...]) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{fn}: {name} must have shape normalized_shape={list(shape)}, "
                         f"got {tuple(t.shape)}")
    if t.device != input.device:
        raise RuntimeError(f"{fn}: {name} must be on the same device as input ({input.device}), "
                           f"got {t.device}")


def _check_residual(fn: str, residual, input: torch.Tensor) -> None:
    if residual is None:
        return
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{fn}: residual must be a torch.Tensor or None, "
                        f"got {type(residual).__name__}")
    if residual.shape != input.shape:
        raise ValueError(f"{fn}: residual must have input's shape {tuple(input.shape)}, "
                         f"got {tuple(residual.shape)}")
    if residual.dtype != input.dtype:
        raise TypeError(f"{fn}: residual must have input's dtype ({input.dtype}), "
                        f"got {residual.dtype}")
    if residual.device != input.device:
        raise RuntimeError(f"{fn}: residual must be on the same device as input "
                           f"({input.device}), got {residual.device}")


def _check_eps(fn: str, eps) -> float:
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool):
        raise TypeError(f"{fn}: eps must be a float, got {eps!r}")
    eps = float(eps)
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"{fn}: eps must be finite and >= 0, got {eps}")
    return eps


def _as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(..., *normalized_shape) -> (M, N) with unit column stride: a view whenever each row's N
    elements are contiguous and the rows evenly spaced (any row stride), otherwise a copy."""
    rows = t.reshape(-1, n)  # (M, N)
    if n > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def _supports(backend: str, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """None when ``backend``'s kernels handle input/weight/bias of these dtypes, else why not."""
    for name, dtype in zip(("input", "weight", "bias"), dtypes, strict=True):
        if dtype is not None and dtype not in _FLOAT_DTYPES:
            return f"{name} dtype {dtype}"
    if backend == "triton" and device.type == "cuda" and torch.bfloat16 in dtypes:
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"bfloat16 needs compute capability >= 8.0, got {major}.{minor}"
    return None


@torch.compiler.assume_constant_result
def _choose(fn: str, device: torch.device, backend: str,
            dtypes: tuple[torch.dtype | None, ...]) -> str:
    """The backend of one call. It depends only on these static properties, so torch.compile
    runs it once while tracing (it imports modules and reads dispatcher tables, which dynamo
    cannot trace) and keeps the answer as a constant."""
    return _choose_cached(fn, device, backend, dtypes, _backend.triton_interpret())


@functools.lru_cache(maxsize=256)
def _choose_cached(fn, device, backend, dtypes, interpret) -> str:
    # a norm is often a few microseconds of work: asking the dispatcher every call cost ~10 us
    return _backend.choose(fn, device, backend, lambda b: _supports(b, device, dtypes),
                           cpp_op="layer_norm_fwd")


# ---------------------------------------------------------------------------------------------
# Triton custom ops (the launchers live in fastattn/triton/layer_norm.py)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastattn::triton_layer_norm_fwd", mutates_args=())
def triton_layer_norm_fwd(
    input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    residual: torch.Tensor | None, eps: float, rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastattn.triton.layer_norm import layer_norm_fwd

    return layer_norm_fwd(input, weight, bias, residual, eps, rms)


@torch.library.custom_op("fastattn::triton_layer_norm_bwd", mutates_args=())
def triton_layer_norm_bwd(
    grad_out: torch.Tensor, grad_residual_out: torch.Tensor | None, x: torch.Tensor,
    weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor,
    rstd: torch.Tensor, rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastattn.triton.layer_norm import layer_norm_bwd

    return layer_norm_bwd(grad_out, grad_residual_out, x, weight, bias, mean, rstd, rms)


# ---------------------------------------------------------------------------------------------
# fake tensors and autograd, shared by the C++ ops and the Triton custom ops
# ---------------------------------------------------------------------------------------------
def _fwd_fake(input, weight, bias, residual, eps, rms):
    M, N = input.shape
    out = input.new_empty((M, N))
    residual_out = input.new_empty((M, N)) if residual is not None else input.new_empty((0,))
    mean = input.new_empty((M,), dtype=torch.float32)
    rstd = input.new_empty((M,), dtype=torch.float32)
    return out, residual_out, mean, rstd


def _bwd_fake(grad_out, grad_residual_out, x, weight, bias, mean, rstd, rms):
    dx = x.new_empty(x.shape)
    dw = weight.new_empty(weight.shape) if weight is not None else x.new_empty((0,))
    db = bias.new_empty(bias.shape) if bias is not None else x.new_empty((0,))
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    input, weight, bias, residual, eps, rms = inputs
    out, residual_out, mean, rstd = output
    # the backward needs what was normalised: the rounded sum when the residual is fused
    x = residual_out if residual is not None else input
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.rms = rms
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(mean, rstd)


def _unit_col_stride(t: torch.Tensor) -> torch.Tensor:
    # incoming gradients can be expanded (stride 0, e.g. from .sum()) or transposed
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def _make_backward(bwd_op):
    def backward(ctx, grad_out, grad_residual_out, grad_mean, grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dres = _unit_col_stride(grad_residual_out) if ctx.has_residual else None
        dx, dw, db = bwd_op(_unit_col_stride(grad_out), dres, x, weight, bias, mean, rstd,
                            ctx.rms)
        # input and residual enter the sum x = input + residual: both receive dx
        return (dx, dw if weight is not None else None, db if bias is not None else None,
                dx if ctx.has_residual else None, None, None)

    return backward


torch.library.register_fake("fastattn::triton_layer_norm_fwd")(_fwd_fake)
torch.library.register_fake("fastattn::triton_layer_norm_bwd")(_bwd_fake)
torch.library.register_autograd("fastattn::triton_layer_norm_fwd",
                                _make_backward(triton_layer_norm_bwd),
                                setup_context=_setup_context)


def _register_cpp() -> None:
    if not _backend._load_extension()[0]:
        return
    torch.library.register_fake("fastattn::layer_norm_fwd")(_fwd_fake)
    torch.library.register_fake("fastattn::layer_norm_bwd")(_bwd_fake)
    torch.library.register_autograd("fastattn::layer_norm_fwd",
                                    _make_backward(torch.ops.fastattn.layer_norm_bwd),
                                    setup_context=_setup_context)


_register_cpp()


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------
def _norm(fn, input, normalized_shape, weight, bias, eps, residual, rms, backend):
    shape = _normalized_shape(fn, input, normalized_shape)
    _check_param(fn, "weight", weight, input, shape)
    _check_param(fn, "bias", bias, input, shape)
    _check_residual(fn, residual, input)
    eps = _check_eps(fn, eps)
    n = math.prod(shape)

    dtypes = tuple(t.dtype if t is not None else None for t in (input, weight, bias))
    chosen = _choose(fn, input.device, backend, dtypes)
    if chosen == "reference" or input.numel() == 0:
        # Pure PyTorch with the kernels' contract: the residual sum rounded to input's dtype,
        # statistics of bf16/fp16 inputs in float32 (as F.layer_norm), output in input's dtype.
        x = input if residual is None else input + residual
        xc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if rms:
            out = reference.rms_norm(xc, shape, weight, eps)
        else:
            out = reference.layer_norm(xc, shape, weight, bias, eps)
        out = out.to(input.dtype)
        return out if residual is None else (out, x)

    x = _as_rows(input, n)  # (M, N)
    r = _as_rows(residual, n) if residual is not None else None  # (M, N)
    w = weight.reshape(n) if weight is not None else None  # (N,)
    b = bias.reshape(n) if bias is not None else None  # (N,)
    op = (torch.ops.fastattn.triton_layer_norm_fwd if chosen == "triton"
          else torch.ops.fastattn.layer_norm_fwd)
    out, summed, _, _ = op(x, w, b, r, eps, rms)
    out = out.view(input.shape)
    return out if residual is None else (out, summed.view(input.shape))


def layer_norm(
    input: torch.Tensor,
    normalized_shape: int | list[int] | tuple[int, ...] | torch.Size,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
):
    """Layer normalization over the trailing dims, a drop-in for ``torch.nn.functional.layer_norm``.

    Args:
        input: (*, *normalized_shape) float16/bfloat16/float32 (float64 runs on the reference).
            Any leading dims and strides; the trailing dims are read in place when they form
            N = prod(normalized_shape) contiguous elements per row, else copied once.
        normalized_shape: int or sequence of ints, the trailing dims of input.
        weight, bias: normalized_shape-shaped affine parameters, or None. In input's dtype or
            float32 (a float32 weight with a bf16 input gives a bf16 output, as on PyTorch CPU).
        eps: added to the variance, >= 0.
        residual: input-shaped tensor of input's dtype. When given, ``x = input + residual`` is
            computed once (rounded to input's dtype) in the same pass, normalised and returned.
        backend: "auto" | "triton" | "cuda" | "cpu" | "reference".

    Returns:
        out, input-shaped in input's dtype; ``(out, input + residual)`` when residual is given.
        Gradients flow to input, residual, weight and bias.
    """
    return _norm("layer_norm", input, normalized_shape, weight, bias, eps, residual, False,
                 backend)


def rms_norm(
    input: torch.Tensor,
    normalized_shape: int | list[int] | tuple[int, ...] | torch.Size,
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
):
    """RMS normalization over the trailing dims, a drop-in for ``torch.nn.functional.rms_norm``:
    ``out = x / sqrt(mean(x**2) + eps) * weight``.

    Args:
        input: (*, *normalized_shape) float16/bfloat16/float32 (float64 runs on the reference).
        normalized_shape: int or sequence of ints, the trailing dims of input.
        weight: normalized_shape-shaped scale, or None.
        eps: >= 0; None means ``torch.finfo(input.dtype).eps``, as F.rms_norm.
        residual: input-shaped tensor of input's dtype, fused as in :func:`layer_norm`.
        backend: "auto" | "triton" | "cuda" | "cpu" | "reference".

    Returns:
        out, input-shaped in input's dtype; ``(out, input + residual)`` when residual is given.
    """
    if eps is None and isinstance(input, torch.Tensor) and input.is_floating_point():
        eps = torch.finfo(input.dtype).eps
    return _norm("rms_norm", input, normalized_shape, weight, None, eps, residual, True, backend)
