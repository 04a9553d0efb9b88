"""SiLU-and-mul forward and backward Triton kernels (the gated MLP activation of Llama-style
models, vLLM's ``silu_and_mul``): x (M, 2*I) holds the gate half then the up half of each row,
out (M, I) = silu(gate) * up.

Layout: one program per (row, block of BLOCK_N columns), on a 1-D grid of M * cdiv(I, BLOCK_N)
programs (grid x takes up to 2**31 - 1, so any token count fits). Each program reads its columns
of the gate and the up half (and of grad in the backward) and writes them once: the kernels are
memory-bound, and float32 arithmetic is free next to the loads. silu(g) = g / (1 + exp(-g)) as
in PyTorch; exp(-g) overflows to inf for g < -88.7, where silu(g) is then -0 (the true value is
below 1e-36).

The launchers take and return exactly what the C++ ops ``fastattn::silu_mul_fwd/bwd`` do on
(M, 2*I) rows (csrc/fastattn.cpp), so the op layer treats both backends the same way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastattn.triton import _interpret
from fastattn.triton._launch import device_guard

_interpret.prepare()

# Columns per program: 1024 elements over 4 warps is 8 per thread, one 16-byte access per
# thread for bf16 (two for float32); a row of I = 1536 takes two programs.
MAX_BLOCK_N = 1024


def block_config(n: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for rows of n = I output columns."""
    block = min(MAX_BLOCK_N, triton.next_power_of_2(max(n, 1)))
    return block, max(1, min(4, block // 256))


@triton.jit
def _silu_mul_fwd_kernel(
    X, Y,  # pointers
    N, n_col_blocks,  # sizes: N = I, the output columns
    stride_xm, stride_ym,  # strides
    BLOCK_N: tl.constexpr,  # meta-parameters
):
    """Y[m, c] = silu(X[m, c]) * X[m, N + c] for the BLOCK_N columns c of program (m, block);
    X (M, 2N), Y (M, N) row-strided."""
    pid = tl.program_id(0)
    row = (pid // n_col_blocks).to(tl.int64)
    cols = (pid % n_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    x_ptr = X + row * stride_xm
    g = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + N + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(Y + row * stride_ym + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_bwd_kernel(
    DY, X, DX,  # pointers
    N, n_col_blocks,  # sizes: N = I, the output columns
    stride_dym, stride_xm, stride_dxm,  # strides
    BLOCK_N: tl.constexpr,  # meta-parameters
):
    """DX[m, c] = DY * up * sig * (1 + gate * (1 - sig)), DX[m, N + c] = DY * gate * sig with
    gate = X[m, c], up = X[m, N + c], sig = sigmoid(gate) (PyTorch's silu backward), for the
    columns c of program (m, block); DY (M, N), X (M, 2N), DX (M, 2N) row-strided."""
    pid = tl.program_id(0)
    row = (pid // n_col_blocks).to(tl.int64)
    cols = (pid % n_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    x_ptr = X + row * stride_xm
    dy = tl.load(DY + row * stride_dym + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + N + cols, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    du = dy * (g * sig)
    dx_ptr = DX + row * stride_dxm
    tl.store(dx_ptr + cols, dg.to(DX.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + N + cols, du.to(DX.dtype.element_ty), mask=mask)


def _check_rows(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"{name} must be 2-D with stride(1) == 1, got shape {tuple(t.shape)} "
                         f"and strides {t.stride()}")


@device_guard
def silu_mul_fwd(x: torch.Tensor) -> torch.Tensor:
    """x (M, 2*I) row-strided -> out (M, I) contiguous, in x's dtype."""
    _check_rows(x, "x")
    M, n = x.shape[0], x.shape[1] // 2
    out = torch.empty((M, n), dtype=x.dtype, device=x.device)
    if M == 0 or n == 0:
        return out
    block, warps = block_config(n)
    n_col_blocks = triton.cdiv(n, block)
    _silu_mul_fwd_kernel[(M * n_col_blocks,)](
        x, out, n, n_col_blocks, x.stride(0), out.stride(0), BLOCK_N=block, num_warps=warps)
    return out


@device_guard
def silu_mul_bwd(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad (M, I), x (M, 2*I), both row-strided -> grad_x (M, 2*I) contiguous."""
    _check_rows(grad, "grad")
    _check_rows(x, "x")
    M, n = x.shape[0], x.shape[1] // 2
    dx = torch.empty((M, 2 * n), dtype=x.dtype, device=x.device)
    if M == 0 or n == 0:
        return dx
    block, warps = block_config(n)
    n_col_blocks = triton.cdiv(n, block)
    _silu_mul_bwd_kernel[(M * n_col_blocks,)](
        grad, x, dx, n, n_col_blocks, grad.stride(0), x.stride(0), dx.stride(0),
        BLOCK_N=block, num_warps=warps)
    return dx
