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
from fastattn.triton.int8_gemm import _quantize_row

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


# ---------------------------------------------------------------------------------------------
# FlashAttention's layer_norm_fn / rms_norm_fn: the op fastattn::layer_norm_fused_fwd/bwd
# (csrc/fastattn.cpp has the contract). Register-resident rows only (N <= _MAX_FUSED_BWD, so
# that the backward of any forward fits too); the op layer refuses longer rows for this backend.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _layer_norm_fused_fwd_kernel(
    # pointers
    X, X1, R, RS, W, B, W1, B1, Y, Y1, RO, Mask, Mask1, QScale, Mean, Rstd,
    # sizes
    N,
    # strides
    stride_xm, stride_x1m, stride_rm,
    # scalars
    eps, offset, dropout_p, keep_scale, seed,
    # meta-parameters
    HAS_X1: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_ROWSCALE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_W1: tl.constexpr,
    HAS_B1: tl.constexpr, DROPOUT: tl.constexpr, QUANTIZE: tl.constexpr,
    STORE_RESIDUAL: tl.constexpr, RMS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """x' = dropout(X[m] * RS[m]) (+ dropout(X1[m])) (+ R[m]) -> RO[m] (rounded to RO's dtype);
    Y[m] = norm(x') * (offset + W) + B (int8 + QScale[m] when QUANTIZE), Y1[m] with W1/B1."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    elem = row * N + cols  # element index: the dropout counter and the contiguous outputs' offset
    x = tl.load(X + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_ROWSCALE:
        x = x * tl.load(RS + row).to(tl.float32)
    if DROPOUT:
        keep = tl.rand(seed, elem) >= dropout_p
        x = tl.where(keep, x * keep_scale, 0.0)
        tl.store(Mask + elem, keep, mask=mask)
    if HAS_X1:
        x1 = tl.load(X1 + row * stride_x1m + cols, mask=mask, other=0.0).to(tl.float32)
        if DROPOUT:
            keep1 = tl.rand(seed + 1, elem) >= dropout_p
            x1 = tl.where(keep1, x1 * keep_scale, 0.0)
            tl.store(Mask1 + elem, keep1, mask=mask)
        x = x + x1
    if HAS_RESIDUAL:
        x = x + tl.load(R + row * stride_rm + cols, mask=mask, other=0.0).to(tl.float32)
    if STORE_RESIDUAL:
        # rounded once to the residual dtype: residual_out, and what is normalised
        xs = x.to(RO.dtype.element_ty)
        tl.store(RO + elem, xs, mask=mask)
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
    xhat = xc * rstd
    y = xhat
    if HAS_WEIGHT:
        y = y * (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    if QUANTIZE:
        # quantize_per_token of the output as the input's dtype holds it
        y = y.to(X.dtype.element_ty).to(tl.float32)
        y = tl.where(mask, y, 0.0)
        absmax = tl.max(tl.abs(y), axis=0)
        nan_count = tl.sum((y != y).to(tl.int32), axis=0)
        absmax = tl.where(nan_count > 0, float("nan"), absmax)
        inv = tl.where(absmax > 0, tl.math.div_rn(1.0, absmax) * 127.0, 0.0)
        tl.store(QScale + row, tl.math.div_rn(absmax, 127.0))
        tl.store(Y + elem, _quantize_row(y, inv), mask=mask)
    else:
        tl.store(Y + elem, y.to(Y.dtype.element_ty), mask=mask)
    if HAS_W1:
        y1 = xhat * (tl.load(W1 + cols, mask=mask, other=0.0).to(tl.float32) + offset)
        if HAS_B1:
            y1 = y1 + tl.load(B1 + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y1 + elem, y1.to(Y1.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _layer_norm_fused_bwd_kernel(
    # pointers
    DY, DY1, DRES, X, W, W1, Mean, Rstd, Mask, Mask1, RS, DX, DX1, DR, DW, DB, DW1, DB1,
    # sizes
    M, N, rows_per_program,
    # strides
    stride_dym, stride_dy1m, stride_dresm, stride_xm, stride_dwg,
    # scalars
    offset, keep_scale,
    # meta-parameters
    HAS_DY1: tl.constexpr, HAS_DRES: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    DROPOUT: tl.constexpr, DROPOUT1: tl.constexpr, HAS_X1: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_ROWSCALE: tl.constexpr, PARTIALS: tl.constexpr,
    RMS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """For the rows of program g: d = dL/dx' (+ DRES) -> DR (the residual's gradient),
    d * Mask1 * keep_scale -> DX1, d * Mask * keep_scale * RS -> DX; the group's dW/dB/dW1/dB1
    partials as row g of DW/DB/DW1/DB1 (G, N) float32."""
    group = tl.program_id(0)
    row_start = group * rows_per_program
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    if HAS_DY1:
        w1 = tl.load(W1 + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    dw1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    db1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(0, rows_per_program):
        row = row_start + i
        row_ok = row < M
        row64 = row.to(tl.int64)
        mask = col_mask & row_ok
        elem = row64 * N + cols
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
        if HAS_DY1:
            dy1 = tl.load(DY1 + row64 * stride_dy1m + cols, mask=mask, other=0.0).to(tl.float32)
            g = g + dy1 * w1
            dw1 += dy1 * xhat
            db1 += dy1
        c2 = tl.sum(g * xhat, axis=0) / N
        if RMS:
            d = (g - xhat * c2) * rstd
        else:
            c1 = tl.sum(g, axis=0) / N
            d = (g - (xhat * c2 + c1)) * rstd
        if HAS_DRES:
            d += tl.load(DRES + row64 * stride_dresm + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            tl.store(DR + elem, d.to(DR.dtype.element_ty), mask=mask)
        if HAS_X1:
            d1 = d
            if DROPOUT1:
                keep1 = tl.load(Mask1 + elem, mask=mask, other=0).to(tl.int1)
                d1 = tl.where(keep1, d1 * keep_scale, 0.0)
            tl.store(DX1 + elem, d1.to(DX1.dtype.element_ty), mask=mask)
        if DROPOUT:
            keep = tl.load(Mask + elem, mask=mask, other=0).to(tl.int1)
            d = tl.where(keep, d * keep_scale, 0.0)
        if HAS_ROWSCALE:
            d = d * tl.load(RS + row, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(DX + elem, d.to(DX.dtype.element_ty), mask=mask)
        if PARTIALS:
            dw += dy * xhat
            db += dy
    if PARTIALS:
        tl.store(DW + group.to(tl.int64) * stride_dwg + cols, dw, mask=col_mask)
        tl.store(DB + group.to(tl.int64) * stride_dwg + cols, db, mask=col_mask)
        tl.store(DW1 + group.to(tl.int64) * stride_dwg + cols, dw1, mask=col_mask)
        tl.store(DB1 + group.to(tl.int64) * stride_dwg + cols, db1, mask=col_mask)


# rows of up to this many elements are taken by the fused kernels (register-resident forward
# and backward; see _MAX_FUSED_BWD)
MAX_FUSED_N = _MAX_FUSED_BWD


def layer_norm_fused_fwd(
    input: torch.Tensor, weight, bias, residual, x1, weight1, bias1, rowscale,
    eps: float, rms: bool, offset: float, dropout_p: float, seed: int,
    residual_in_fp32: bool, quantize: bool,
):
    """input/residual/x1 (M, N) row-strided, weight.. (N,), rowscale (M,) -> out, out1,
    residual_out, dropout_mask, dropout_mask1 (M, N) (empty when absent), mean, rstd (M,),
    out_scale (M,) or empty: the C++ op fastattn::layer_norm_fused_fwd on rows."""
    _check_rows(input, "input")
    M, N = input.shape
    dev = input.device
    def none():  # a fresh empty tensor per absent output: outputs may not alias
        return input.new_empty((0,))

    res_dtype = (torch.float32 if residual_in_fp32
                 else residual.dtype if residual is not None else input.dtype)
    out = torch.empty((M, N), dtype=torch.int8 if quantize else input.dtype, device=dev)
    out1 = torch.empty((M, N), dtype=input.dtype, device=dev) if weight1 is not None else none()
    dropout = dropout_p > 0.0
    # x' is the input itself when nothing is combined: no copy (residual_out empty)
    combined = (residual is not None or x1 is not None or rowscale is not None or dropout
                or res_dtype != input.dtype)
    residual_out = torch.empty((M, N), dtype=res_dtype, device=dev) if combined else none()
    mask = torch.empty((M, N), dtype=torch.bool, device=dev) if dropout else none()
    mask1 = (torch.empty((M, N), dtype=torch.bool, device=dev) if dropout and x1 is not None
             else none())
    mean = (torch.zeros if rms else torch.empty)((M,), dtype=torch.float32, device=dev)
    rstd = torch.empty((M,), dtype=torch.float32, device=dev)
    scale = torch.empty((M if quantize else 0,), dtype=torch.float32, device=dev)
    if M == 0:
        return out, out1, residual_out, mask, mask1, mean, rstd, scale
    for t, name in ((residual, "residual"), (x1, "x1")):
        if t is not None:
            _check_rows(t, name)
    block_n = triton.next_power_of_2(max(N, 1))
    if block_n > triton.next_power_of_2(MAX_FUSED_N):
        raise ValueError(f"rows of {N} elements: the fused Triton kernels take at most "
                         f"{MAX_FUSED_N}")
    r = residual if residual is not None else input
    xx1 = x1 if x1 is not None else input
    rs = rowscale.contiguous() if rowscale is not None else mean
    w = weight if weight is not None else input
    b = bias if bias is not None else input
    w1 = weight1 if weight1 is not None else input
    b1 = bias1 if bias1 is not None else input
    with _on_device(input):
        _layer_norm_fused_fwd_kernel[(M,)](
            input, xx1, r, rs, w, b, w1, b1, out, out1 if weight1 is not None else out,
            residual_out if combined else input, mask if dropout else mean, mask1 if mask1.numel() else mean,
            scale if quantize else mean, mean, rstd,
            N,
            input.stride(0), xx1.stride(0), r.stride(0),
            eps, offset, dropout_p, 1.0 / (1.0 - dropout_p), seed,
            HAS_X1=x1 is not None, HAS_RESIDUAL=residual is not None,
            HAS_ROWSCALE=rowscale is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, HAS_W1=weight1 is not None, HAS_B1=bias1 is not None,
            DROPOUT=dropout, QUANTIZE=quantize, STORE_RESIDUAL=combined, RMS=rms,
            BLOCK_N=block_n,
            num_warps=_num_warps(block_n),
        )
    return out, out1, residual_out, mask, mask1, mean, rstd, scale


def layer_norm_fused_bwd(
    grad_out, grad_out1, grad_residual_out, x, weight, weight1, mask, mask1, rowscale,
    mean, rstd, offset: float, dropout_p: float, rms: bool, has_bias: bool, has_bias1: bool,
    has_x1: bool, input_dtype: torch.dtype, residual_dtype: torch.dtype | None,
):
    """The C++ op fastattn::layer_norm_fused_bwd on (M, N) rows: grad_input, grad_residual,
    grad_x1 (M, N) (empty when absent), grad_weight, grad_bias, grad_weight1, grad_bias1 (N,)
    float32 (empty when not wanted)."""
    _check_rows(grad_out, "grad_out")
    _check_rows(x, "x")
    M, N = x.shape
    dev = x.device
    def empty():  # a fresh empty tensor per absent output: outputs may not alias
        return torch.empty((0,), dtype=input_dtype, device=dev)
    dx = torch.empty((M, N), dtype=input_dtype, device=dev)
    dres = (torch.empty((M, N), dtype=residual_dtype, device=dev) if residual_dtype is not None
            else empty())
    dx1 = torch.empty((M, N), dtype=input_dtype, device=dev) if has_x1 else empty()
    has_dy1 = grad_out1 is not None and grad_out1.numel() > 0
    has_dres = grad_residual_out is not None and grad_residual_out.numel() > 0
    dropout = dropout_p > 0.0 and mask is not None and mask.numel() > 0
    dropout1 = dropout_p > 0.0 and mask1 is not None and mask1.numel() > 0
    wanted = (weight is not None, has_bias, weight1 is not None, has_bias1)
    partials = any(wanted)
    groups = max(1, min(M, _num_groups(dev.index, dev.type)))
    block_n = triton.next_power_of_2(max(N, 1))
    parts = [torch.empty((groups, N), dtype=torch.float32, device=dev) if partials else mean
             for _ in range(4)]
    if M > 0:
        with _on_device(x):
            _layer_norm_fused_bwd_kernel[(groups,)](
                grad_out, grad_out1 if has_dy1 else grad_out,
                grad_residual_out if has_dres else grad_out, x,
                weight if weight is not None else x, weight1 if weight1 is not None else x,
                mean, rstd, mask if dropout else mean, mask1 if dropout1 else mean,
                rowscale.contiguous() if rowscale is not None else mean,
                dx, dx1 if has_x1 else dx, dres if residual_dtype is not None else dx,
                *parts,
                M, N, triton.cdiv(M, groups),
                grad_out.stride(0), grad_out1.stride(0) if has_dy1 else 0,
                grad_residual_out.stride(0) if has_dres else 0, x.stride(0),
                parts[0].stride(0) if partials else 0,
                offset, 1.0 / (1.0 - dropout_p),
                HAS_DY1=has_dy1, HAS_DRES=has_dres, HAS_WEIGHT=weight is not None,
                DROPOUT=dropout, DROPOUT1=dropout1, HAS_X1=has_x1,
                HAS_RESIDUAL=residual_dtype is not None, HAS_ROWSCALE=rowscale is not None,
                PARTIALS=partials, RMS=rms, BLOCK_N=block_n,
                num_warps=_num_warps_bwd(block_n),
            )

    def reduce(k: int) -> torch.Tensor:
        if not wanted[k]:
            return torch.empty((0,), dtype=torch.float32, device=dev)
        res = torch.zeros((N,), dtype=torch.float32, device=dev)
        if M == 0 or N == 0:
            return res
        block = min(1024, triton.next_power_of_2(max(N, 1)))
        with _on_device(x):
            _sum_partials_kernel[(triton.cdiv(N, block),)](
                parts[k], res, groups, N, parts[k].stride(0), BLOCK_N=block, num_warps=4)
        return res

    return dx, dres, dx1, reduce(0), reduce(1), reduce(2), reduce(3)
