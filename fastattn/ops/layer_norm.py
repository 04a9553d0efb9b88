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
# FlashAttention's layer_norm_fn / rms_norm_fn keywords: the op fastattn::layer_norm_fused_fwd
# (C++ CPU kernel) and its Triton twin, with one Python autograd for both
# ---------------------------------------------------------------------------------------------
def _check_fused(rms, input, normalized_shape, weight, bias, eps, residual, x1, weight1, bias1,
                 rowscale, offset, dropout_p, residual_in_fp32, quantize):
    """check_norm_fused (csrc/checks.cpp) -> (normalized_shape as a tuple, eps resolved)."""
    if _backend.NATIVE is not None and not torch.compiler.is_compiling():
        return _backend.NATIVE.check_norm_fused(
            rms, input, normalized_shape, weight, bias, eps, residual, x1, weight1, bias1,
            rowscale, offset, dropout_p, residual_in_fp32, quantize)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    return shape, eps


def _supports_fused(backend: str, device: torch.device, key: tuple) -> str | None:
    """key = (dtypes of input/residual/weight/bias/weight1/bias1/rowscale, N, whether the call
    uses only offset and a residual of input's dtype: the part the CUDA kernels compute)."""
    dtypes, n, offset_only = key
    for name, dtype in zip(("input", "residual", "weight", "bias", "weight1", "bias1", "rowscale"),
                           dtypes, strict=True):
        if dtype is not None and dtype not in _backend.FLOAT_DTYPES:
            return f"{name} dtype {dtype}"
    why = _supports(backend, device, (dtypes[0], torch.bfloat16 if torch.bfloat16 in dtypes
                                      else None, None))
    if why is not None:
        return why
    if backend == "cuda" and not offset_only:
        return ("the CUDA kernels have no dropout, rowscale, x1/weight1/bias1, residual_in_fp32, "
                "residual of another dtype or quantize (offset only)")
    if backend == "triton":
        from fastattn.triton.layer_norm import MAX_FUSED_N

        if n > MAX_FUSED_N:
            return (f"rows of {n} elements with the fused keywords (the Triton kernels keep a "
                    f"row in registers: at most {MAX_FUSED_N})")
    return None


