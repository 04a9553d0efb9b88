"""SiLU-and-mul op layer: validation, backend choice, torch.library registration (fake tensors +
autograd) of the C++ op and of the Triton custom ops, and the public function.

Every backend computes the same thing (csrc/fastattn.cpp has the contract): x (..., 2*I) is read
as M rows of 2*I elements, gate half first; out (..., I) = silu(gate) * up in float32, rounded
once to x's dtype. There is no CUDA kernel: on CUDA tensors "auto" runs the Triton one.
"""

from __future__ import annotations

import torch

from fastattn import reference
from fastattn.ops import _backend
from fastattn.ops.layer_norm import _as_rows

_backend.register_op("silu_mul", "silu_mul_fwd")

_FN = "fastattn.silu_mul"


def _check(x, grad=None) -> None:
    """The argument rules (csrc/checks.cpp: check_silu_mul, shared with the kernels). While
    torch.compile traces, or without the extension, the same rules in Python."""
    if _backend.NATIVE is not None and not torch.compiler.is_compiling():
        _backend.NATIVE.check_silu_mul(x, grad)
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_FN}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{_FN}: x must be a floating-point tensor, got {x.dtype}")
    if x.dtype not in _backend.FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"{_FN}: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{_FN}: x must have at least one dimension (..., 2*I), got a 0-d tensor")
    n = x.shape[-1]
    if not (n > 0 and n % 2 == 0):
        raise ValueError(f"{_FN}: x.shape[-1] must be even and > 0 (the gate and up halves, "
                         f"2*I), got {n}")
    if grad is not None:
        if grad.dtype != x.dtype:
            raise TypeError(f"{_FN}: grad must have x's dtype ({x.dtype}), got {grad.dtype}")
        want = (*x.shape[:-1], n // 2)
        if tuple(grad.shape) != want:
            raise ValueError(f"{_FN}: grad must have the output's shape {list(want)}, got "
                             f"{list(grad.shape)}")


def _supports(backend: str, device: torch.device, key: tuple) -> str | None:
    """None when ``backend``'s kernel handles an x of this dtype, else why not."""
    (dtype,) = key
    if dtype not in _backend.FLOAT_DTYPES:
        return f"x dtype {dtype}"
    if backend == "cuda":
        return "fastattn has no CUDA kernel for silu_mul (the Triton one runs CUDA tensors)"
    if backend == "triton" and device.type == "cuda" and dtype == torch.bfloat16:
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"bfloat16 needs compute capability >= 8.0, got {major}.{minor}"
    return None


# ---------------------------------------------------------------------------------------------
# Triton custom ops (the launchers live in fastattn/triton/activation.py), on the same arguments
# as the C++ ops fastattn::silu_mul_fwd / silu_mul_bwd
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastattn::triton_silu_mul_fwd", mutates_args=())
def triton_silu_mul_fwd(x: torch.Tensor) -> torch.Tensor:
    from fastattn.triton.activation import silu_mul_fwd

    _check(x)
    n = x.shape[-1]
    out = silu_mul_fwd(_as_rows(x, 1, n))  # (M, I)
    return out.view(*x.shape[:-1], n // 2)


@torch.library.custom_op("fastattn::triton_silu_mul_bwd", mutates_args=())
def triton_silu_mul_bwd(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    from fastattn.triton.activation import silu_mul_bwd

    _check(x, grad)
    n = x.shape[-1]
    dx = silu_mul_bwd(_as_rows(grad, 1, n // 2), _as_rows(x, 1, n))  # (M, 2I)
    return dx.view(x.shape)


# ---------------------------------------------------------------------------------------------
# fake tensors (both ops) and the Triton op's autograd (csrc/autograd.cpp has the C++ op's)
# ---------------------------------------------------------------------------------------------
def _fwd_fake(x):
    _check(x)
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


def _bwd_fake(grad, x):
    _check(x, grad)
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x)


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return triton_silu_mul_bwd(grad, x)


_backend.register_family(
    fakes={"silu_mul_fwd": _fwd_fake, "silu_mul_bwd": _bwd_fake},
    autograd={"silu_mul_fwd": (_backward, _setup_context)},
    triton_ops=("silu_mul_fwd", "silu_mul_bwd"))


# ---------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------
def _silu_mul(x, backend):
    _backend.check_backend(backend)
    _check(x)
    chosen = _backend.pick("silu_mul", x.device, backend, (x.dtype,), _supports)
    if chosen == "reference" or x.numel() == 0:
        # pure PyTorch with the kernels' contract: float32 arithmetic, one rounding
        xc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return reference.silu_mul(xc).to(x.dtype)
    op = (torch.ops.fastattn.triton_silu_mul_fwd if chosen == "triton"
          else torch.ops.fastattn.silu_mul_fwd)
    return op(x)


def silu_mul(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """SiLU-and-mul, the activation of a Llama-style gated MLP whose gate and up projections are
    one GEMM (vLLM's ``silu_and_mul``, Liger's SiLU-mul): ``silu(x[..., :I]) * x[..., I:]``.

    Args:
        x: (..., 2*I) float16/bfloat16/float32 (float64 runs on the reference), the output of
            one linear layer whose weight is the gate projection's stacked on the up
            projection's (``torch.cat([w_gate, w_up])``). Any leading dims, zero-size included.
            Each row's 2*I elements should be contiguous (the usual case): rows evenly spaced
            any stride apart are read in place, any other layout is copied once.
        backend: "auto" | "triton" | "cpu" | "reference" ("cuda" has no kernel for this op).

    Returns:
        (..., I) in x's dtype (contiguous from the kernels; the reference keeps x's layout):
        silu(gate) * up computed in float32 and rounded once, silu(g) = g / (1 + exp(-g)).
        Differentiable with respect to x.
    """
    if _backend.fast_path(backend):
        out = _backend.NATIVE.silu_mul(x)
        if out is not None:
            return out
    return _silu_mul(x, backend)
