"""int8 Triton kernels: per-token quantization, the W8A8 int8 GEMM with a fused dequantizing
epilogue, and the weight-only int8 linear for small M (decoding).

- ``_quantize_per_token_kernel``: one program per row; absmax in float32, then
  q = clamp(rne(x * inv), -127, 127) with inv = (1 / absmax) * 127 rounded exactly as
  fastattn.reference computes it (torch evaluates ``127.0 / t`` as a reciprocal and a multiply).
  Launched with ``enable_fp_fusion=False`` so ``x * inv`` is rounded before it is rounded to an
  integer (an FMA into the round-to-integer add would skip that rounding and flip ties).
- ``_int8_gemm_kernel``: a (M, K) int8 @ b (N, K).T int8 with ``tl.dot`` into an int32
  accumulator (mma/wgmma s8 on Ampere/Hopper), then ``acc * a_scale[m] * b_scale[n] + bias[n]``
  in float32 and the cast to the output dtype in the same kernel. Tiles are autotuned per M
  regime: decode-sized M gets short BLOCK_M tiles and more programs along N, prefill-sized M the
  large 128x128/128x256 tiles.
- ``_int8_weight_only_kernel``: out = (x @ w.T) * w_scale + bias for small M: int8 weights are
  converted to x's dtype in registers (exact: |w| <= 127) and multiplied on the tensor cores with
  a float32 accumulator; the kernel is bound by reading the int8 weights once.

The launchers take and return exactly what the C++ ops ``fastattn::quantize_per_token``,
``fastattn::int8_gemm`` and ``fastattn::int8_weight_only_linear`` do (csrc/fastattn.cpp).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastattn.triton._interpret import interpret, prepare
from fastattn.triton._launch import autotune_enabled, device_guard, folded_id, grid_folded

prepare()

# 1.5 * 2**23: for |y| < 2**22, (y + C) - C is y rounded to an integer, ties to even (float32).
_RNE_MAGIC = tl.constexpr(12582912.0)
# Rows up to this length are quantized from registers in one pass; longer rows are read twice.
_QUANT_ONE_PASS_MAX = 8192
_QUANT_LOOP_BLOCK = 2048


# ---------------------------------------------------------------------------------------------
# per-token quantization
# ---------------------------------------------------------------------------------------------
@triton.jit
def _quantize_row(x, inv):
    y = x * inv
    y = (y + _RNE_MAGIC) - _RNE_MAGIC
    y = tl.where(y == y, y, 0.0)  # NaN (0 * inf, NaN input) -> 0, as torch's float -> int8
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    return y.to(tl.int8)


@triton.jit
def _quantize_per_token_kernel(
    # pointers
    X, Q, Scale,
    # sizes
    K,
    # strides
    stride_xm, stride_qm,
    # meta-parameters
    BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr,
):
    """Q[m] = rne(X[m] * 127 / max|X[m]|) int8, Scale[m] = max|X[m]| / 127; X (M, K) row-strided."""
    row = tl.program_id(0).to(tl.int64)
    x_ptr = X + row * stride_xm
    q_ptr = Q + row * stride_qm
    cols = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        mask = cols < K
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=0)
        nan_count = tl.sum((x != x).to(tl.int32), axis=0)
    else:
        run_max = tl.zeros([BLOCK_K], dtype=tl.float32)
        run_nan = tl.zeros([BLOCK_K], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + cols < K
            x = tl.load(x_ptr + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            run_max = tl.maximum(run_max, tl.abs(x))
            run_nan += (x != x).to(tl.int32)
        absmax = tl.max(run_max, axis=0)
        nan_count = tl.sum(run_nan, axis=0)
    absmax = tl.where(nan_count > 0, float("nan"), absmax)
    inv = tl.where(absmax > 0, tl.math.div_rn(1.0, absmax) * 127.0, 0.0)
    tl.store(Scale + row, tl.math.div_rn(absmax, 127.0))
    if ONE_PASS:
        tl.store(q_ptr + cols, _quantize_row(x, inv), mask=cols < K)
    else:
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + cols < K
            x = tl.load(x_ptr + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_ptr + k0 + cols, _quantize_row(x, inv), mask=mask)


def _quant_warps(block: int) -> int:
    return min(16, max(1, block // 512))


@device_guard
def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float16/bfloat16/float32 -> (q int8 (M, K), scale float32 (M,))."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return q, scale
    one_pass = K <= _QUANT_ONE_PASS_MAX
    block = triton.next_power_of_2(max(K, 16)) if one_pass else _QUANT_LOOP_BLOCK
    num_warps = 1 if interpret() else _quant_warps(block)
    _quantize_per_token_kernel[(M,)](
        x, q, scale, K, x.stride(0), q.stride(0),
        BLOCK_K=block, ONE_PASS=one_pass, num_warps=num_warps, enable_fp_fusion=False,
    )
    return q, scale


# ---------------------------------------------------------------------------------------------
# int8 GEMM with the fused dequantizing epilogue
# ---------------------------------------------------------------------------------------------
def _m_bucket(M: int) -> int:
    """Autotuning key for M: tiles are tuned per regime, not per exact token count."""
    return min(triton.next_power_of_2(max(M, 1)), 4096)


def _gemm_configs() -> list[triton.Config]:
    if interpret():  # the interpreter runs numpy per program: one small config, no tuning
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
                              num_warps=4, num_stages=1)]
    configs = []
    # decode / small prefill (M <= 64): short M tiles, many programs along N, deep K pipelining.
    # K tiles of 256 over 2048+ outputs take 8 warps: at 4 warps the tensor-core operands of a
    # 256-deep step sit at ptxas' 255 registers a thread and spill (sm_80/sm_90a, every
    # feature of the epilogue on: 64x64 20-32 B, 64x128 80-120 B, 16x128 344 B on sm_90a).
    for bm in (16, 32, 64):
        for bn in (64, 128):
            for bk in (128, 256):
                warps = 8 if bk == 256 and bm * bn >= 2048 else 4
                for stages in (3, 4, 5):
                    configs.append(triton.Config(
                        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                        num_warps=warps, num_stages=stages))
    # prefill (large M): the int8 tensor-core tiles of cuBLASLt-style kernels on A100/H100.
    # 128x128 and 128x64 run 8 warps (at 4, 128 accumulators a thread spilled 4-288 B); the
    # 128x256 / 256x128 tiles (128 accumulators at 8 warps) take K steps of 64 (at 128 they
    # spilled 16-248 B)
    for bm, bn, bk, warps, stages in (
        (128, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 128, 4, 4),
        (128, 64, 128, 8, 4), (64, 256, 128, 8, 3),
    ):
        configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                     num_warps=warps, num_stages=stages))
    return configs


# Opt-in shared memory per block by compute capability major (CUDA C Programming Guide): 163 KB
# on sm_80 (A100), 227 KB on sm_90 (H100/H200); the device's own figure is used when it is known.
_SMEM_OPTIN = {8: 166_912, 9: 232_448}


def _smem_limit(t: torch.Tensor) -> int:
    if not t.is_cuda:
        return 1 << 30  # the interpreter: no limit
    props = torch.cuda.get_device_properties(t.device)
    return getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024


def _gemm_smem_kw(kw: dict, stages: int) -> int:
    """Shared memory of the int8 GEMM: num_stages buffers of the A and B int8 tiles (the
    epilogue reuses them)."""
    return stages * kw["BLOCK_K"] * (kw["BLOCK_M"] + kw["BLOCK_N"])


def _gemm_smem(c: triton.Config) -> int:
    return _gemm_smem_kw(c.kwargs, c.num_stages)


def gemm_candidates(major: int) -> list[triton.Config]:
    """The int8 GEMM configs that can run on compute capability ``major`` (8 or 9)."""
    return [c for c in _gemm_configs() if _gemm_smem(c) <= _SMEM_OPTIN[major]]


def _prune_gemm_configs(configs, named_args, **kwargs):
    """Keep tiles that fit the device and the problem: BLOCK_M no larger than the M regime needs
    (a 128-row tile for 16 tokens wastes 7/8 of the tensor-core work), and for M > 64 only the
    prefill tiles."""
    m_bucket = named_args["M_BUCKET"]
    K = named_args["K"]
    smem = _smem_limit(named_args["A"])
    kept = []
    for c in configs:
        if _gemm_smem(c) > smem:
            continue
        bm, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]
        if bm > max(16, m_bucket):
            continue
        if m_bucket > 64 and bm < 64:
            continue
        if bk > max(32, triton.next_power_of_2(K)):
            continue
        kept.append(c)
    if not kept:
        kept = [min(configs, key=_gemm_smem)]
    return kept if autotune_enabled() else kept[:1]


@triton.autotune(
    configs=_gemm_configs(),
    key=["M_BUCKET", "N", "K", "HAS_A_SCALE", "HAS_B_SCALE", "HAS_BIAS", "DEQUANT"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
)
@triton.jit
def _int8_gemm_kernel(
    # pointers
    A, B, C, AScale, BScale, Bias,
    # sizes
    M, N, K, M_BUCKET,
    # strides
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    # meta-parameters
    HAS_A_SCALE: tl.constexpr, HAS_B_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    DEQUANT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C (M, N) = A (M, K) int8 @ B (N, K).T int8: int32, or dequantized (* AScale[m] * BScale[n]
    + Bias[n]) and cast to C's dtype."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row-tiles share the B column tiles while they are in L2
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # rows/columns past M/N wrap around (loads stay in bounds without masks) and are not stored.
    # The loop carries only the scalar K offset: the tile addresses are rebuilt each step from a
    # row (column) base and the K range. A (BLOCK_K, BLOCK_N) tensor of 64-bit pointers carried
    # across iterations is BLOCK_K * BLOCK_N / (32 * num_warps) values a thread (256 for a
    # 256 x 128 B tile at 4 warps): ptxas spilled 3-15 KB a thread for them.
    a_rows = A + (offs_m % M).to(tl.int64)[:, None] * stride_am
    b_cols = B + (offs_n % N).to(tl.int64)[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(a_rows + ks[None, :].to(tl.int64) * stride_ak, mask=ks[None, :] < K, other=0)
        b = tl.load(b_cols + ks[:, None].to(tl.int64) * stride_bk, mask=ks[:, None] < K, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)

    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_ptrs = (C + offs_m[:, None].to(tl.int64) * stride_cm
              + offs_n[None, :].to(tl.int64) * stride_cn)
    if DEQUANT:
        # the reference's order of float32 operations: ((acc * a_scale) * b_scale) + bias
        out = acc.to(tl.float32)
        if HAS_A_SCALE:
            out = out * tl.load(AScale + offs_m, mask=offs_m < M, other=0.0).to(tl.float32)[:, None]
        if HAS_B_SCALE:
            out = out * tl.load(BScale + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            out = out + tl.load(Bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptrs, out.to(C.dtype.element_ty), mask=c_mask)
    else:
        tl.store(c_ptrs, acc, mask=c_mask)


def _vector(t: torch.Tensor | None) -> torch.Tensor | None:
    # scales and bias are read in their own float dtype and widened in registers: no conversion
    # kernel launched per call (it would cost as much as a decode-sized GEMM's epilogue)
    return None if t is None else t.contiguous()


@device_guard
def int8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor | None,
    b_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype | None,
) -> torch.Tensor:
    """a int8 (M, K), b int8 (N, K) -> a @ b.T: int32 (M, N) without scales, else dequantized in
    out_dtype (default float32). Arguments are validated by the op layer."""
    M, K = a.shape
    N = b.shape[0]
    dequant = a_scale is not None or b_scale is not None
    dtype = (out_dtype or torch.float32) if dequant else torch.int32
    c = torch.empty((M, N), dtype=dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        a = a.new_zeros((M, 1))
        b = b.new_zeros((N, 1))
        K = 1
    a_scale, b_scale, bias = _vector(a_scale), _vector(b_scale), _vector(bias)
    dummy = c  # never read: the HAS_* flags are constexpr
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _int8_gemm_kernel[grid](
        a, b, c,
        a_scale if a_scale is not None else dummy,
        b_scale if b_scale is not None else dummy,
        bias if bias is not None else dummy,
        M, N, K, _m_bucket(M),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        HAS_A_SCALE=a_scale is not None, HAS_B_SCALE=b_scale is not None,
        HAS_BIAS=bias is not None, DEQUANT=dequant, enable_fp_fusion=False,
    )
    return c


# ---------------------------------------------------------------------------------------------
# weight-only int8 linear (small M)
# ---------------------------------------------------------------------------------------------
def _weight_only_configs() -> list[triton.Config]:
    if interpret():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    # decoding reads N * K int8 bytes once: many programs along N (132 SMs on H100/H200) and long
    # K tiles keep enough loads in flight for HBM bandwidth (16-bit x: tensor-core dot)
    configs = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn in (16, 32, 64)
        for bk in (128, 256, 512)
        for w in (4, 8)
        for s in (3, 4)
        if bn * bk <= 16384
    ]
    # float32 x multiplies in full precision (FMA dot, no tensor cores): its operands live in
    # registers, so K tiles stay short (ptxas -v on sm_90a/sm_80: no spills up to 32 x 64, 8 warps)
    configs += [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=8, num_stages=s)
        for bn in (16, 32)
        for bk in (32, 64)
        for s in (3, 4)
    ]
    return configs


def _weight_only_smem_kw(kw: dict, stages: int, x_bytes: int) -> int:
    """num_stages buffers of the x tile (BLOCK_M <= 32 rows) and the int8 weight tile, plus
    for float32 x the weight tile converted to float32 for the FMA product."""
    fp32_w = kw["BLOCK_K"] * kw["BLOCK_N"] * 4 if x_bytes == 4 else 0
    return stages * kw["BLOCK_K"] * (32 * x_bytes + kw["BLOCK_N"]) + fp32_w


def _weight_only_smem(c: triton.Config, x_bytes: int) -> int:
    return _weight_only_smem_kw(c.kwargs, c.num_stages, x_bytes)


def weight_only_candidates(major: int, fp32: bool) -> list[triton.Config]:
    """The weight-only configs that serve x in float32 (or 16-bit) on compute capability major."""
    x_bytes = 4 if fp32 else 2
    return [c for c in _weight_only_configs() if (c.kwargs["BLOCK_K"] <= 64) == fp32
            and _weight_only_smem(c, x_bytes) <= _SMEM_OPTIN[major]]


def _prune_weight_only_configs(configs, named_args, **kwargs):
    """float32 x takes the short-K FMA tiles, 16-bit x the long-K tensor-core tiles; tiles that
    do not fit the device's shared memory are dropped."""
    fp32 = named_args["FP32"]
    smem = _smem_limit(named_args["X"])
    x_bytes = named_args["X"].element_size()
    kept = [c for c in configs if (c.kwargs["BLOCK_K"] <= 64) == fp32
            and _weight_only_smem(c, x_bytes) <= smem]
    if not kept:
        kept = [min(configs, key=lambda c: _weight_only_smem(c, x_bytes))]
    return kept if autotune_enabled() else kept[:1]