@torch.library.custom_op("fastattn::triton_layer_norm_fused_fwd", mutates_args=())
def triton_layer_norm_fused_fwd(
    input: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None,
    bias: torch.Tensor | None, residual: torch.Tensor | None, x1: torch.Tensor | None,
    weight1: torch.Tensor | None, bias1: torch.Tensor | None, rowscale: torch.Tensor | None,
    eps: float, rms: bool, offset: float, dropout_p: float, seed: int, residual_in_fp32: bool,
    quantize: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    from fastattn.triton.layer_norm import layer_norm_fused_fwd

    _check_fused(rms, input, normalized_shape, weight, bias, eps, residual, x1, weight1, bias1,
                 rowscale, offset, dropout_p, residual_in_fp32, quantize)
    n = math.prod(normalized_shape)
    nd = len(normalized_shape)
    rows = [_as_rows(t, nd, n) if t is not None else None for t in (input, residual, x1)]
    outs = layer_norm_fused_fwd(
        rows[0], _flat(weight, n), _flat(bias, n), rows[1], rows[2], _flat(weight1, n),
        _flat(bias1, n), rowscale.reshape(-1) if rowscale is not None else None, eps, rms,
        offset, dropout_p, seed, residual_in_fp32, quantize)
    out, out1, residual_out, mask, mask1, mean, rstd, scale = outs
    shape = input.shape

    def full(t):
        return t.view(shape) if t.numel() or math.prod(shape) == 0 else t

    lead = shape[:input.dim() - nd]
    return (out.view(shape), full(out1) if weight1 is not None else out1,
            residual_out.view(shape) if residual_out.numel() else residual_out,
            full(mask) if mask.numel() else mask,
            full(mask1) if mask1.numel() else mask1, mean, rstd,
            scale.view(lead) if quantize else scale)


@torch.library.custom_op("fastattn::triton_layer_norm_fused_bwd", mutates_args=())
def triton_layer_norm_fused_bwd(
    grad_out: torch.Tensor, grad_out1: torch.Tensor | None,
    grad_residual_out: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor | None,
    weight1: torch.Tensor | None, dropout_mask: torch.Tensor | None,
    dropout_mask1: torch.Tensor | None, rowscale: torch.Tensor | None, mean: torch.Tensor,
    rstd: torch.Tensor, offset: float, dropout_p: float, rms: bool, has_bias: bool,
    has_bias1: bool, has_x1: bool, input_dtype: torch.dtype, residual_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    from fastattn.triton.layer_norm import layer_norm_fused_bwd

    return layer_norm_fused_bwd(grad_out, grad_out1, grad_residual_out, x, weight, weight1,
                                dropout_mask, dropout_mask1, rowscale, mean, rstd, offset,
                                dropout_p, rms, has_bias, has_bias1, has_x1, input_dtype,
                                residual_dtype)


def _fused_fwd_fake(input, normalized_shape, weight, bias, residual, x1, weight1, bias1, rowscale,
                    eps, rms, offset, dropout_p, seed, residual_in_fp32, quantize):
    _check_fused(rms, input, normalized_shape, weight, bias, eps, residual, x1, weight1, bias1,
                 rowscale, offset, dropout_p, residual_in_fp32, quantize)
    shape = input.shape
    nd = len(normalized_shape)
    m = math.prod(shape[:input.dim() - nd])
    res_dtype = (torch.float32 if residual_in_fp32
                 else residual.dtype if residual is not None else input.dtype)
    def none():  # a fresh empty tensor per absent output: outputs may not alias
        return input.new_empty((0,))

    out = input.new_empty(shape, dtype=torch.int8 if quantize else input.dtype)
    out1 = input.new_empty(shape) if weight1 is not None else none()
    combined = (residual is not None or x1 is not None or rowscale is not None or dropout_p > 0
                or res_dtype != input.dtype)
    residual_out = input.new_empty(shape, dtype=res_dtype) if combined else none()
    mask = input.new_empty(shape, dtype=torch.bool) if dropout_p > 0 else none()
    mask1 = (input.new_empty(shape, dtype=torch.bool) if dropout_p > 0 and x1 is not None
             else none())
    mean = input.new_empty((m,), dtype=torch.float32)
    rstd = input.new_empty((m,), dtype=torch.float32)
    scale = (input.new_empty(shape[:input.dim() - nd], dtype=torch.float32) if quantize
             else input.new_empty((0,), dtype=torch.float32))
    return out, out1, residual_out, mask, mask1, mean, rstd, scale


def _fused_bwd_fake(grad_out, grad_out1, grad_residual_out, x, weight, weight1, dropout_mask,
                    dropout_mask1, rowscale, mean, rstd, offset, dropout_p, rms, has_bias,
                    has_bias1, has_x1, input_dtype, residual_dtype):
    m, n = x.shape

    def vec(want):
        return x.new_empty((n if want else 0,), dtype=torch.float32)

    def empty():
        return x.new_empty((0,), dtype=input_dtype)

    return (x.new_empty((m, n), dtype=input_dtype),
            x.new_empty((m, n), dtype=residual_dtype) if residual_dtype is not None else empty(),
            x.new_empty((m, n), dtype=input_dtype) if has_x1 else empty(),
            vec(weight is not None), vec(has_bias), vec(weight1 is not None), vec(has_bias1))


def _fused_setup_context(ctx, inputs, output):
    (input, normalized_shape, weight, bias, residual, x1, weight1, bias1, rowscale, eps, rms,
     offset, dropout_p, seed, residual_in_fp32, quantize) = inputs
    out, out1, residual_out, mask, mask1, mean, rstd, scale = output
    # what was normalised: x', or the input itself when nothing was combined
    x = residual_out if residual_out.numel() or input.numel() == 0 else input
    ctx.save_for_backward(x, weight, weight1, mask, mask1, rowscale, mean, rstd)
    ctx.args = (len(normalized_shape), rms, offset, dropout_p, input.dtype,
                residual.dtype if residual is not None else None, x1 is not None,
                bias.dtype if bias is not None else None,
                bias1.dtype if bias1 is not None else None, quantize)
    ctx.mark_non_differentiable(mask, mask1, mean, rstd, scale)
    if quantize:
        ctx.mark_non_differentiable(out)


def _fused_backward(ctx, g_out, g_out1, g_res, *_):
    x, weight, weight1, mask, mask1, rowscale, mean, rstd = ctx.saved_tensors
    (nd, rms, offset, dropout_p, input_dtype, residual_dtype, has_x1, bias_dtype, bias1_dtype,
     quantize) = ctx.args
    n = math.prod(x.shape[x.dim() - nd:])
    if quantize or g_out is None:
        g_out = torch.zeros_like(x, dtype=input_dtype)
    rows = _as_rows(g_out, nd, n)
    g1 = _as_rows(g_out1, nd, n) if weight1 is not None and g_out1 is not None else None
    gr = _as_rows(g_res, nd, n) if g_res is not None and g_res.numel() else None
    op = ctx.bwd_op
    dx, dres, dx1, dw, db, dw1, db1 = op(
        rows, g1, gr, _as_rows(x, nd, n), _flat(weight, n), _flat(weight1, n),
        _as_rows(mask, nd, n) if mask.numel() else None,
        _as_rows(mask1, nd, n) if mask1.numel() else None,
        rowscale.reshape(-1) if rowscale is not None else None, mean, rstd, offset, dropout_p,
        rms, bias_dtype is not None, bias1_dtype is not None, has_x1, input_dtype,
        residual_dtype)
    shape = x.shape

    def param(g, like_shape, dtype):
        return g.view(like_shape).to(dtype) if dtype is not None else None

    return (dx.view(shape), None,
            param(dw, weight.shape, weight.dtype) if weight is not None else None,
            param(db, weight.shape if weight is not None else shape[x.dim() - nd:], bias_dtype),
            dres.view(shape) if residual_dtype is not None else None,
            dx1.view(shape) if has_x1 else None,
            param(dw1, weight1.shape, weight1.dtype) if weight1 is not None else None,
            param(db1, weight1.shape if weight1 is not None else shape, bias1_dtype),
            None, None, None, None, None, None, None, None)


def _make_setup(bwd_op):
    def setup(ctx, inputs, output):
        _fused_setup_context(ctx, inputs, output)
        ctx.bwd_op = bwd_op()
    return setup


_backend.register_family(
    fakes={"layer_norm_fused_fwd": _fused_fwd_fake, "layer_norm_fused_bwd": _fused_bwd_fake},
    autograd={"layer_norm_fused_fwd": (
        _fused_backward, _make_setup(lambda: torch.ops.fastattn.triton_layer_norm_fused_bwd))},
    triton_ops=("layer_norm_fused_fwd", "layer_norm_fused_bwd"))
if _backend._load_extension()[0] and hasattr(torch.ops.fastattn, "layer_norm_fused_fwd"):
    # the C++ op's autograd is Python too: its calls carry dropout, two outputs or mixed
    # dtypes, training-time work where ~15 us per call is small next to the kernel
    torch.library.register_autograd(
        "fastattn::layer_norm_fused_fwd", _fused_backward,
        setup_context=_make_setup(lambda: torch.ops.fastattn.layer_norm_fused_bwd))


def _draw_seed(dropout_p: float) -> int:
    if dropout_p == 0.0:
        return 0
    # from torch's default CPU generator, so torch.manual_seed makes dropout reproducible
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def _norm_fused(rms, input, normalized_shape, weight, bias, eps, residual, x1, weight1, bias1,
                rowscale, dropout_p, residual_in_fp32, prenorm, return_dropout_mask, offset,
                quantize, backend):
    _backend.check_backend(backend)
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    q = quantize is not None
    shape, eps = _check_fused(rms, input, normalized_shape, weight, bias, eps, residual, x1,
                              weight1, bias1, rowscale, offset, float(dropout_p),
                              bool(residual_in_fp32), q)
    fn = "rms_norm" if rms else "layer_norm"
    dtypes = tuple(t.dtype if t is not None else None
                   for t in (input, residual, weight, bias, weight1, bias1, rowscale))
    n = math.prod(shape)
    offset_only = (x1 is None and weight1 is None and rowscale is None and not dropout_p
                   and not residual_in_fp32 and not q
                   and (residual is None or residual.dtype == input.dtype))
    chosen = _backend.pick(fn, input.device, backend, (dtypes, n, offset_only), _supports_fused)
    if chosen == "reference" or input.numel() == 0:
        kw = dict(residual=residual, x1=x1, weight1=weight1, rowscale=rowscale,
                  dropout_p=dropout_p, residual_in_fp32=residual_in_fp32, prenorm=True,
                  return_dropout_mask=True, offset=offset, quantize=quantize)
        if not rms:
            kw["bias1"] = bias1
        if input.numel() == 0:
            kw["dropout_p"] = 0.0
        ref = reference.rms_norm if rms else reference.layer_norm
        res = list(ref(input, shape, weight, *(() if rms else (bias,)), eps, **kw))
        mask, mask1 = res[-2:]
        residual_out = res[-3]
        outs = res[:-3]
        return _assemble(outs, residual_out, mask, mask1, residual, prenorm,
                         return_dropout_mask)
    op = (torch.ops.fastattn.triton_layer_norm_fused_fwd if chosen == "triton"
          else torch.ops.fastattn.layer_norm_fused_fwd)
    out, out1, residual_out, mask, mask1, _, _, scale = op(
        input, list(shape), weight, bias, residual, x1, weight1, bias1, rowscale, eps, rms,
        float(offset), float(dropout_p), _draw_seed(dropout_p), bool(residual_in_fp32), q)
    outs = [out, scale] if q else [out]
    if weight1 is not None:
        outs.append(out1)
    if residual_out.numel() == 0:  # x' is the input itself (see the op's contract)
        residual_out = input
    return _assemble(outs, residual_out, mask if mask.numel() else None,
                     mask1 if mask1.numel() else None, residual, prenorm, return_dropout_mask)


def _assemble(outs, residual_out, mask, mask1, residual, prenorm, return_dropout_mask):
    """FlashAttention's return order: out [, out1] [, residual_out] [, mask, mask1]."""
    outs = list(outs)
    if prenorm if prenorm is not None else residual is not None:
        outs.append(residual_out)
    if return_dropout_mask:
        outs += [mask, mask1]
    return outs[0] if len(outs) == 1 else tuple(outs)


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------
def _norm(rms: bool, input, normalized_shape, weight, bias, eps, residual, backend):
    if residual is not None and residual.dtype != input.dtype:
        if _backend.fast_path(backend):
            out = _backend.NATIVE.norm_fused(rms, input, normalized_shape, weight, bias, eps,
                                             residual, None, None, None, None, 0.0, False, None,
                                             False, False)
            if out is not None:
                return out
        return _norm_fused(rms, input, normalized_shape, weight, bias, eps, residual, None, None,
                           None, None, 0.0, False, None, False, 0.0, None, backend)
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
    x1: torch.Tensor | None = None,
    weight1: torch.Tensor | None = None,
    bias1: torch.Tensor | None = None,
    rowscale: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    residual_in_fp32: bool = False,
    prenorm: bool | None = None,
    return_dropout_mask: bool = False,
    offset: float = 0.0,
    quantize: str | None = None,
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
        residual: input-shaped tensor. When given, ``x = input + residual`` is computed once
            (rounded to residual's dtype) in the same pass, normalised and returned. Of input's
            dtype or a wider one (a float32 residual with bf16 activations).

    FlashAttention's ``layer_norm_fn`` keywords (same names and semantics), all in one pass:

        x1, weight1, bias1, rowscale, dropout_p, residual_in_fp32, prenorm, return_dropout_mask,
        offset, quantize:
            ``x' = dropout(input * rowscale) + dropout(x1) + residual`` (each term optional) is
            what is normalised; it is held in float32 with ``residual_in_fp32`` (for any
            residual dtype), else in residual's dtype, else in input's.
            ``out = norm(x') * (offset + weight) + bias`` (offset=1.0 is Gemma's zero-centred
            weight; it needs weight) and, with ``weight1``, a second output
            ``out1 = norm(x') * (offset + weight1) + bias1`` (parallel attention/MLP blocks).
            rowscale: input.shape[:-len(normalized_shape)], one factor per row, on input only.
            x1: input's shape and dtype. dropout_p in [0, 1): each of input and x1 keeps an
            element with probability 1 - dropout_p (scaled by 1 / (1 - dropout_p)); masks drawn
            from torch's default generator's seed (``torch.manual_seed`` reproduces them).
            quantize="int8": out is returned as (out_int8, scale), exactly
            ``quantize_per_token(out)`` (scale float32 input.shape[:-len(normalized_shape)]),
            forward only.
        backend: "auto" | "triton" | "cuda" | "cpu" | "reference".

    Returns:
        out, input-shaped in input's dtype; ``(out, input + residual)`` when residual is given.
        With the keywords above, FlashAttention's order: ``out`` (or ``out_int8, scale``)
        [, ``out1`` with weight1] [, ``x'`` (the residual for the next block) when prenorm,
        which defaults to ``residual is not None``] [, ``dropout_mask, dropout_mask1`` (bool,
        True = kept; None when dropout_p == 0 or x1 is None) with return_dropout_mask].
        Gradients flow to input, residual, x1, weight, bias, weight1 and bias1.
    """
    # one chained identity test for the six None defaults: the per-token call pays ~0.1 us
    if not (x1 is weight1 is bias1 is rowscale is prenorm is quantize is None) or (
            dropout_p or residual_in_fp32 or return_dropout_mask or offset):
        if not dropout_p and (quantize is None or quantize == "int8") and _backend.fast_path(
                backend):
            out = _backend.NATIVE.norm_fused(
                False, input, normalized_shape, weight, bias, eps, residual, x1, weight1, bias1,
                rowscale, offset, bool(residual_in_fp32), prenorm, bool(return_dropout_mask),
                quantize is not None)
            if out is not None:
                return out
        return _norm_fused(False, input, normalized_shape, weight, bias, eps, residual, x1,
                           weight1, bias1, rowscale, dropout_p, residual_in_fp32, prenorm,
                           return_dropout_mask, offset, quantize, backend)
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
    x1: torch.Tensor | None = None,
    weight1: torch.Tensor | None = None,
    rowscale: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    residual_in_fp32: bool = False,
    prenorm: bool | None = None,
    return_dropout_mask: bool = False,
    offset: float = 0.0,
    quantize: str | None = None,
    backend: str = "auto",
):
    """RMS normalization over the trailing dims, a drop-in for ``torch.nn.functional.rms_norm``:
    ``out = x / sqrt(mean(x**2) + eps) * weight``.

    Args:
        input: (*, *normalized_shape) float16/bfloat16/float32 (float64 runs on the reference).
        normalized_shape: int or sequence of ints, the trailing dims of input.
        weight: normalized_shape-shaped scale, or None.
        eps: >= 0; None means ``torch.finfo(input.dtype).eps``, as F.rms_norm.
        residual: input-shaped tensor, fused as in :func:`layer_norm`.
        x1, weight1, rowscale, dropout_p, residual_in_fp32, prenorm, return_dropout_mask,
        offset, quantize: FlashAttention's ``rms_norm_fn`` keywords, as in :func:`layer_norm`
            (no bias, no bias1). offset=1.0 gives Gemma's ``x_hat * (1 + weight)``.
        backend: "auto" | "triton" | "cuda" | "cpu" | "reference".

    Returns:
        out, input-shaped in input's dtype; ``(out, input + residual)`` when residual is given;
        with the keywords, the outputs in :func:`layer_norm`'s order.
    """
    if not (x1 is weight1 is rowscale is prenorm is quantize is None) or (
            dropout_p or residual_in_fp32 or return_dropout_mask or offset):
        if not dropout_p and (quantize is None or quantize == "int8") and _backend.fast_path(
                backend):
            # decoding calls (offset, a float32 residual, int8 out) skip the Python layer
            out = _backend.NATIVE.norm_fused(
                True, input, normalized_shape, weight, None, eps, residual, x1, weight1, None,
                rowscale, offset, bool(residual_in_fp32), prenorm, bool(return_dropout_mask),
                quantize is not None)
            if out is not None:
                return out
        return _norm_fused(True, input, normalized_shape, weight, None, eps, residual, x1,
                           weight1, None, rowscale, dropout_p, residual_in_fp32, prenorm,
                           return_dropout_mask, offset, quantize, backend)
    if _backend.fast_path(backend):
        out = _backend.NATIVE.norm(True, input, normalized_shape, weight, None, eps, residual)
        if out is not None:
            return out
    return _norm(True, input, normalized_shape, weight, None, eps, residual, backend)
