"""LayerNorm / RMSNorm op layer: validation, reshaping to rows, backend choice, torch.library
registration (fake tensors + autograd) of the C++ ops and of the Triton custom ops.

Every backend computes the same thing on an (M, N) view of the input (csrc/fastattn.cpp has the
contract): N = prod(normalized_shape) contiguous elements per row, rows any stride apart,
statistics in float32, and with ``residual=`` the sum ``input + residual`` rounded to the input
dtype is both returned and normalised.
"""

from __future__ import annotations

import math

import torch

from fastattn import reference
from fastattn.ops import _backend

_backend.register_op("layer_norm", "layer_norm_fwd")
_backend.register_op("rms_norm", "layer_norm_fwd")


def _check(rms: bool, input, normalized_shape, weight, bias, eps, residual):
    """The argument rules (csrc/checks.cpp, shared with the kernels) -> (normalized_shape as a
    tuple, eps resolved). While torch.compile traces, the op's fake function runs the same
    checks; without the extension only the types PyTorch itself needs are known."""
    if _backend.NATIVE is not None and not torch.compiler.is_compiling():
        return _backend.NATIVE.check_norm(rms, input, normalized_shape, weight, bias, eps, residual)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    return shape, eps


def _supports(backend: str, device: torch.device, dtypes: tuple) -> str | None:
    """None when ``backend``'s kernels handle input/weight/bias of these dtypes, else why not."""
    for name, dtype in zip(("input", "weight", "bias"), dtypes, strict=True):
        if dtype is not None and dtype not in _backend.FLOAT_DTYPES:
            return f"{name} dtype {dtype}"
    if backend == "triton" and device.type == "cuda" and torch.bfloat16 in dtypes:
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"bfloat16 needs compute capability >= 8.0, got {major}.{minor}"
    return None


# ---------------------------------------------------------------------------------------------
# Triton custom ops (the launchers live in fastattn/triton/layer_norm.py), on the same arguments
# as the C++ op fastattn::layer_norm_fwd
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastattn::triton_layer_norm_fwd", mutates_args=())
def triton_layer_norm_fwd(
    input: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None,
    bias: torch.Tensor | None, residual: torch.Tensor | None, eps: float, rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastattn.triton.layer_norm import layer_norm_fwd

    _check(rms, input, normalized_shape, weight, bias, eps, residual)
    n = math.prod(normalized_shape)
    nd = len(normalized_shape)
    out, summed, mean, rstd = layer_norm_fwd(
        _as_rows(input, nd, n), _flat(weight, n), _flat(bias, n),
        _as_rows(residual, nd, n) if residual is not None else None, eps, rms)
    summed = summed.view(input.shape) if residual is not None else summed
    return out.view(input.shape), summed, mean, rstd


@torch.library.custom_op("fastattn::triton_layer_norm_bwd", mutates_args=())
def triton_layer_norm_bwd(
    grad_out: torch.Tensor, grad_residual_out: torch.Tensor | None, x: torch.Tensor,
    weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor,
    rstd: torch.Tensor, rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastattn.triton.layer_norm import layer_norm_bwd

    return layer_norm_bwd(grad_out, grad_residual_out, x, weight, bias, mean, rstd, rms)


def _as_rows(t: torch.Tensor, nd: int, n: int) -> torch.Tensor:
    """(*, trailing nd dims) -> (M, N) rows with unit column stride: a view whenever each row's
    N elements are contiguous and the rows evenly spaced, otherwise a copy (checks::as_rows)."""
    rows = t.reshape(math.prod(t.shape[:t.dim() - nd]), n)  # (M, N)
    if n > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def _flat(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return t.reshape(n) if t is not None else None


# ---------------------------------------------------------------------------------------------
# fake tensors (both ops) and the Triton op's autograd (csrc/autograd.cpp has the C++ op's)
# ---------------------------------------------------------------------------------------------
def _fwd_fake(input, normalized_shape, weight, bias, residual, eps, rms):
    _check(rms, input, normalized_shape, weight, bias, eps, residual)
    m = math.prod(input.shape[:input.dim() - len(normalized_shape)])
    out = input.new_empty(input.shape)
    residual_out = input.new_empty(input.shape) if residual is not None else input.new_empty((0,))
    mean = input.new_empty((m,), dtype=torch.float32)
    rstd = input.new_empty((m,), dtype=torch.float32)
    return out, residual_out, mean, rstd


def _bwd_fake(grad_out, grad_residual_out, x, weight, bias, mean, rstd, rms):
    dx = x.new_empty(x.shape)
    dw = weight.new_empty(weight.shape) if weight is not None else x.new_empty((0,))
    db = bias.new_empty(bias.shape) if bias is not None else x.new_empty((0,))
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    input, normalized_shape, weight, bias, residual, eps, rms = inputs
    out, residual_out, mean, rstd = output
    # the backward needs what was normalised: the rounded sum when the residual is fused
    x = residual_out if residual is not None else input
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.rms = rms
    ctx.nd = len(normalized_shape)
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_out, grad_residual_out, grad_mean, grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    n = math.prod(x.shape[x.dim() - ctx.nd:])
    dres = _as_rows(grad_residual_out, ctx.nd, n) if ctx.has_residual else None
    dx, dw, db = triton_layer_norm_bwd(_as_rows(grad_out, ctx.nd, n), dres,
                                       _as_rows(x, ctx.nd, n), _flat(weight, n), _flat(bias, n),
                                       mean, rstd, ctx.rms)
    dx = dx.view(x.shape)
    # input and residual enter the sum x = input + residual: both receive dx
    return (dx, None, dw.view(weight.shape) if weight is not None else None,
            db.view(bias.shape) if bias is not None else None,
            dx if ctx.has_residual else None, None, None)


_backend.register_family(
    fakes={"layer_norm_fwd": _fwd_fake, "layer_norm_bwd": _bwd_fake},
    autograd={"layer_norm_fwd": (_backward, _setup_context)},
    triton_ops=("layer_norm_fwd", "layer_norm_bwd"))


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------
def _norm(rms: bool, input, normalized_shape, weight, bias, eps, residual, backend):
    _backend.check_backend(backend)
    shape, eps = _check(rms, input, normalized_shape, weight, bias, eps, residual)
    fn = "rms_norm" if rms else "layer_norm"
    dtypes = tuple(t.dtype if t is not None else None for t in (input, weight, bias))
    chosen = _backend.pick(fn, input.device, backend, dtypes, _supports)
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
    op = (torch.ops.fastattn.triton_layer_norm_fwd if chosen == "triton"
          else torch.ops.fastattn.layer_norm_fwd)
    out, summed, _, _ = op(input, list(shape), weight, bias, residual, eps, rms)
    return out if residual is None else (out, summed)


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
    if _backend.fast_path(backend):
        out = _backend.NATIVE.norm(False, input, normalized_shape, weight, bias, eps, residual)
        if out is not None:
            return out
    return _norm(False, input, normalized_shape, weight, bias, eps, residual, backend)


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
    if _backend.fast_path(backend):
        out = _backend.NATIVE.norm(True, input, normalized_shape, weight, None, eps, residual)
        if out is not None:
            return out
    return _norm(True, input, normalized_shape, weight, None, eps, residual, backend)