@triton.autotune(
    configs=_weight_only_configs(),
    key=["M_BUCKET", "N", "K", "HAS_BIAS", "FP32", "INTERP_BF16"],
    prune_configs_by={"early_config_prune": _prune_weight_only_configs},
)
@triton.jit
def _int8_weight_only_kernel(
    # pointers
    X, W, WScale, Bias, Out,
    # sizes
    M, N, K, M_BUCKET,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    # meta-parameters
    HAS_BIAS: tl.constexpr, FP32: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Out (M, N) = (X (M, K) @ float(W (N, K)).T) * WScale[n] + Bias[n], float32 accumulation."""
    pid_m = folded_id()  # grid_folded(cdiv(N, BLOCK_N), cdiv(M, BLOCK_M))
    if pid_m * BLOCK_M >= M:
        return
    pid_n = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # only the scalar K offset is carried by the loop (see _int8_gemm_kernel)
    x_rows = X + (offs_m % M).to(tl.int64)[:, None] * stride_xm
    w_cols = W + (offs_n % N).to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        x = tl.load(x_rows + ks[None, :].to(tl.int64) * stride_xk, mask=ks[None, :] < K, other=0.0)
        w = tl.load(w_cols + ks[:, None].to(tl.int64) * stride_wk, mask=ks[:, None] < K, other=0)
        # int8 -> x's dtype is exact (|w| <= 127); float32 x multiplies in full precision (no TF32)
        if FP32 or INTERP_BF16:  # (the interpreter's dot misreads bfloat16 operands)
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    out = acc * tl.load(WScale + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        out = out + tl.load(Bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    o_ptrs = (Out + offs_m[:, None].to(tl.int64) * stride_om
              + offs_n[None, :].to(tl.int64) * stride_on)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@device_guard
def int8_weight_only_linear(
    x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
) -> torch.Tensor:
    """x (M, K) float, w_int8 (N, K) int8, w_scale (N,) -> (M, N) in x's dtype."""
    M, K = x.shape
    N = w_int8.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        x = x.new_zeros((M, 1))
        w_int8 = w_int8.new_zeros((N, 1))
        K = 1
    w_scale, bias = _vector(w_scale), _vector(bias)
    block_m = 16 if M <= 16 else 32  # tl.dot needs >= 16 rows; small M is the target
    grid = lambda meta: grid_folded(triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, block_m))
    _int8_weight_only_kernel[grid](
        x, w_int8, w_scale, bias if bias is not None else w_scale, out,
        M, N, K, _m_bucket(M),
        x.stride(0), x.stride(1), w_int8.stride(0), w_int8.stride(1),
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, FP32=x.dtype == torch.float32,
        INTERP_BF16=interpret() and x.dtype == torch.bfloat16, BLOCK_M=block_m,
    )
    return out
