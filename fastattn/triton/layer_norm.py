"""LayerNorm / RMSNorm forward and backward Triton kernels, with an optional fused residual add.

Layout: one program per row in the forward. When the row fits in one block (BLOCK_N =
next_pow2(N) <= _MAX_FUSED_*, 16K elements forward, 8K backward), it is loaded once and kept in
registers; longer rows loop over column blocks, re-reading the row from L2 (a 64K-element bf16
row is 128 KiB). Statistics are float32.

The backward splits the rows into a fixed number of contiguous groups, one program each; a
program accumulates its rows' dW/dB contributions in float32 and writes them as one row of a
(groups, N) partial buffer, which a second kernel sums in group order. No atomics: the weight
gradient is bitwise repeatable.

The launchers take and return exactly what the C++ op ``fastattn::layer_norm_fwd/bwd`` does
(csrc/fastattn.cpp), so the op layer treats both backends the same way.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastattn.triton import _interpret
from fastattn.triton._launch import on_device as _on_device

_interpret.prepare()

# Largest row kept in registers in one block; longer rows loop over _LOOP_BLOCK columns. Sized
# from ptxas on sm_90 (offline compile, fp32 and bf16, residual + weight + bias): the forward at
# 16K elements and 16 warps takes 128 registers/thread, no spills, but 32K spills 336 bytes even
# at 32 warps; the backward holds ~5 values per element (x, dy, w, dW and dB sums) and spills
# from 16K (568 bytes at 16 warps, 200 at 32), while 8K fits at 32 warps in 64 registers.
_MAX_FUSED_FWD = 16384
_MAX_FUSED_BWD = 8192
_LOOP_BLOCK = 4096


def _num_warps(block_n: int) -> int:
    """Forward: 8-16 elements per thread up to 8K, 128 registers/thread at 16K."""
    if block_n >= 8192:
        return 16
    if block_n >= 2048:
        return 8
    if block_n >= 512:
        return 4
    return 2


def _num_warps_bwd(block_n: int) -> int:
    """Backward: twice the forward's threads (5 live values per element instead of 2): 48-99
    registers/thread from 1K to 4K elements, 64 at 8K over 32 warps (sm_90, no spills)."""
    return min(32, 2 * _num_warps(block_n))


@triton.jit
def _layer_norm_fwd_kernel(
    # pointers
    X, R, W, B, Y, RO, Mean, Rstd,
    # sizes
    N,
    # strides
    stride_xm, stride_rm, stride_ym, stride_rom,
    # scalars
    eps,
    # meta-parameters
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    RMS: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    """Y[m] = norm(X[m] (+ R[m])) * W + B for one row m; X/R (M, N) row-strided, Y/RO (M, N)."""
    row = tl.program_id(0).to(tl.int64)
    x_ptr = X + row * stride_xm
    r_ptr = R + row * stride_rm
    y_ptr = Y + row * stride_ym
    ro_ptr = RO + row * stride_rom
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        mask = cols < N
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            # the sum is rounded to the input dtype once: that is residual_out, and what is
            # normalised (as in the unfused F.layer_norm(x + r))
            r = tl.load(r_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            xs = (x + r).to(RO.dtype.element_ty)
            tl.store(ro_ptr + cols, xs, mask=mask)
            x = xs.to(tl.float32)
        if RMS:
            mean = 0.0
            var = tl.sum(x * x, axis=0) / N
            xc = x
        else:
            mean = tl.sum(x, axis=0) / N
            xc = tl.where(mask, x - mean, 0.0)
            var = tl.sum(xc * xc, axis=0) / N
        rstd = tl.rsqrt(var + eps)
        y = xc * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # pass 1: sum (or sum of squares), writing residual_out on the way
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = c < N
            x = tl.load(x_ptr + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(r_ptr + c, mask=mask, other=0.0).to(tl.float32)
                xs = (x + r).to(RO.dtype.element_ty)
                tl.store(ro_ptr + c, xs, mask=mask)
                x = xs.to(tl.float32)
            if RMS:
                acc += x * x
            else:
                acc += x
        if HAS_RESIDUAL:
            # later passes read residual_out back: make this program's stores visible to all
            # of its threads first
            tl.debug_barrier()
            src_ptr = ro_ptr
        else:
            src_ptr = x_ptr
        if RMS:
            mean = 0.0
            var = tl.sum(acc, axis=0) / N
        else:
            mean = tl.sum(acc, axis=0) / N
            # pass 2: variance about the mean (two-pass: no cancellation when |mean| >> std)
            acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = c < N
                x = tl.load(src_ptr + c, mask=mask, other=0.0).to(tl.float32)
                xc = tl.where(mask, x - mean, 0.0)
                acc2 += xc * xc
            var = tl.sum(acc2, axis=0) / N
        rstd = tl.rsqrt(var + eps)
        # pass 3: normalise
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = c < N
            x = tl.load(src_ptr + c, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd
            if HAS_WEIGHT:
                y = y * tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(B + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + c, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(
    # pointers
    DY, DRES, X, W, Mean, Rstd, DX, DW, DB,
    # sizes
    M, N, rows_per_program,
    # strides
    stride_dym, stride_dresm, stride_xm, stride_dxm, stride_dwg,
    # meta-parameters
    HAS_DRES: tl.constexpr, HAS_WEIGHT: tl.constexpr, PARTIALS: tl.constexpr,
    RMS: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    """DX for rows [g * rows_per_program, (g + 1) * rows_per_program) of program g, and that
    group's partial dW/dB as row g of DW/DB (G, N) float32."""
    group = tl.program_id(0)
    row_start = group * rows_per_program
    cols = tl.arange(0, BLOCK_N)
    dw_ptr = DW + group.to(tl.int64) * stride_dwg
    db_ptr = DB + group.to(tl.int64) * stride_dwg
    if SINGLE_BLOCK:
        col_mask = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in range(0, rows_per_program):
            row = row_start + i
            # the last group may be short: its missing rows are masked out (all loads give 0,
            # nothing is stored, nothing is added to dW/dB)
            row_ok = row < M
            row64 = row.to(tl.int64)
            mask = col_mask & row_ok
            x = tl.load(X + row64 * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row64 * stride_dym + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(Rstd + row, mask=row_ok, other=0.0)
            if RMS:
                xhat = x * rstd
            else:
                mean = tl.load(Mean + row, mask=row_ok, other=0.0)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            if HAS_WEIGHT:
                g = dy * w
            else:
                g = dy
            c2 = tl.sum(g * xhat, axis=0) / N
            if RMS:
                dx = (g - xhat * c2) * rstd
            else:
                c1 = tl.sum(g, axis=0) / N
                dx = (g - (xhat * c2 + c1)) * rstd
            if HAS_DRES:
                dx += tl.load(DRES + row64 * stride_dresm + cols, mask=mask, other=0.0).to(
                    tl.float32)
            tl.store(DX + row64 * stride_dxm + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if PARTIALS:
                dw += dy * xhat
                db += dy
        if PARTIALS:
            tl.store(dw_ptr + cols, dw, mask=col_mask)
            tl.store(db_ptr + cols, db, mask=col_mask)
    else:
        for i in range(0, rows_per_program):
            row = row_start + i
            row_ok = row < M
            row64 = row.to(tl.int64)
            x_ptr = X + row64 * stride_xm
            dy_ptr = DY + row64 * stride_dym
            rstd = tl.load(Rstd + row, mask=row_ok, other=0.0)
            if RMS:
                mean = 0.0
            else:
                mean = tl.load(Mean + row, mask=row_ok, other=0.0)
            # pass 1: row sums; this group's dW/dB partial row (zero-initialised, owned by this
            # program only) is updated in place on the way
            acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = (c < N) & row_ok
                x = tl.load(x_ptr + c, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + c, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                if HAS_WEIGHT:
                    g = dy * tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
                else:
                    g = dy
                acc1 += g
                acc2 += g * xhat
                if PARTIALS:
                    tl.store(dw_ptr + c, tl.load(dw_ptr + c, mask=mask, other=0.0) + dy * xhat,
                             mask=mask)
                    tl.store(db_ptr + c, tl.load(db_ptr + c, mask=mask, other=0.0) + dy,
                             mask=mask)
            c2 = tl.sum(acc2, axis=0) / N
            if RMS:
                c1 = 0.0
            else:
                c1 = tl.sum(acc1, axis=0) / N
            # pass 2: dx
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = (c < N) & row_ok
                x = tl.load(x_ptr + c, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + c, mask=mask, other=0.0).to(tl.float32)
                xhat = (x - mean) * rstd
                if HAS_WEIGHT:
                    g = dy * tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
                else:
                    g = dy
                dx = (g - (xhat * c2 + c1)) * rstd
                if HAS_DRES:
                    dx += tl.load(DRES + row64 * stride_dresm + c, mask=mask, other=0.0).to(
                        tl.float32)
                tl.store(DX + row64 * stride_dxm + c, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _sum_partials_kernel(
    P, OUT,  # pointers
    G, N,  # sizes
    stride_pg,  # strides
    BLOCK_N: tl.constexpr,
):
    """OUT[n] = sum_g P[g, n], summed in g order (bitwise repeatable); P (G, N) float32."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g in range(0, G):
        acc += tl.load(P + g * stride_pg + cols, mask=mask, other=0.0)
    tl.store(OUT + cols, acc.to(OUT.dtype.element_ty), mask=mask)


@functools.cache
def _num_groups(device_index: int | None, device_type: str) -> int:
    if device_type == "cuda":
        # a few programs per SM keep every SM busy on the dx work; the partial buffer stays
        # small (groups x N float32) and the final sum short
        return 4 * torch.cuda.get_device_properties(device_index).multi_processor_count
    return 8  # the interpreter runs programs one after another: few long programs are cheapest


def _check_rows(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"{name} must be 2-D with stride(1) == 1, got shape {tuple(t.shape)} "
                         f"and strides {t.stride()}")


def layer_norm_fwd(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """input/residual (M, N) row-strided, weight/bias (N,) -> out (M, N), residual_out (M, N) or
    (0,), mean (M,) float32 (zeros for rms), rstd (M,) float32."""
    _check_rows(input, "input")
    M, N = input.shape
    out = torch.empty((M, N), dtype=input.dtype, device=input.device)
    if residual is not None:
        _check_rows(residual, "residual")
        residual_out = torch.empty((M, N), dtype=input.dtype, device=input.device)
    else:
        residual_out = input.new_empty((0,))
    mean = torch.empty((M,), dtype=torch.float32, device=input.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=input.device)
    if M == 0:
        return out, residual_out, mean, rstd
    block_n = triton.next_power_of_2(max(N, 1))
    single = block_n <= _MAX_FUSED_FWD
    if not single:
        block_n = _LOOP_BLOCK
    # unused pointers get a valid tensor: Triton needs a real pointer argument
    r = residual if residual is not None else input
    ro = residual_out if residual is not None else out
    w = weight if weight is not None else input
    b = bias if bias is not None else input
    with _on_device(input):
        _layer_norm_fwd_kernel[(M,)](
            input, r, w, b, out, ro, mean, rstd,
            N,
            input.stride(0), r.stride(0), out.stride(0), ro.stride(0),
            eps,
            HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, RMS=rms, BLOCK_N=block_n, SINGLE_BLOCK=single,
            num_warps=_num_warps(block_n),
        )
    return out, residual_out, mean, rstd


def layer_norm_bwd(
    grad_out: torch.Tensor,
    grad_residual_out: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_out/x (M, N) row-strided, mean/rstd (M,) float32 -> grad_input (M, N),
    grad_weight (N,) or (0,), grad_bias (N,) or (0,) in weight/bias dtypes."""
    _check_rows(grad_out, "grad_out")
    _check_rows(x, "x")
    M, N = x.shape
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    has_dres = grad_residual_out is not None and grad_residual_out.numel() > 0
    if has_dres:
        _check_rows(grad_residual_out, "grad_residual_out")
    partials = weight is not None or bias is not None
    groups = max(1, min(M, _num_groups(x.device.index, x.device.type)))
    block_n = triton.next_power_of_2(max(N, 1))
    single = block_n <= _MAX_FUSED_BWD
    if not single:
        block_n = _LOOP_BLOCK
    if partials:
        # the looping path accumulates into the buffer in place, so it starts from zeros
        alloc = torch.empty if single else torch.zeros
        dw_part = alloc((groups, N), dtype=torch.float32, device=x.device)
        db_part = alloc((groups, N), dtype=torch.float32, device=x.device)
    else:
        dw_part = db_part = mean  # never touched
    dres = grad_residual_out if has_dres else grad_out
    w = weight if weight is not None else x
    with _on_device(x):
        if M > 0:
            _layer_norm_bwd_kernel[(groups,)](
                grad_out, dres, x, w, mean, rstd, dx, dw_part, db_part,
                M, N, triton.cdiv(M, groups),
                grad_out.stride(0), dres.stride(0), x.stride(0), dx.stride(0),
                dw_part.stride(0) if partials else 0,
                HAS_DRES=has_dres, HAS_WEIGHT=weight is not None, PARTIALS=partials, RMS=rms,
                BLOCK_N=block_n, SINGLE_BLOCK=single, num_warps=_num_warps_bwd(block_n),
            )

        def reduce(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            res = torch.empty((N,), dtype=like.dtype, device=x.device)
            if M == 0:
                return res.zero_()
            block = min(1024, triton.next_power_of_2(max(N, 1)))
            _sum_partials_kernel[(triton.cdiv(N, block),)](
                part, res, groups, N, part.stride(0), BLOCK_N=block, num_warps=4)
            return res

        dw = reduce(dw_part, weight) if weight is not None else x.new_empty((0,))
        db = reduce(db_part, bias) if bias is not None else x.new_empty((0,))
    return dx, dw, db
