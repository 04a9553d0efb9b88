"""Triton attention kernels.

* ``attention_fwd`` / ``attention_bwd``: FlashAttention-2 style fused attention with the full
  semantics of ``fastattn::attention_fwd/bwd`` (csrc/fastattn.cpp): additive mask broadcast by
  strides, causal/sliding windows folded into (window_left, window_right, diag_offset), GQA,
  dropout from a counter-based RNG, empty rows (out 0, lse -inf, zero gradients), gradient into
  lse and into the mask.
* ``attention_kvcache``: decoding against a KV cache. New keys/values are appended in place by a
  small kernel (the sequence lengths are read on the device: no host synchronisation; with the
  rotary embedding it rotates k_new on the way and q into a copy the attention reads), then
  split-K flash-decoding computes partial (out, lse) per chunk of the cache and a combine kernel
  merges them.
* ``attention_varlen_fwd`` / ``attention_varlen_bwd``: packed variable-length sequences through
  the same forward / dK-dV / dQ kernels with ``VARLEN`` on (offsets and lengths per program from
  cu_seqlens).
* ``attention_dropout_mask``: the dropout keep mask those kernels draw (return_dropout_mask).

Layout of every kernel: pointers, scalars, strides (``stride_<tensor><dim>``), sizes, then
``tl.constexpr`` meta-parameters. Scores are kept in log2 units (pre-multiplied by log2(e)) so
the softmax uses exp2; lse is returned in natural log. Head dims are padded to a power of two
(HEAD_DIM) with load masks, so one compiled kernel covers e.g. 40, 80 and 111 without copies.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from fastattn.triton._interpret import interpret as triton_interpret
from fastattn.triton._interpret import prepare
from fastattn.triton._launch import autotune_enabled, device_guard, folded_id, grid_folded

prepare()

_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# ---------------------------------------------------------------------------------------------
# autotune configurations
# ---------------------------------------------------------------------------------------------
# Candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) per architecture family and head-dim class
# (the padded max(E, Ev) rounded up to 64/128/256), 1-3 per case: every candidate is a separate
# compile for each new autotune key; the first is the one FASTATTN_TRITON_AUTOTUNE=0 pins.
# tests/test_triton_resources.py compiles every candidate for sm_90a / sm_80 with every feature
# on and holds it to the shared-memory, register and spill limits. "_mask" lists serve 16-bit
# calls with an additive mask: the mask tile and its pointers cost ~60 registers a thread, which
# spilled every 64-key-wide Hopper tile at d=128, so they use 32-key tiles. "_fp32" lists serve
# float32 calls: 3xTF32 keeps Q (or K/V) twice in shared memory and triples the products, so
# the 16-bit tiles needed 188-270 KB or spilled 2-24 KB a thread; their small tiles spill at
# most ~270 B with mask, dropout and windows all on. There is none above E = 128 (the largest
# fitting tiles spilled 22 KB): such calls are refused for Triton and go to the CUDA kernels.
# Hopper wants 128-row M tiles (wgmma works on 64-row warpgroup tiles) and deep cp.async rings;
# Ampere has 164 KB of shared memory. The dK/dV kernel works on transposed tiles (keys on rows):
# its BLOCK_N is the MMA's M, and its dK + dV accumulators (BLOCK_N x 2 x head dim, fp32) bound
# it to small query tiles.
_FWD_TUNING = {
    "hopper": {64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4)],
               128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2)],
               256: [(128, 32, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2)]},
    "hopper_mask": {64: [(128, 64, 8, 3)],
                    128: [(128, 32, 8, 3), (128, 32, 8, 2)],
                    256: [(64, 32, 8, 2)]},
    "ampere": {64: [(128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
               128: [(128, 64, 8, 2), (64, 64, 4, 3)],
               256: [(64, 32, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2)]},
    "ampere_mask": {64: [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 2)],
                    128: [(128, 32, 8, 2), (64, 32, 4, 3)],
                    256: [(64, 32, 8, 2), (32, 32, 4, 2)]},
    "hopper_fp32": {64: [(128, 32, 8, 2), (64, 32, 4, 2)],
                    128: [(32, 32, 4, 2)]},
    "ampere_fp32": {64: [(128, 32, 8, 2), (64, 32, 4, 2)],
                    128: [(32, 32, 4, 2)]},
}
_DKDV_TUNING = {
    "hopper": {64: [(32, 128, 8, 2), (16, 128, 8, 3)],
               128: [(16, 128, 8, 2)],
               256: [(16, 32, 8, 2), (32, 32, 8, 2)]},
    "hopper_mask": {64: [(16, 64, 8, 2)],
                    128: [(16, 64, 8, 2)],
                    256: [(16, 32, 8, 2)]},
    "ampere": {64: [(32, 128, 8, 2), (32, 64, 8, 3), (16, 128, 8, 2)],
               128: [(32, 64, 8, 2), (16, 64, 8, 2)],
               256: [(16, 32, 8, 2), (32, 32, 8, 2)]},
    "ampere_mask": {64: [(32, 64, 8, 3)],
                    128: [(16, 32, 8, 2)],
                    256: [(16, 32, 8, 2)]},
    "hopper_fp32": {64: [(16, 32, 4, 2)],
                    128: [(16, 32, 8, 1)]},
    "ampere_fp32": {64: [(16, 32, 4, 2)],
                    128: [(16, 32, 8, 1)]},
}
_DQ_TUNING = {
    "hopper": {64: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 4)],
               128: [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
               256: [(16, 32, 4, 2), (32, 32, 8, 2)]},
    "hopper_mask": {64: [(128, 64, 8, 3)],
                    128: [(128, 32, 8, 3)],
                    256: [(32, 32, 4, 3)]},
    "ampere": {64: [(128, 32, 8, 3), (64, 32, 4, 3)],
               128: [(64, 64, 8, 2)],
               256: [(16, 32, 4, 2), (32, 32, 8, 2)]},
    "ampere_mask": {64: [(64, 32, 4, 3)],
                    128: [(64, 64, 8, 2), (64, 32, 4, 3)],
                    256: [(32, 32, 4, 2)]},
    "hopper_fp32": {64: [(32, 32, 4, 2)],
                    128: [(16, 32, 4, 2)]},
    "ampere_fp32": {64: [(32, 32, 4, 2)],
                    128: [(16, 32, 4, 2)]},
}
# Decoding streams the cache: BLOCK_M is fixed by the query rows of a kv group, only the key tile
# and the depth of the load ring matter (a deep ring keeps enough bytes in flight for HBM).
# the query rows of a kv group per program: up to 64, 32 in float32 (3xTF32 at 64 rows spilled
# 0.3-1.3 KB a thread even with 16-key tiles) and at head dims above 128 (64 rows spilled
# 0.8-3 KB with every 256-wide tile)
def _decode_max_block_m(fp32: bool, head_dim: int) -> int:
    return 32 if fp32 or head_dim > 128 else 64


_DECODE_TUNING = {
    "hopper": {64: [(None, 64, 4, 3), (None, 128, 4, 4), (None, 128, 8, 3)],
               128: [(None, 128, 8, 3)],
               # (None, 64, 4, 3) left: with the paged cache's table reads it spilled 648 B per
               # thread on sm_90a (bf16), past the resource test's bound
               256: [(None, 32, 4, 3), (None, 64, 8, 2)]},
    "ampere": {64: [(None, 64, 4, 3), (None, 128, 4, 3)],
               128: [(None, 128, 8, 2)],
               256: [(None, 32, 4, 3)]},
    "hopper_fp32": {64: [(None, 32, 4, 2), (None, 16, 4, 2)],
                    128: [(None, 16, 4, 2)]},
    "ampere_fp32": {64: [(None, 32, 4, 2), (None, 16, 4, 2)],
                    128: [(None, 16, 4, 2)]},
}


def _interpret() -> bool:
    return triton_interpret()


def _config(bm, bn, warps, stages) -> triton.Config:
    kw = {"BLOCK_N": bn} if bm is None else {"BLOCK_M": bm, "BLOCK_N": bn}
    return triton.Config(kw, num_warps=warps, num_stages=stages)


def _key(c: triton.Config) -> tuple:
    return c.kwargs.get("BLOCK_M"), c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def _tuning_configs(table: dict, interpret: tuple) -> list[triton.Config]:
    """Every candidate of a tuning table once; one small config under the interpreter, where
    autotuning would only run the same numpy code several times."""
    if _interpret():
        return [_config(*interpret)]
    seen = dict.fromkeys(c for arch in table.values() for cands in arch.values() for c in cands)
    return [_config(*c) for c in seen]


def tuning_variants(fp32: bool) -> tuple[tuple[str, bool], ...]:
    """(list variant, has mask) of the tuning lists that serve calls in float32 (one list, mask
    or not) or in a 16-bit dtype (one list without a mask, one with)."""
    return (("_fp32", True),) if fp32 else (("", False), ("_mask", True))


def tuning_list(table: dict, major: int, variant: str) -> dict[int, list[tuple]]:
    """{head-dim class: candidates} of ``table`` for compute capability ``major`` and a variant
    of tuning_variants; a table without the variant serves it from its plain list."""
    family = "hopper" if major >= 9 else "ampere"
    return table.get(family + variant, table[family])


def _dclass(d: int, dv: int) -> int:
    return 64 if max(d, dv) <= 64 else 128 if max(d, dv) <= 128 else 256


@functools.cache
def _device_limits(index: int) -> tuple[int, int, int]:
    """(compute capability major, opt-in shared memory per block in bytes, SM count)."""
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    return props.major, smem, props.multi_processor_count


def _fits(cfg: tuple, smem: int, smem_bytes: int, acc_regs: int) -> bool:
    """The kernel's shared memory (smem_bytes) fits the device's per-block limit and the fp32
    accumulators (acc_regs values) leave a thread ~60 of its 255 registers for operands and
    addresses (the tuned lists peak at 160 accumulator values a thread): spills cost far more
    than a smaller tile."""
    return smem_bytes <= smem and acc_regs <= 192 * cfg[2] * 32


class _Kernel:
    """The tuning of one autotuned kernel: its table and its resource model
    ``footprint(bm, bn, stages, d, dv, fp32) -> (shared-memory elements, accumulator values)``.
    The shared-memory model is checked against the compiler's figures for every listed candidate
    (tests/test_triton_resources.py): never below them."""

    def __init__(self, name: str, table: dict, footprint):
        self.name, self.table, self.footprint = name, table, footprint

    def smem_bytes(self, bm: int, bn: int, stages: int, d: int, dv: int, elem: int,
                   has_mask: bool) -> int:
        tiles, _ = self.footprint(bm, bn, max(stages, 1), d, dv, elem == 4)
        # the mask tile is loaded beside the scores (its pipelined copy)
        return elem * (tiles + (bm * bn if has_mask else 0))

    def fitting(self, major: int, smem: int, elem: int, variant: str, d: int, dv: int,
                block_m: int | None = None) -> list[tuple]:
        """The candidates for this call's list that fit the device, in order of preference."""
        keep = []
        for c in tuning_list(self.table, major, variant).get(_dclass(d, dv), []):
            bm = c[0] if c[0] is not None else block_m
            _, acc = self.footprint(bm, c[1], max(c[3], 1), d, dv, elem == 4)
            need = self.smem_bytes(bm, c[1], c[3], d, dv, elem, variant != "")
            if _fits(c, smem, need, acc):
                keep.append(c)
        return keep

    def prune(self, configs, named_args, **kwargs):
        """early_config_prune: the fitting candidates of this call's list (the first one only
        when autotuning is off). None fitting is refused up front by _supports
        (attention_unsupported_reason); reaching here without one is a bug, raised as such
        rather than launched into OutOfResources."""
        args = {**named_args, **kwargs}
        q = args["Q"]
        if q.device.type != "cuda":
            return configs[:1]
        major, smem, _ = _device_limits(q.device.index or 0)
        fp32 = q.element_size() == 4
        variant = "_fp32" if fp32 else "_mask" if args.get("HAS_MASK") else ""
        want = self.fitting(major, smem, q.element_size(), variant, args["HEAD_DIM"],
                            args["HEAD_DIM_V"], args.get("BLOCK_M"))
        keep = [c for c in configs if _key(c) in want]
        if not keep:
            raise RuntimeError(f"fastattn: no {self.name} tile fits (compute capability "
                               f"{major}, {smem} B of shared memory) for "
                               f"{'float32' if fp32 else '16-bit'} inputs at head dim "
                               f"{args['HEAD_DIM']}/{args['HEAD_DIM_V']}")
        return keep if autotune_enabled() else keep[:1]


# Shared-memory models, in elements, fitted to triton 3.6's allocations on sm_80/sm_90a. fp32
# inputs run the products as 3xTF32: an operand kept for several products is held in shared
# memory as its big and small TF32 halves (twice its fp32 size).
# forward: Q tile (twice in fp32) + K/V ring; acc (BM, Dv) + score tile (BM, BN) in fp32
# registers
_FWD = _Kernel("forward", _FWD_TUNING, lambda bm, bn, st, d, dv, f32: (
    bm * d * (1 + f32) + st * bn * (d + dv), bm * dv + bm * bn))
# dK/dV: K/V tile resident + a second K for the atomic dQ product (wgmma reads it in another
# layout) + Q/dO ring + the P, dS tiles (all twice in fp32) + 512 values of row statistics;
# dK, dV accumulators + P, dP tiles
_DKDV = _Kernel("dK/dV", _DKDV_TUNING, lambda bm, bn, st, d, dv, f32: (
    (bn * (2 * d + dv) + st * bm * (d + dv) + 2 * bm * bn) * (1 + f32) + 512,
    bn * (d + dv) + 2 * bm * bn))
# dQ: Q/dO resident (Q twice in fp32) + K/V ring + the P, dS tiles; dQ accumulator + P, dP
_DQ = _Kernel("dQ", _DQ_TUNING, lambda bm, bn, st, d, dv, f32: (
    bm * (d + dv) + f32 * bm * d + st * bn * (d + dv) + 2 * bm * bn, bm * d + 2 * bm * bn))
_DECODE = _Kernel("decoding", _DECODE_TUNING, lambda bm, bn, st, d, dv, f32: (
    bm * d * (1 + f32) + st * bn * (d + dv), bm * dv + bm * bn))
_prune_fwd, _prune_bwd_dkdv = _FWD.prune, _DKDV.prune
_prune_bwd_dq, _prune_decode = _DQ.prune, _DECODE.prune


def attention_unsupported_reason(dtype: torch.dtype, head_dim: int,
                                 device: torch.device) -> str | None:
    """None when every attention kernel (forward, both backward kernels, decoding) has a tile
    for ``dtype`` at head dim ``head_dim`` (max(E, Ev)) that fits ``device``, else the reason:
    the op layer then refuses the call for this backend up front (``auto`` moves on to the next
    one) instead of launching a kernel into OutOfResources. Masked and unmasked calls are both
    checked (the caller does not know which it will be), decoding at its largest M tile."""
    if device.type != "cuda":
        return None  # the interpreter has no resource limits
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, smem, _ = _device_limits(index)
    elem = torch.empty((), dtype=dtype).element_size()
    d = _head_block(head_dim)  # the kernels' padded tile width
    for kernel in (_FWD, _DKDV, _DQ, _DECODE):
        for variant, has_mask in tuning_variants(dtype == torch.float32):
            block_m = _decode_max_block_m(elem == 4, d)
            if not kernel.fitting(major, smem, elem, variant, d, d, block_m=block_m):
                return (f"no Triton {kernel.name} tile for {dtype} at head dim {head_dim}"
                        f"{' with a mask' if has_mask and elem == 2 else ''} fits compute "
                        f"capability {major}.x with {smem} B of shared memory per block")
    return None


_FWD_KEYS = ["HEAD_DIM", "HEAD_DIM_V", "seqlen_q_key", "seqlen_k_key", "HAS_MASK", "HAS_LEFT",
             "HAS_RIGHT", "DROPOUT", "VARLEN"]


# ---------------------------------------------------------------------------------------------
# shared device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _key_band(m_start, seqlen_q, seqlen_k, window_left, window_right, diag_offset,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks seen by query rows [m_start, m_start + BLOCK_M). They form three contiguous
    ranges [lo, full_lo) | [full_lo, full_hi) | [full_hi, hi) where only the outer two need the
    element mask (band edges, key tail); blocks outside [lo, hi) are skipped entirely. Returns
    the schedule of _block_schedule."""
    m_last = tl.minimum(m_start + BLOCK_M, seqlen_q) - 1
    lo = m_start * 0
    hi = lo + seqlen_k
    full_lo = lo
    full_hi = (seqlen_k // BLOCK_N) * BLOCK_N
    if HAS_LEFT:  # key j >= i + diag_offset - window_left
        lo = (tl.maximum(m_start + diag_offset - window_left, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(m_last + diag_offset - window_left, 0), BLOCK_N) * BLOCK_N
    if HAS_RIGHT:  # key j <= i + diag_offset + window_right
        hi = tl.minimum(tl.maximum(m_last + diag_offset + window_right + 1, 0), seqlen_k)
        full_hi = tl.minimum(
            full_hi, (tl.maximum(m_start + diag_offset + window_right + 1, 0) // BLOCK_N) * BLOCK_N)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return _block_schedule(lo, full_lo, full_hi, hi, BLOCK_N)


@triton.jit
def _query_band(n_start, seqlen_q, seqlen_k, window_left, window_right, diag_offset,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query blocks that see keys [n_start, n_start + BLOCK_N), split like _key_band."""
    n_last = tl.minimum(n_start + BLOCK_N, seqlen_k) - 1
    lo = n_start * 0
    hi = lo + seqlen_q
    full_lo = lo
    full_hi = (seqlen_q // BLOCK_M) * BLOCK_M
    if HAS_RIGHT:  # query i >= j - diag_offset - window_right
        lo = (tl.maximum(n_start - diag_offset - window_right, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(n_last - diag_offset - window_right, 0), BLOCK_M) * BLOCK_M
    if HAS_LEFT:  # query i <= j - diag_offset + window_left
        hi = tl.minimum(tl.maximum(n_last - diag_offset + window_left + 1, 0), seqlen_q)
        full_hi = tl.minimum(
            full_hi, (tl.maximum(n_start - diag_offset + window_left + 1, 0) // BLOCK_M) * BLOCK_M)
    hi = tl.maximum(hi, lo)
    # a key block cut by the end of the keys needs the element mask on every query block
    full_lo = tl.where(n_start + BLOCK_N > seqlen_k, hi, full_lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return _block_schedule(lo, full_lo, full_hi, hi, BLOCK_M)


@triton.jit
def _block_schedule(lo, full_lo, full_hi, hi, BLOCK: tl.constexpr):
    """(lo, n_first, full_hi, n_masked, full_lo, n_full): the masked blocks are n_first blocks
    from lo followed by n_masked - n_first blocks from full_hi (one loop serves both band
    edges, which halves the code of the masked path and its register pressure); the unmasked
    blocks are n_full blocks from full_lo. Block it of the masked loop starts at
    lo + it * BLOCK if it < n_first else full_hi + (it - n_first) * BLOCK."""
    n_first = tl.cdiv(full_lo - lo, BLOCK)
    n_masked = n_first + tl.cdiv(hi - full_hi, BLOCK)
    return lo, n_first, full_hi, n_masked, full_lo, tl.cdiv(full_hi - full_lo, BLOCK)


@triton.jit
def _varlen_span(CuSeq, b, total):
    """(first row, length) of sequence b from its cu_seqlens, clamped into [0, total]: offsets
    the host could not check (GPU tensors) never send a program outside the packed rows."""
    start = tl.minimum(tl.maximum(tl.load(CuSeq + b), 0), total)
    end = tl.minimum(tl.maximum(tl.load(CuSeq + b + 1), start), total)
    return start.to(tl.int64), end - start


@triton.jit
def _varlen_sequence(CuSeqQ, CuSeqK, b, total_q, total_k, BOTTOM_RIGHT: tl.constexpr):
    """Sequence b of a packed (VARLEN) launch: (q_start, k_start, seqlen_q, seqlen_k,
    diag_offset), its first query / key row, its lengths, and its diagonal offset (S_b - L_b
    when bottom-right aligned, else 0)."""
    q_start, seqlen_q = _varlen_span(CuSeqQ, b, total_q)
    k_start, seqlen_k = _varlen_span(CuSeqK, b, total_k)
    diag_offset = seqlen_k - seqlen_q if BOTTOM_RIGHT else seqlen_k * 0
    return q_start, k_start, seqlen_q, seqlen_k, diag_offset


@triton.jit
def _first_row(b, h, q_start, num_heads, rows_q, VARLEN: tl.constexpr):
    """Row of query 0 of (b, h) in lse / delta: (B, H, L) rows (b * H + h) * L, or, VARLEN,
    (H, total_q) rows h * total_q + q_start. Its dropout counters start at row * cdiv(S, 4)
    (cdiv(total_k, 4) when VARLEN), disjoint between heads and sequences."""
    if VARLEN:
        return h * rows_q + q_start
    else:
        return (b * num_heads + h) * rows_q


@triton.jit
def _visible(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right, diag_offset,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: query offs_m may see key offs_n (bounds and window)."""
    vis = (offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k)
    if HAS_LEFT:
        vis = vis & (offs_n[None, :] >= offs_m[:, None] + (diag_offset - window_left))
    if HAS_RIGHT:
        vis = vis & (offs_n[None, :] <= offs_m[:, None] + (diag_offset + window_right))
    return vis


@triton.jit
def _dropout_keep(seed, rng_rows, start_n, dropout_p, BLOCK_N: tl.constexpr):
    """Keep mask (BLOCK_M, BLOCK_N) of keys [start_n, start_n + BLOCK_N) (start_n a multiple of
    4). One Philox call yields 4 random words, used for 4 adjacent keys: the counter of
    (b, h, i, j) is ((b * H + h) * L + i) * cdiv(S, 4) + j // 4 (rng_rows holds the counter of
    (b, h, i, 0)), so the forward and both backward kernels draw the same bits whatever their
    tiling, and the RNG costs a quarter of one call per element."""
    offs_c = (start_n // 4 + tl.arange(0, BLOCK_N // 4)).to(tl.int64)
    r0, r1, r2, r3 = tl.randint4x(seed, rng_rows[:, None] + offs_c[None, :])
    r = tl.join(tl.join(r0, r1), tl.join(r2, r3))  # (BLOCK_M, BLOCK_N // 4, 2, 2)
    r = tl.reshape(r, (rng_rows.shape[0], BLOCK_N))
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _tanh(x):
    """tanh in float32 without cancellation near 0: the odd Taylor series up to x^11 where
    |x| < 0.3 (truncation < 1e-9 relative), else (1 - e) / (1 + e) with e = exp(-2|x|)."""
    x2 = x * x
    small = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * (0.021869488536155203 + x2 * -0.008863235529902197)))))
    e = tl.math.exp2(tl.abs(x) * (-2.0 * _LOG2E))
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0.0, -big, big)
    return tl.where(tl.abs(x) < 0.3, small, big)


@triton.jit
def _alibi_bias(offs_m, offs_n, diag_offset, slope2):
    """(BLOCK_M, BLOCK_N) ALiBi term in log2 units: slope2 * |i + diag_offset - j| (slope2 a
    scalar or a (BLOCK_M,) vector)."""
    dist = offs_m[:, None] + diag_offset - offs_n[None, :]
    return slope2 * tl.abs(dist).to(tl.float32)


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _attention_fwd_loop(
    acc, l_i, m_i, q,
    K, V, mask_rows, rng_rows,
    lo, n_first, second, n_blocks, offs_m, offs_d, offs_dv,
    stride_kn, stride_kk, stride_vn, stride_vk, stride_mn,
    qk_scale, dropout_p, seed, softcap2, slope2,
    seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, diag_offset,
    BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
):
    """Online softmax over n_blocks key blocks (n_first from lo, the rest from second);
    MASKED: apply the bounds/window element masks. SOFTCAP / ALIBI: the score modifiers
    (softcap2 = softcap * log2 e, slope2 = slope * log2 e: scores are in log2 units)."""
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < head_dim_v
    row_ok = offs_m < seqlen_q
    for it in range(0, n_blocks):
        start_n = tl.where(it < n_first, lo + it * BLOCK_N, second + (it - n_first) * BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_n64 = offs_n.to(tl.int64)
        n_ok = offs_n < seqlen_k
        k_ptrs = K + offs_n64[None, :] * stride_kn + offs_d[:, None] * stride_kk  # (D, BLOCK_N)
        v_ptrs = V + offs_n64[:, None] * stride_vn + offs_dv[None, :] * stride_vk  # (BLOCK_N, Dv)
        if MASKED:
            k = tl.load(k_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        if INTERP_BF16:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if SOFTCAP:
            s = softcap2 * _tanh(s / softcap2)
        if ALIBI:
            s -= _alibi_bias(offs_m, offs_n, diag_offset, slope2)
        if HAS_MASK:
            am = tl.load(mask_rows + offs_n64[None, :] * stride_mn,
                         mask=row_ok[:, None] & n_ok[None, :], other=0.0)
            s += am.to(tl.float32) * _LOG2E
        if MASKED:
            vis = _visible(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right,
                           diag_offset, HAS_LEFT, HAS_RIGHT)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with nothing visible yet keeps m = -inf: subtract 0 instead (exp2(-inf) = 0)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, rng_rows, start_n, dropout_p, BLOCK_N), p, 0.0)
        if MASKED:
            v = tl.load(v_ptrs, mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs, mask=dv_ok[None, :], other=0.0)
        # P rounded to the input precision for the tensor-core product, as FlashAttention
        if INTERP_BF16:
            v = v.to(tl.float32)
            p = p.to(tl.bfloat16).to(tl.float32)
        else:
            p = p.to(V.dtype.element_ty)
        acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(
    configs=_tuning_configs(_FWD_TUNING, interpret=(32, 32, 4, 1)),
    key=_FWD_KEYS,
    prune_configs_by={"early_config_prune": _prune_fwd},
)
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Mask, Out, Lse, Slopes, Sinks, CuSeqQ, CuSeqK,
    qk_scale, dropout_p, seed, softcap2,
    stride_qb, stride_qh, stride_qm, stride_qk,
    stride_kb, stride_kh, stride_kn, stride_kk,
    stride_vb, stride_vh, stride_vn, stride_vk,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_ok,
    stride_slb, stride_slh,
    num_heads, num_bh, seqlen_q, seqlen_k, group_size, head_dim, head_dim_v,
    window_left, window_right, diag_offset,
    seqlen_q_key, seqlen_k_key,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, SINKS: tl.constexpr,
    VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out (B, H, L, Ev), lse (B, H, L) from q (B, H, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev);
    Slopes (B, H) float32 by strides (ALIBI), Sinks (H,) float32 (SINKS).
    VARLEN: packed sequences (attention_varlen): q (total_q, H, E), k (total_k, Hkv, E), v
    (total_k, Hkv, Ev), out (total_q, H, Ev), lse (H, total_q); seqlen_q / seqlen_k are the
    totals, sequence b spans the rows [cu_q[b], cu_q[b + 1]) / [cu_k[b], cu_k[b + 1]) of
    CuSeqQ / CuSeqK (int32, B + 1), and diag_offset is S_b - L_b (BOTTOM_RIGHT) or 0. The
    batch strides are the row strides there: batch entry index = first packed row. No mask.
    Grid: grid_folded(cdiv(L or max_seqlen_q, BLOCK_M), B * H); the Q tile stays in registers."""
    pid_m = tl.program_id(0)
    if HAS_RIGHT:
        if not HAS_LEFT:
            # causal: the last query blocks see the most keys; start them first so the
            # short ones fill the tail of the launch
            pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = folded_id()
    if pid_bh >= num_bh:
        return
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    hk = h // group_size  # GQA: query head h reads kv head h // (H / Hkv)
    m_start = pid_m * BLOCK_M
    rows_q, rows_k = seqlen_q, seqlen_k
    bq, bk = b, b  # batch entry of q / out and of k / v
    if VARLEN:
        bq, bk, seqlen_q, seqlen_k, diag_offset = _varlen_sequence(
            CuSeqQ, CuSeqK, b, rows_q, rows_k, BOTTOM_RIGHT)
        if m_start >= seqlen_q:  # the grid covers max_seqlen_q
            return
    row0 = _first_row(b, h, bq, num_heads, rows_q, VARLEN)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_m64 = offs_m.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    row_ok = offs_m < seqlen_q

    q_ptrs = Q + bq * stride_qb + h * stride_qh + offs_m64[:, None] * stride_qm + offs_d[None, :] * stride_qk
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    if INTERP_BF16:
        q = q.to(tl.float32)
    K += bk * stride_kb + hk * stride_kh
    V += bk * stride_vb + hk * stride_vh
    mask_rows = Mask + b * stride_mb + h * stride_mh + offs_m64[:, None] * stride_mm
    rng_rows = row0 * tl.cdiv(rows_k, 4) + offs_m64 * tl.cdiv(seqlen_k, 4)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(Slopes + b * stride_slb + h * stride_slh) * _LOG2E

    lo, n_first, second, n_masked, full_lo, n_full = _key_band(
        m_start, seqlen_q, seqlen_k, window_left, window_right, diag_offset,
        HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    # the blocks inside the band need no element mask; the band edges and the key tail do
    acc, l_i, m_i = _attention_fwd_loop(
        acc, l_i, m_i, q, K, V, mask_rows, rng_rows, full_lo, n_full, full_lo, n_full,
        offs_m, offs_d, offs_dv, stride_kn, stride_kk, stride_vn, stride_vk, stride_mn,
        qk_scale, dropout_p, seed, softcap2, slope2,
        seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, diag_offset,
        BLOCK_N, HAS_MASK, HAS_LEFT, HAS_RIGHT, DROPOUT, False, DOT_PRECISION, INTERP_BF16,
        SOFTCAP, ALIBI)
    acc, l_i, m_i = _attention_fwd_loop(
        acc, l_i, m_i, q, K, V, mask_rows, rng_rows, lo, n_first, second, n_masked,
        offs_m, offs_d, offs_dv, stride_kn, stride_kk, stride_vn, stride_vk, stride_mn,
        qk_scale, dropout_p, seed, softcap2, slope2,
        seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, diag_offset,
        BLOCK_N, HAS_MASK, HAS_LEFT, HAS_RIGHT, DROPOUT, True, DOT_PRECISION, INTERP_BF16,
        SOFTCAP, ALIBI)

    if SINKS:
        # the sink joins the denominator: rescale to m = max(m_i, sink) and add 2^(sink - m)
        sink2 = tl.load(Sinks + h) * _LOG2E
        m_f = tl.maximum(m_i, sink2)
        alpha = tl.math.exp2(m_i - m_f)
        l_i = l_i * alpha + tl.math.exp2(sink2 - m_f)
        acc = acc * alpha[:, None]
        m_i = m_f
    # empty rows (l = 0): out = 0 and lse = -inf instead of 0/0
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    o_ptrs = Out + bq * stride_ob + h * stride_oh + offs_m64[:, None] * stride_om + offs_dv[None, :] * stride_ok
    tl.store(o_ptrs, out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
    tl.store(Lse + row0 + offs_m64, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _attention_bwd_preprocess_kernel(
    Out, DO, GradLse, Delta,
    stride_ob, stride_oh, stride_om, stride_ok,
    stride_dob, stride_doh, stride_dom, stride_dok,
    num_heads, num_bh, seqlen_q, head_dim_v,
    HEAD_DIM_V: tl.constexpr, HAS_GRAD_LSE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta (B, H, L) = rowsum(dO * O) - grad_lse, float32.
    Grid: grid_folded(cdiv(L, BLOCK_M), B * H)."""
    pid_m = tl.program_id(0)
    pid_bh = folded_id()
    if pid_bh >= num_bh:
        return
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m64 = offs_m.to(tl.int64)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    ok = (offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < head_dim_v)
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m64[:, None] * stride_om
                + offs_dv[None, :] * stride_ok, mask=ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m64[:, None] * stride_dom
                 + offs_dv[None, :] * stride_dok, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = pid_bh.to(tl.int64) * seqlen_q + offs_m
    if HAS_GRAD_LSE:
        delta -= tl.load(GradLse + row, mask=offs_m < seqlen_q, other=0.0)
    tl.store(Delta + row, delta, mask=offs_m < seqlen_q)


@triton.jit
def _attention_sink_grad_kernel(
    Sinks, Lse, Delta, DSinks,
    num_heads, batch, seqlen_q,
    BLOCK: tl.constexpr,
):
    """dsinks[h] = -sum over (b, i) of exp(sinks[h] - lse) * delta (the sink's probability times
    the row's delta; it has no value row), summed in a fixed order. Grid: (H,)."""
    h = tl.program_id(0)
    sink = tl.load(Sinks + h)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for b in range(0, batch):
        base = (b * num_heads + h).to(tl.int64) * seqlen_q
        for m0 in range(0, seqlen_q, BLOCK):
            offs = m0 + tl.arange(0, BLOCK)
            ok = offs < seqlen_q
            lse = tl.load(Lse + base + offs, mask=ok, other=float("-inf"))
            delta = tl.load(Delta + base + offs, mask=ok, other=0.0)
            p = tl.where(lse == float("-inf"), 0.0, tl.exp(sink - lse))
            acc += p * delta
    tl.store(DSinks + h, -tl.sum(acc, 0))


@triton.jit
def _attention_bwd_dkdv_loop(
    dk, dv, k, v,
    Q, DO, Lse, Delta, DQ, mask_cols, dmask_cols, rng_base,
    lo, n_first, second, n_blocks, n_start, offs_n, offs_d, offs_dv,
    stride_qm, stride_qk, stride_dom, stride_dok, stride_dqm, stride_dqk, stride_mm, stride_dmm,
    sm_scale, qk_scale, dropout_p, seed, softcap2, slope2,
    seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, diag_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    STORE_DMASK: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
):
    """Accumulate dK, dV of one key block over n_blocks query blocks (n_first from lo, the rest
    from second) of one query head; works on transposed tiles (keys on rows) so dK/dV are plain
    row-major accumulations."""
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < head_dim_v
    n_ok = offs_n < seqlen_k
    for it in range(0, n_blocks):
        start_m = tl.where(it < n_first, lo + it * BLOCK_M, second + (it - n_first) * BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_m64 = offs_m.to(tl.int64)
        m_ok = offs_m < seqlen_q
        q_ptrs = Q + offs_m64[:, None] * stride_qm + offs_d[None, :] * stride_qk
        do_ptrs = DO + offs_m64[:, None] * stride_dom + offs_dv[None, :] * stride_dok
        if MASKED:
            q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
            lse = tl.load(Lse + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(Delta + offs_m, mask=m_ok, other=0.0)
        else:
            q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=dv_ok[None, :], other=0.0)
            lse = tl.load(Lse + offs_m)
            delta = tl.load(Delta + offs_m)
        if INTERP_BF16:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # lse = -inf (empty row): subtract +inf so P = 0 rather than exp2(nan)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        if SOFTCAP:
            tT = _tanh(sT / softcap2)
            sT = softcap2 * tT
        if ALIBI:
            sT -= tl.trans(_alibi_bias(offs_m, offs_n, diag_offset, slope2))
        if HAS_MASK:
            am = tl.load(mask_cols + offs_m64[None, :] * stride_mm,
                         mask=n_ok[:, None] & m_ok[None, :], other=0.0)
            sT += am.to(tl.float32) * _LOG2E
        pT = tl.math.exp2(sT - lse2[None, :])
        if MASKED:
            vis = tl.trans(_visible(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right,
                                    diag_offset, HAS_LEFT, HAS_RIGHT))
            pT = tl.where(vis, pT, 0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        if DROPOUT:
            rng_rows = rng_base + offs_m64 * tl.cdiv(seqlen_k, 4)
            keepT = tl.trans(_dropout_keep(seed, rng_rows, n_start, dropout_p, BLOCK_N))
            inv_keep = 1.0 / (1.0 - dropout_p)
            pdT = tl.where(keepT, pT * inv_keep, 0.0)
            dpT = tl.where(keepT, dpT * inv_keep, 0.0)
        else:
            pdT = pT
        dsT = pT * (dpT - delta[None, :])  # d loss / d (score + mask)
        if STORE_DMASK:
            tl.store(dmask_cols + offs_m64[None, :] * stride_dmm,
                     dsT.to(dmask_cols.dtype.element_ty),
                     mask=n_ok[:, None] & m_ok[None, :])
        if SOFTCAP:  # through softcap * tanh(x / softcap): d/dx = 1 - tanh^2
            dsT = dsT * (1.0 - tT * tT)
        # operands of the gradient products rounded to the input precision
        if INTERP_BF16:
            pdT = pdT.to(tl.bfloat16).to(tl.float32)
            dsT = dsT.to(tl.bfloat16).to(tl.float32)
        else:
            pdT = pdT.to(Q.dtype.element_ty)
            dsT = dsT.to(Q.dtype.element_ty)
        dv = tl.dot(pdT, do, dv, input_precision=DOT_PRECISION)
        dk = tl.dot(dsT, q, dk, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dsT), k, input_precision=DOT_PRECISION)
            tl.atomic_add(DQ + offs_m64[:, None] * stride_dqm + offs_d[None, :] * stride_dqk,
                          dq * sm_scale, mask=m_ok[:, None] & d_ok[None, :], sem="relaxed")
    return dk, dv


@triton.autotune(
    configs=_tuning_configs(_DKDV_TUNING, interpret=(32, 32, 4, 1)),
    key=_FWD_KEYS + ["ATOMIC_DQ", "STORE_DMASK"],
    prune_configs_by={"early_config_prune": _prune_bwd_dkdv},
    reset_to_zero=["DQ"],
)
@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, Mask, DO, Lse, Delta, DQ, DK, DV, DMask, Slopes, CuSeqQ, CuSeqK,
    sm_scale, qk_scale, dropout_p, seed, softcap2,
    stride_qb, stride_qh, stride_qm, stride_qk,
    stride_kb, stride_kh, stride_kn, stride_kk,
    stride_vb, stride_vh, stride_vn, stride_vk,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dok,
    stride_dqb, stride_dqh, stride_dqm, stride_dqk,
    stride_dkb, stride_dkh, stride_dkn, stride_dkk,
    stride_dvb, stride_dvh, stride_dvn, stride_dvk,
    stride_dmb, stride_dmh, stride_dmm, stride_dmn,
    stride_slb, stride_slh,
    num_heads, num_kv_heads, num_bhk, seqlen_q, seqlen_k, group_size, head_dim, head_dim_v,
    window_left, window_right, diag_offset,
    seqlen_q_key, seqlen_k_key,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr, STORE_DMASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk (B, Hkv, S, E), dv (B, Hkv, S, Ev) of one key block, summed over the query heads of
    its kv group inside the program (no atomics for dK/dV); dq (B, H, L, E) float32 by atomic
    adds when ATOMIC_DQ; dmask (B, H, L, S) when STORE_DMASK.
    VARLEN: packed sequences, as in _attention_fwd_kernel (dq (total_q, H, E), dk / dv
    (total_k, Hkv, E / Ev), lse / delta (H, total_q)).
    Grid: grid_folded(cdiv(S or max_seqlen_k, BLOCK_N), B * Hkv)."""
    pid_n = tl.program_id(0)
    pid_bhk = folded_id()
    if pid_bhk >= num_bhk:
        return
    b = (pid_bhk // num_kv_heads).to(tl.int64)
    hk = (pid_bhk % num_kv_heads).to(tl.int64)
    n_start = pid_n * BLOCK_N
    rows_q, rows_k = seqlen_q, seqlen_k
    bq, bk = b, b  # batch entry of q / do / dq and of k / v / dk / dv
    if VARLEN:
        bq, bk, seqlen_q, seqlen_k, diag_offset = _varlen_sequence(
            CuSeqQ, CuSeqK, b, rows_q, rows_k, BOTTOM_RIGHT)
        if n_start >= seqlen_k:  # the grid covers max_seqlen_k
            return

    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_n64 = offs_n.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    n_ok = offs_n < seqlen_k
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < head_dim_v

    k = tl.load(K + bk * stride_kb + hk * stride_kh + offs_n64[:, None] * stride_kn
                + offs_d[None, :] * stride_kk, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + bk * stride_vb + hk * stride_vh + offs_n64[:, None] * stride_vn
                + offs_dv[None, :] * stride_vk, mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
    if INTERP_BF16:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V], dtype=tl.float32)

    lo, n_first, second, n_masked, full_lo, n_full = _query_band(
        n_start, seqlen_q, seqlen_k, window_left, window_right, diag_offset,
        HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    for g in range(0, group_size):
        h = hk * group_size + g
        Qh = Q + bq * stride_qb + h * stride_qh
        DOh = DO + bq * stride_dob + h * stride_doh
        DQh = DQ + bq * stride_dqb + h * stride_dqh
        row0 = _first_row(b, h, bq, num_heads, rows_q, VARLEN)
        Lseh = Lse + row0
        Deltah = Delta + row0
        mask_cols = Mask + b * stride_mb + h * stride_mh + offs_n64[:, None] * stride_mn
        dmask_cols = DMask + b * stride_dmb + h * stride_dmh + offs_n64[:, None] * stride_dmn
        rng_base = row0 * tl.cdiv(rows_k, 4)
        slope2 = 0.0
        if ALIBI:
            slope2 = tl.load(Slopes + b * stride_slb + h * stride_slh) * _LOG2E
        dk, dv = _attention_bwd_dkdv_loop(
            dk, dv, k, v, Qh, DOh, Lseh, Deltah, DQh, mask_cols, dmask_cols, rng_base,
            full_lo, n_full, full_lo, n_full, n_start, offs_n, offs_d, offs_dv,
            stride_qm, stride_qk, stride_dom, stride_dok, stride_dqm, stride_dqk, stride_mm,
            stride_dmm, sm_scale, qk_scale, dropout_p, seed, softcap2, slope2,
            seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, diag_offset,
            BLOCK_M, BLOCK_N, HAS_MASK, HAS_LEFT, HAS_RIGHT, DROPOUT, ATOMIC_DQ, STORE_DMASK, False,
            DOT_PRECISION, INTERP_BF16, SOFTCAP, ALIBI)
        dk, dv = _attention_bwd_dkdv_loop(
            dk, dv, k, v, Qh, DOh, Lseh, Deltah, DQh, mask_cols, dmask_cols, rng_base,
            lo, n_first, second, n_masked, n_start, offs_n, offs_d, offs_dv,
            stride_qm, stride_qk, stride_dom, stride_dok, stride_dqm, stride_dqk, stride_mm,
            stride_dmm, sm_scale, qk_scale, dropout_p, seed, softcap2, slope2,
            seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, diag_offset,
            BLOCK_M, BLOCK_N, HAS_MASK, HAS_LEFT, HAS_RIGHT, DROPOUT, ATOMIC_DQ, STORE_DMASK, True,
            DOT_PRECISION, INTERP_BF16, SOFTCAP, ALIBI)

    dk = dk * sm_scale
    tl.store(DK + bk * stride_dkb + hk * stride_dkh + offs_n64[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkk, dk.to(DK.dtype.element_ty),
             mask=n_ok[:, None] & d_ok[None, :])
    tl.store(DV + bk * stride_dvb + hk * stride_dvh + offs_n64[:, None] * stride_dvn
             + offs_dv[None, :] * stride_dvk, dv.to(DV.dtype.element_ty),
             mask=n_ok[:, None] & dv_ok[None, :])


@triton.jit
def _attention_bwd_dq_loop(
    dq, q, do, lse2, delta,
    K, V, mask_rows, rng_rows,
    lo, n_first, second, n_blocks, offs_m, offs_d, offs_dv,
    stride_kn, stride_kk, stride_vn, stride_vk, stride_mn,
    qk_scale, dropout_p, seed, softcap2, slope2,
    seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, diag_offset,
    BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
):
    """Accumulate dQ of one query block over a schedule of key blocks, in a fixed order."""
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < head_dim_v
    row_ok = offs_m < seqlen_q
    for it in range(0, n_blocks):
        start_n = tl.where(it < n_first, lo + it * BLOCK_N, second + (it - n_first) * BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_n64 = offs_n.to(tl.int64)
        n_ok = offs_n < seqlen_k
        kT_ptrs = K + offs_n64[None, :] * stride_kn + offs_d[:, None] * stride_kk  # (D, BLOCK_N)
        vT_ptrs = V + offs_n64[None, :] * stride_vn + offs_dv[:, None] * stride_vk  # (Dv, BLOCK_N)
        if MASKED:
            kT = tl.load(kT_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
            vT = tl.load(vT_ptrs, mask=dv_ok[:, None] & n_ok[None, :], other=0.0)
        else:
            kT = tl.load(kT_ptrs, mask=d_ok[:, None], other=0.0)
            vT = tl.load(vT_ptrs, mask=dv_ok[:, None], other=0.0)
        if INTERP_BF16:
            kT = kT.to(tl.float32)
            vT = vT.to(tl.float32)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
        if SOFTCAP:
            t = _tanh(s / softcap2)
            s = softcap2 * t
        if ALIBI:
            s -= _alibi_bias(offs_m, offs_n, diag_offset, slope2)
        if HAS_MASK:
            am = tl.load(mask_rows + offs_n64[None, :] * stride_mn,
                         mask=row_ok[:, None] & n_ok[None, :], other=0.0)
            s += am.to(tl.float32) * _LOG2E
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            vis = _visible(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right,
                           diag_offset, HAS_LEFT, HAS_RIGHT)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, rng_rows, start_n, dropout_p, BLOCK_N)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:  # through softcap * tanh(x / softcap): d/dx = 1 - tanh^2
            ds = ds * (1.0 - t * t)
        if INTERP_BF16:
            ds = ds.to(tl.bfloat16).to(tl.float32)
        else:
            ds = ds.to(K.dtype.element_ty)
        dq = tl.dot(ds, tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(
    configs=_tuning_configs(_DQ_TUNING, interpret=(32, 32, 4, 1)),
    key=_FWD_KEYS,
    prune_configs_by={"early_config_prune": _prune_bwd_dq},
)
@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, Mask, DO, Lse, Delta, DQ, Slopes, CuSeqQ, CuSeqK,
    sm_scale, qk_scale, dropout_p, seed, softcap2,
    stride_qb, stride_qh, stride_qm, stride_qk,
    stride_kb, stride_kh, stride_kn, stride_kk,
    stride_vb, stride_vh, stride_vn, stride_vk,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dok,
    stride_dqb, stride_dqh, stride_dqm, stride_dqk,
    stride_slb, stride_slh,
    num_heads, num_bh, seqlen_q, seqlen_k, group_size, head_dim, head_dim_v,
    window_left, window_right, diag_offset,
    seqlen_q_key, seqlen_k_key,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq (B, H, L, E) without atomics (deterministic backward): one program per query block
    loops over its key band. VARLEN: packed sequences, as in _attention_fwd_kernel.
    Grid: grid_folded(cdiv(L or max_seqlen_q, BLOCK_M), B * H)."""
    pid_m = tl.program_id(0)
    if HAS_RIGHT:
        if not HAS_LEFT:
            # causal: the last query blocks see the most keys; start them first so the
            # short ones fill the tail of the launch
            pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = folded_id()
    if pid_bh >= num_bh:
        return
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    hk = h // group_size
    m_start = pid_m * BLOCK_M
    rows_q, rows_k = seqlen_q, seqlen_k
    bq, bk = b, b  # batch entry of q / do / dq and of k / v
    if VARLEN:
        bq, bk, seqlen_q, seqlen_k, diag_offset = _varlen_sequence(
            CuSeqQ, CuSeqK, b, rows_q, rows_k, BOTTOM_RIGHT)
        if m_start >= seqlen_q:  # the grid covers max_seqlen_q
            return
    row0 = _first_row(b, h, bq, num_heads, rows_q, VARLEN)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_m64 = offs_m.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    row_ok = offs_m < seqlen_q
    d_ok = offs_d < head_dim

    q = tl.load(Q + bq * stride_qb + h * stride_qh + offs_m64[:, None] * stride_qm
                + offs_d[None, :] * stride_qk, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + bq * stride_dob + h * stride_doh + offs_m64[:, None] * stride_dom
                 + offs_dv[None, :] * stride_dok,
                 mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
    if INTERP_BF16:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row = row0 + offs_m64
    lse = tl.load(Lse + row, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    delta = tl.load(Delta + row, mask=row_ok, other=0.0)
    K += bk * stride_kb + hk * stride_kh
    V += bk * stride_vb + hk * stride_vh
    mask_rows = Mask + b * stride_mb + h * stride_mh + offs_m64[:, None] * stride_mm
    rng_rows = row0 * tl.cdiv(rows_k, 4) + offs_m64 * tl.cdiv(seqlen_k, 4)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(Slopes + b * stride_slb + h * stride_slh) * _LOG2E

    lo, n_first, second, n_masked, full_lo, n_full = _key_band(
        m_start, seqlen_q, seqlen_k, window_left, window_right, diag_offset,
        HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    dq = _attention_bwd_dq_loop(
        dq, q, do, lse2, delta, K, V, mask_rows, rng_rows, full_lo, n_full, full_lo, n_full,
        offs_m, offs_d, offs_dv, stride_kn, stride_kk, stride_vn, stride_vk, stride_mn,
        qk_scale, dropout_p, seed, softcap2, slope2,
        seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, diag_offset,
        BLOCK_N, HAS_MASK, HAS_LEFT, HAS_RIGHT, DROPOUT, False, DOT_PRECISION, INTERP_BF16,
        SOFTCAP, ALIBI)
    dq = _attention_bwd_dq_loop(
        dq, q, do, lse2, delta, K, V, mask_rows, rng_rows, lo, n_first, second, n_masked,
        offs_m, offs_d, offs_dv, stride_kn, stride_kk, stride_vn, stride_vk, stride_mn,
        qk_scale, dropout_p, seed, softcap2, slope2,
        seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, diag_offset,
        BLOCK_N, HAS_MASK, HAS_LEFT, HAS_RIGHT, DROPOUT, True, DOT_PRECISION, INTERP_BF16,
        SOFTCAP, ALIBI)

    tl.store(DQ + bq * stride_dqb + h * stride_dqh + offs_m64[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqk, (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------------
# the dropout keep mask (return_dropout_mask)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _attention_dropout_mask_kernel(
    Keep, CuSeqQ, CuSeqK,
    dropout_p, seed,
    stride_keb, stride_keh, stride_kem, stride_ken,
    num_heads, num_bh, seqlen_q, seqlen_k, num_keys,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """keep (B, H, L, S) uint8 (1 = kept) as _attention_fwd_kernel draws it for dropout_p and
    seed (_dropout_keep at the same counters); VARLEN: (total_q, H, max_seqlen_k) with the
    batch stride the row stride, keys past a sequence's end left as they are (0). num_keys:
    keep's last dim (S, or max_seqlen_k).
    Grid: grid_folded(cdiv(L or max_seqlen_q, BLOCK_M), B * H)."""
    pid_m = tl.program_id(0)
    pid_bh = folded_id()
    if pid_bh >= num_bh:
        return
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    m_start = pid_m * BLOCK_M
    rows_q, rows_k = seqlen_q, seqlen_k
    bq = b
    if VARLEN:
        bq, bk, seqlen_q, seqlen_k, diag_offset = _varlen_sequence(
            CuSeqQ, CuSeqK, b, rows_q, rows_k, False)
        if m_start >= seqlen_q:
            return
    row0 = _first_row(b, h, bq, num_heads, rows_q, VARLEN)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_m64 = offs_m.to(tl.int64)
    rng_rows = row0 * tl.cdiv(rows_k, 4) + offs_m64 * tl.cdiv(seqlen_k, 4)
    rows = Keep + bq * stride_keb + h * stride_keh + offs_m64[:, None] * stride_kem
    n_end = tl.minimum(seqlen_k, num_keys)
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, rng_rows, start_n, dropout_p, BLOCK_N)
        tl.store(rows + offs_n.to(tl.int64)[None, :] * stride_ken, keep.to(tl.uint8),
                 mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < n_end))


# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------
@triton.jit
def _rotary(x, X, offs_partner, x_mask, Cos, Sin, rpos, offs_d,
            stride_cosp, stride_cosj, stride_sinp, stride_sinj, rotary_half,
            INTERLEAVED: tl.constexpr):
    """x [ROWS, HEAD_DIM] (loaded from X + offs_partner's rows, X the same pointer tile with the
    partner dims' offsets in offs_partner) rotated at positions rpos [ROWS] in float32: dims
    d < 2 * rotary_half pair with d ^ 1 (INTERLEAVED, GPT-J) or d +- rotary_half (GPT-NeoX);
    for a pair (x1, x2) and j its table column: (x1 c - x2 s, x2 c + x1 s). The other dims pass
    through exactly (c = 1, s = 0)."""
    in_rot = offs_d < 2 * rotary_half
    if INTERLEAVED:
        col = offs_d // 2
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
    else:
        first = offs_d < rotary_half
        col = tl.where(first, offs_d, offs_d - rotary_half)
        sign = tl.where(first, -1.0, 1.0)
    m = x_mask & in_rot[None, :]
    xp = tl.load(X + offs_partner, mask=m, other=0.0).to(tl.float32)
    c = tl.load(Cos + rpos[:, None] * stride_cosp + col[None, :] * stride_cosj, mask=m,
                other=1.0).to(tl.float32)
    s = tl.load(Sin + rpos[:, None] * stride_sinp + col[None, :] * stride_sinj, mask=m,
                other=0.0).to(tl.float32)
    return x.to(tl.float32) * c + sign[None, :] * xp * s


@triton.jit
def _rotary_partner(offs_d, rotary_half, INTERLEAVED: tl.constexpr):
    """The dim each dim d < 2 * rotary_half is paired with (d itself past the rotated dims)."""
    if INTERLEAVED:
        partner = offs_d ^ 1
    else:
        partner = tl.where(offs_d < rotary_half, offs_d + rotary_half, offs_d - rotary_half)
    return tl.where(offs_d < 2 * rotary_half, partner, offs_d)


@triton.jit
def _kv_slot(BlockTable, b, pos, stride_btb, block_size, num_blocks, ok, PAGED: tl.constexpr):
    """(row, slot) of cache token pos of sequence b: (b, pos), or PAGED (block_table[b, pos //
    block_size], pos % block_size) with the entry clamped into [0, num_blocks) (read on the
    device: a bad entry never reads or writes outside the pool; the host checks where it can)."""
    if PAGED:
        blk = tl.load(BlockTable + b * stride_btb + pos // block_size, mask=ok, other=0)
        blk = tl.minimum(tl.maximum(blk, 0), num_blocks - 1).to(tl.int64)
        return blk, pos % block_size
    else:
        return b + 0 * pos, pos


@triton.jit
def _kvcache_append_kernel(
    KNew, VNew, KCache, VCache, SeqLens, LeftPad, Cos, Sin, Q, QRot, BlockTable,
    stride_knb, stride_knh, stride_knm, stride_knk,
    stride_vnb, stride_vnh, stride_vnm, stride_vnk,
    stride_kcb, stride_kch, stride_kcn, stride_kck,
    stride_vcb, stride_vch, stride_vcn, stride_vck,
    stride_cosp, stride_cosj, stride_sinp, stride_sinj,
    stride_qb, stride_qh, stride_qm, stride_qk,
    stride_btb,
    num_kv_heads, num_bhk, seqlen_new, capacity, head_dim, head_dim_v, max_pos, rotary_half,
    group_size, seqlen_q, block_size, num_blocks,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr, ROTARY: tl.constexpr, ROTARY_INTERLEAVED: tl.constexpr,
    PAGED: tl.constexpr = False,
):
    """cache[b, h, seqlens[b] + i] = new[b, h, i] for i < Lnew (PAGED: at the block_table's
    (block, slot) of that token, _kv_slot). The position is read on the device; rows that would
    land outside [0, capacity) are dropped (never written out of bounds).
    ROTARY: k_new rotated first (_rotary) at position seqlens[b] - leftpad[b] + i, clamped into
    [0, max_pos) (the host checks it where it can), and the Lq q rows of the kv head's
    group_size query heads (the last Lq of the new tokens: q row i at position
    seqlens[b] + Lnew - Lq - leftpad[b] + i, clamped at 0) into QRot ((B, H, Lq, E) contiguous,
    q's dtype), which the split kernel reads as its q: rotated once, not once per split, and the
    split kernel's registers stay free for its tiles.
    Grid: grid_folded(cdiv(max(Lnew, Lq), BLOCK_L), B * Hkv)."""
    pid_l = tl.program_id(0)
    pid_bh = folded_id()
    if pid_bh >= num_bhk:
        return
    b = (pid_bh // num_kv_heads).to(tl.int64)
    h = (pid_bh % num_kv_heads).to(tl.int64)
    start = tl.load(SeqLens + b).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    pos = start + offs_l
    ok = (offs_l < seqlen_new) & (pos >= 0) & (pos < capacity)
    offs_l64 = offs_l.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    k_ok = ok[:, None] & (offs_d[None, :] < head_dim)
    v_ok = ok[:, None] & (offs_dv[None, :] < head_dim_v)
    k_row = KNew + b * stride_knb + h * stride_knh + offs_l64[:, None] * stride_knm
    k = tl.load(k_row + offs_d[None, :] * stride_knk, mask=k_ok)
    if ROTARY:
        if HAS_LEFTPAD:
            pad = tl.load(LeftPad + b).to(tl.int64)
        else:
            pad = 0
        rpos = tl.minimum(tl.maximum(start - pad + offs_l64, 0), max_pos - 1)
        partner = _rotary_partner(offs_d, rotary_half, ROTARY_INTERLEAVED)
        k = _rotary(k, k_row, partner[None, :] * stride_knk, k_ok, Cos, Sin, rpos, offs_d,
                    stride_cosp, stride_cosj, stride_sinp, stride_sinj, rotary_half,
                    ROTARY_INTERLEAVED).to(KCache.dtype.element_ty)
        q_ok = (offs_l < seqlen_q)[:, None] & (offs_d[None, :] < head_dim)
        qpos = tl.minimum(tl.maximum(start + seqlen_new - seqlen_q - pad + offs_l64, 0),
                          max_pos - 1)
        for g in range(0, group_size):
            hq = h * group_size + g
            q_row = Q + b * stride_qb + hq * stride_qh + offs_l64[:, None] * stride_qm
            q = tl.load(q_row + offs_d[None, :] * stride_qk, mask=q_ok)
            q = _rotary(q, q_row, partner[None, :] * stride_qk, q_ok, Cos, Sin, qpos, offs_d,
                        stride_cosp, stride_cosj, stride_sinp, stride_sinj, rotary_half,
                        ROTARY_INTERLEAVED)
            tl.store(QRot + ((b * num_kv_heads * group_size + hq) * seqlen_q
                             + offs_l64[:, None]) * head_dim + offs_d[None, :],
                     q.to(QRot.dtype.element_ty), mask=q_ok)
    row, slot = _kv_slot(BlockTable, b, pos, stride_btb, block_size, num_blocks, ok, PAGED)
    tl.store(KCache + row[:, None] * stride_kcb + h * stride_kch + slot[:, None] * stride_kcn
             + offs_d[None, :] * stride_kck, k, mask=k_ok)
    v = tl.load(VNew + b * stride_vnb + h * stride_vnh + offs_l64[:, None] * stride_vnm
                + offs_dv[None, :] * stride_vnk, mask=v_ok)
    tl.store(VCache + row[:, None] * stride_vcb + h * stride_vch + slot[:, None] * stride_vcn
             + offs_dv[None, :] * stride_vck, v, mask=v_ok)


@triton.autotune(
    configs=_tuning_configs(_DECODE_TUNING, interpret=(None, 16, 4, 1)),
    key=["HEAD_DIM", "HEAD_DIM_V", "BLOCK_M", "capacity_key", "SPLIT", "CAUSAL", "HAS_LEFTPAD"],
    prune_configs_by={"early_config_prune": _prune_decode},
)
@triton.jit
def _kvcache_split_kernel(
    Q, KCache, VCache, SeqLens, LeftPad, Out, OutPartial, LsePartial, Slopes, Sinks, BlockTable,
    Lse, qk_scale, softcap2,
    stride_qb, stride_qh, stride_qm, stride_qk,
    stride_kb, stride_kh, stride_kn, stride_kk,
    stride_vb, stride_vh, stride_vn, stride_vk,
    stride_ob, stride_oh, stride_om, stride_ok,
    stride_slb, stride_slh,
    num_heads, num_kv_heads, num_bhk, seqlen_q, group_size, capacity, num_new, num_splits,
    head_dim, head_dim_v,
    capacity_key,
    stride_btb, block_size, num_blocks, window_left, window_right,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
    CAUSAL: tl.constexpr, SPLIT: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, SINKS: tl.constexpr,
    PAGED: tl.constexpr, WINDOW: tl.constexpr, RETURN_LSE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Flash-decoding over one chunk of the cache for all query rows of one kv group: the
    Lq * (H / Hkv) rows form the M tile, so each K/V byte is read once per chunk. The chunk
    length is derived on the device from seqlens[b] (and leftpad[b], the first visible key, with
    HAS_LEFTPAD), so splits follow the real sequence.
    SPLIT: write normalised partial out (fp32) and lse per split for the combine kernel;
    otherwise write the final output. With the rotary embedding, Q is the rotated copy the
    append kernel wrote. SOFTCAP / ALIBI: the score modifiers (query row i at cache position
    total - Lq + i); SINKS: the sink joins the denominator here without SPLIT, else in the
    combine kernel. PAGED: K/V rows through the block table (_kv_slot, entries clamped into the
    pool). WINDOW: row i sees keys [last_key - window_left, last_key + window_right] (-1:
    unbounded), the chunks cover only the keys some row sees. RETURN_LSE (without SPLIT): lse
    (B, H, Lq) float32 into Lse. Grid: grid_folded(num_splits * cdiv(Lq * group, BLOCK_M),
    B * Hkv), split index fastest."""
    pid_s = tl.program_id(0) % num_splits
    pid_m = tl.program_id(0) // num_splits
    pid_bh = folded_id()
    if pid_bh >= num_bhk:
        return
    b = (pid_bh // num_kv_heads).to(tl.int64)
    hk = (pid_bh % num_kv_heads).to(tl.int64)

    total = tl.load(SeqLens + b) + num_new  # keys visible to the last query row
    total = tl.minimum(tl.maximum(total, 0), capacity)
    if HAS_LEFTPAD:  # keys before the first real token of a left-padded sequence are not seen
        first = tl.minimum(tl.maximum(tl.load(LeftPad + b), 0), total)
    else:
        first = 0
    if WINDOW:  # no row sees keys before the first row's window
        first = tl.where(window_left >= 0,
                         tl.minimum(tl.maximum(total - seqlen_q - window_left, first), total),
                         first)
    chunk = tl.cdiv(tl.cdiv(total - first, num_splits), BLOCK_N) * BLOCK_N
    start = first + pid_s * chunk
    end = tl.minimum(start + chunk, total)

    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row r = (g, i): head hk*group + g, query i
    r_ok = offs_r < seqlen_q * group_size
    g = offs_r // seqlen_q
    i = offs_r % seqlen_q
    h = hk * group_size + g.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < head_dim_v
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + i.to(tl.int64)[:, None] * stride_qm
                + offs_d[None, :] * stride_qk, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    if INTERP_BF16:
        q = q.to(tl.float32)
    if PAGED:
        K = KCache + hk * stride_kh
        V = VCache + hk * stride_vh
    else:
        K = KCache + b * stride_kb + hk * stride_kh
        V = VCache + b * stride_vb + hk * stride_vh
    last_key = total - seqlen_q + i  # bottom-right causal: row i sees keys <= last_key
    slope2 = 0.0
    if ALIBI:  # per row: the rows of a kv group belong to different query heads
        slope2 = tl.load(Slopes + b * stride_slb + h * stride_slh, mask=r_ok, other=0.0) * _LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_n64 = offs_n.to(tl.int64)
        n_ok = offs_n < end
        # PAGED: the table is read again for V rather than keeping the offsets live across the
        # softmax (the all-features variant spilled up to 740 B a thread on sm_90 otherwise)
        if PAGED:
            blk, slot = _kv_slot(BlockTable, b, offs_n, stride_btb, block_size, num_blocks,
                                 n_ok, True)
            k_off = blk * stride_kb + slot.to(tl.int64) * stride_kn
        else:
            k_off = offs_n64 * stride_kn
        k = tl.load(K + k_off[None, :] + offs_d[:, None] * stride_kk,
                    mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        if INTERP_BF16:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if SOFTCAP:
            s = softcap2 * _tanh(s / softcap2)
        if ALIBI:
            s -= _alibi_bias(last_key, offs_n, 0, slope2[:, None])
        vis = n_ok[None, :]
        if CAUSAL:
            vis = vis & (offs_n[None, :] <= last_key[:, None])
        if WINDOW:  # (-1: unbounded on that side)
            vis = vis & ((window_left < 0) | (offs_n[None, :] >= last_key[:, None] - window_left))
            vis = vis & ((window_right < 0)
                         | (offs_n[None, :] <= last_key[:, None] + window_right))
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if PAGED:
            blk, slot = _kv_slot(BlockTable, b, offs_n, stride_btb, block_size, num_blocks,
                                 n_ok, True)
            v_off = blk * stride_vb + slot.to(tl.int64) * stride_vn
        else:
            v_off = offs_n64 * stride_vn
        v = tl.load(V + v_off[:, None] + offs_dv[None, :] * stride_vk,
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        if INTERP_BF16:
            v = v.to(tl.float32)
            p = p.to(tl.bfloat16).to(tl.float32)
        else:
            p = p.to(VCache.dtype.element_ty)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    if SINKS:
        if not SPLIT:
            sink2 = tl.load(Sinks + h, mask=r_ok, other=0.0) * _LOG2E
            m_f = tl.maximum(m_i, sink2)
            alpha = tl.math.exp2(m_i - m_f)
            l_i = l_i * alpha + tl.math.exp2(sink2 - m_f)
            acc = acc * alpha[:, None]
            m_i = m_f
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if SPLIT:
        row = (b * num_heads + h) * seqlen_q + i  # flat (B, H, Lq) index
        slot = row * num_splits + pid_s
        tl.store(OutPartial + slot[:, None] * head_dim_v + offs_dv[None, :], out,
                 mask=r_ok[:, None] & dv_ok[None, :])
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
        tl.store(LsePartial + slot, lse, mask=r_ok)
    else:
        tl.store(Out + b * stride_ob + h[:, None] * stride_oh + i.to(tl.int64)[:, None] * stride_om
                 + offs_dv[None, :] * stride_ok, out.to(Out.dtype.element_ty),
                 mask=r_ok[:, None] & dv_ok[None, :])
        if RETURN_LSE:
            lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
            tl.store(Lse + (b * num_heads + h) * seqlen_q + i, lse, mask=r_ok)


@triton.jit
def _kvcache_combine_kernel(
    OutPartial, LsePartial, Out, Sinks, Lse,
    num_splits, head_dim_v, num_heads, seqlen_q,
    HEAD_DIM_V: tl.constexpr, BLOCK_SPLITS: tl.constexpr, SINKS: tl.constexpr,
    RETURN_LSE: tl.constexpr = False,
):
    """out[row] = sum_s exp(lse_s - lse) * out_s over the splits of one (b, h, i) row; splits
    that saw no key carry lse = -inf and weigh 0; SINKS: exp(sinks[h]) joins the denominator.
    RETURN_LSE: lse[row] = log(the denominator), -inf when it is 0. Grid: (B * H * Lq,)."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    s_ok = offs_s < num_splits
    lse = tl.load(LsePartial + row * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    if SINKS:
        sink = tl.load(Sinks + (row // seqlen_q) % num_heads)
        m = tl.maximum(m, sink)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m)
    o = tl.load(OutPartial + (row * num_splits + offs_s)[:, None] * head_dim_v + offs_dv[None, :],
                mask=s_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
    den = tl.sum(w, 0)
    if SINKS:
        den += tl.exp(sink - m)
    out = tl.sum(w[:, None] * o, 0) / tl.where(den == 0.0, 1.0, den)
    tl.store(Out + row * head_dim_v + offs_dv, out.to(Out.dtype.element_ty),
             mask=offs_dv < head_dim_v)
    if RETURN_LSE:
        tl.store(Lse + row, tl.where(den == 0.0, float("-inf"), m + tl.log(den)))


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def _head_block(d: int) -> int:
    # tl.dot needs K >= 16
    return max(16, triton.next_power_of_2(d))


def _seq_key(n: int) -> int:
    # autotune bucket: a new length re-tunes only when it crosses a power of two
    return max(16, triton.next_power_of_2(n))


def _dot_precision(fp32: bool) -> str:
    return "tf32x3" if fp32 else "tf32"


def _dot_args(dtype: torch.dtype, device: torch.device) -> dict:
    return {
        # fp32 inputs: 3xTF32 keeps fp32 accuracy on the tensor cores (plain TF32 would break
        # the "2x PyTorch's error" rule; "ieee" lowers to FMA loops that spill tens of KB per
        # thread at these tile sizes); ignored for fp16/bf16 and by the interpreter
        "DOT_PRECISION": _dot_precision(dtype == torch.float32),
        # bfloat16 under the interpreter, whose dot multiplies bf16 as its raw uint16 storage: dot
        # operands are widened to fp32 after loading (bf16 x bf16 products are exact in fp32, so
        # the result is what the tensor cores give), and a P or dS meant for a bf16 product is
        # rounded through bf16 and widened back (fastattn.triton._interpret makes that cast round
        # to nearest even, as the hardware's). Compiled kernels keep bf16 operands.
        "INTERP_BF16": device.type != "cuda" and dtype == torch.bfloat16,
    }


def _strides4(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _slope_strides(slopes: torch.Tensor | None) -> tuple[int, int]:
    """(batch, head) strides of the (B, H) slopes, or of (H,) slopes broadcast over the batch."""
    if slopes is None:
        return 0, 0
    return (0, slopes.stride(0)) if slopes.dim() == 1 else tuple(slopes.stride())


@device_guard
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
    scale: float, window_left: int, window_right: int, diag_offset: int,
    dropout_p: float, seed: int, softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of fused attention.

    q (B, H, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev) in one float dtype, any strides;
    attn_mask None or additive (B, H, L, S) in q's dtype (stride 0 on broadcast dims).
    softcap (0: none), alibi_slopes float32 (B, H) by strides, sinks float32 (H,): the score
    modifiers of csrc/fastattn.cpp.
    Returns out (B, H, L, Ev) in q's dtype, stored token-major ((B, L, H, Ev) memory, so that
    out.transpose(1, 2) is contiguous), and lse (B, H, L) float32 (natural log, -inf on rows
    with no visible key, the sink where there is one).
    """
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.empty((B, L, H, Ev), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or lse.numel() == 0 or S == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        if sinks is not None and S == 0:
            lse.copy_(sinks.view(1, H, 1).expand(B, H, L))
        return out, lse
    mask = attn_mask if attn_mask is not None else q  # dummy pointer, never read
    slopes = alibi_slopes if alibi_slopes is not None else lse  # dummy pointers, never read
    sinks_arg = sinks.contiguous() if sinks is not None else lse
    grid = lambda meta: grid_folded(triton.cdiv(L, meta["BLOCK_M"]), B * H)
    _attention_fwd_kernel[grid](
        q, k, v, mask, out, lse, slopes, sinks_arg, lse, lse,
        scale * math.log2(math.e), dropout_p, seed, softcap * math.log2(math.e),
        *q.stride(), *k.stride(), *v.stride(), *_strides4(attn_mask), *out.stride(),
        *_slope_strides(alibi_slopes),
        H, B * H, L, S, H // Hkv, E, Ev,
        window_left, window_right, diag_offset,
        _seq_key(L), _seq_key(S),
        HEAD_DIM=_head_block(E), HEAD_DIM_V=_head_block(Ev),
        HAS_MASK=attn_mask is not None, HAS_LEFT=window_left >= 0,
        HAS_RIGHT=window_right >= 0, DROPOUT=dropout_p > 0.0,
        SOFTCAP=softcap > 0.0, ALIBI=alibi_slopes is not None, SINKS=sinks is not None,
        VARLEN=False, BOTTOM_RIGHT=False, **_dot_args(q.dtype, q.device),
    )
    return out, lse


@device_guard
def attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, grad_lse: torch.Tensor | None,
    attn_mask: torch.Tensor | None, scale: float, window_left: int, window_right: int,
    diag_offset: int, dropout_p: float, seed: int, compute_dmask: bool, deterministic: bool,
    softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of fused attention from the saved lse.

    grad_out, out (B, H, L, Ev); lse, grad_lse (B, H, L) float32 (grad_lse optional); the other
    arguments as in attention_fwd. Returns dq (B, H, L, E), dk (B, Hkv, S, E), dv (B, Hkv, S, Ev)
    contiguous in q's dtype and dmask (B, H, L, S) in the mask's dtype when compute_dmask (else an
    empty tensor). deterministic: dQ from a separate kernel without atomics (bitwise repeatable);
    otherwise dQ is accumulated with fp32 atomic adds by the dK/dV kernel. dsinks (H,) float32
    when sinks are given (else an empty tensor); the slopes get no gradient.
    """
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[-1]
    dev = q.device
    dk = torch.zeros((B, Hkv, S, E), dtype=k.dtype, device=dev)
    dv = torch.zeros((B, Hkv, S, Ev), dtype=v.dtype, device=dev)
    want_dmask = compute_dmask and attn_mask is not None
    dmask = (torch.zeros((B, H, L, S), dtype=attn_mask.dtype, device=dev) if want_dmask
             else q.new_empty((0,)))
    dsinks = torch.zeros((H if sinks is not None else 0,), dtype=torch.float32, device=dev)
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        if sinks is not None and grad_lse is not None and S == 0 and q.shape[2] > 0:
            dsinks = grad_lse.float().sum((0, 2))  # no key: lse = sink
        return torch.zeros((B, H, L, E), dtype=q.dtype, device=dev), dk, dv, dmask, dsinks

    lse = lse.contiguous()
    delta = torch.empty((B, H, L), dtype=torch.float32, device=dev)
    has_grad_lse = grad_lse is not None
    grad_lse_c = grad_lse.contiguous() if has_grad_lse else delta
    block_m = 32 if Ev <= 128 else 16
    if deterministic:
        dq = torch.empty((B, H, L, E), dtype=q.dtype, device=dev)
    else:
        dq = torch.zeros((B, H, L, E), dtype=torch.float32, device=dev)
    _attention_bwd_preprocess_kernel[grid_folded(triton.cdiv(L, block_m), B * H)](
        out, grad_out, grad_lse_c, delta,
        *out.stride(), *grad_out.stride(),
        H, B * H, L, Ev,
        HEAD_DIM_V=_head_block(Ev), HAS_GRAD_LSE=has_grad_lse, BLOCK_M=block_m,
    )
    if sinks is not None:
        _attention_sink_grad_kernel[(H,)](sinks.contiguous(), lse, delta, dsinks, H, B, L,
                                          BLOCK=min(1024, max(16, triton.next_power_of_2(L))))
    slopes = alibi_slopes if alibi_slopes is not None else lse  # dummy pointer, never read

    mask = attn_mask if attn_mask is not None else q
    dmask_arg = dmask if want_dmask else q
    common = dict(
        HEAD_DIM=_head_block(E), HEAD_DIM_V=_head_block(Ev),
        HAS_MASK=attn_mask is not None, HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
        DROPOUT=dropout_p > 0.0, SOFTCAP=softcap > 0.0, ALIBI=alibi_slopes is not None,
        VARLEN=False, BOTTOM_RIGHT=False, **_dot_args(q.dtype, dev),
    )
    qk_scale = scale * math.log2(math.e)
    softcap2 = softcap * math.log2(math.e)
    grid = lambda meta: grid_folded(triton.cdiv(S, meta["BLOCK_N"]), B * Hkv)
    _attention_bwd_dkdv_kernel[grid](
        q, k, v, mask, grad_out, lse, delta, dq, dk, dv, dmask_arg, slopes, lse, lse,
        scale, qk_scale, dropout_p, seed, softcap2,
        *q.stride(), *k.stride(), *v.stride(), *_strides4(attn_mask), *grad_out.stride(),
        *dq.stride(), *dk.stride(), *dv.stride(), *_strides4(dmask if want_dmask else None),
        *_slope_strides(alibi_slopes),
        H, Hkv, B * Hkv, L, S, H // Hkv, E, Ev,
        window_left, window_right, diag_offset,
        _seq_key(L), _seq_key(S),
        ATOMIC_DQ=not deterministic, STORE_DMASK=want_dmask, **common,
    )
    if deterministic:
        grid = lambda meta: grid_folded(triton.cdiv(L, meta["BLOCK_M"]), B * H)
        _attention_bwd_dq_kernel[grid](
            q, k, v, mask, grad_out, lse, delta, dq, slopes, lse, lse,
            scale, qk_scale, dropout_p, seed, softcap2,
            *q.stride(), *k.stride(), *v.stride(), *_strides4(attn_mask), *grad_out.stride(),
            *dq.stride(), *_slope_strides(alibi_slopes),
            H, B * H, L, S, H // Hkv, E, Ev,
            window_left, window_right, diag_offset,
            _seq_key(L), _seq_key(S),
            **common,
        )
    else:
        dq = dq.to(q.dtype)
    return dq, dk, dv, dmask, dsinks


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _device_limits(device.index if device.index is not None else
                              torch.cuda.current_device())[2]
    return 4  # interpreter: a notional small device


def append_block_l(seqlen_new: int, head_dim: int, rotary: bool) -> int:
    """New tokens per program of the append kernel: up to 16; with the rotary embedding at most
    1024 elements a tile (4 rows at E = 256), whose rotation keeps the element, its partner and
    the two table values live (16 rows at E = 256 spill ~1 KB a thread on sm_80/sm_90)."""
    block = min(16, triton.next_power_of_2(seqlen_new))
    return min(block, max(1, 1024 // _head_block(head_dim))) if rotary else block


def kvcache_num_splits(batch: int, kv_heads: int, m_blocks: int, capacity: int,
                       device: torch.device) -> int:
    """Number of cache chunks per (b, kv head): enough programs for ~4 resident per SM (decoding
    is bandwidth-bound: the SMs must keep many loads in flight), but no chunk shorter than 256
    cache slots, where the combine pass would cost more than it saves."""
    programs = max(1, batch * kv_heads * m_blocks)
    want = triton.cdiv(4 * _sm_count(device), programs)
    return max(1, min(want, triton.cdiv(capacity, 256), 128))


@device_guard
def attention_kvcache(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    k_new: torch.Tensor | None, v_new: torch.Tensor | None, scale: float, causal: bool,
    cache_leftpad: torch.Tensor | None = None, rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None, rotary_interleaved: bool = False,
    softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
    window_left: int = -1, window_right: int = -1, *,
    return_lse: bool = False, num_splits: int | None = None,
):
    """Decoding attention; appends k_new/v_new to the caches in place first.

    q (B, H, Lq, E); k_cache (B, Hkv, capacity, E), v_cache (B, Hkv, capacity, Ev), or with
    block_table int32 (B, max_blocks) the paged pools (num_blocks, Hkv, block_size, E[v]);
    cache_seqlens int32 (B,); k_new (B, Hkv, Lnew, E), v_new (B, Hkv, Lnew, Ev) or None;
    cache_leftpad int32 (B,) or None. Query i of batch b is at position total_b - Lq + i and sees
    keys [lp_b, total_b - Lq + i] (causal) or [lp_b, total_b), narrowed by the window
    (window_left / window_right, -1 unbounded), total_b = seqlens[b] (+ Lnew with k_new),
    lp_b = cache_leftpad[b] (0 without).
    rotary_cos/rotary_sin (max_pos, rotary_dim / 2) (with k_new): k_new token i rotated at
    position seqlens[b] - lp_b + i, q token i at total_b - Lq - lp_b + i (csrc/fastattn.cpp),
    both by the append kernel (q into a rotated copy the split kernel reads). softcap /
    alibi_slopes ((H,) or (B, H)) / sinks (H,): the score modifiers, query i at cache position
    total_b - Lq + i. num_splits overrides the split-K heuristic (1 = no combine pass). Returns
    out (B, H, Lq, Ev) contiguous in q's dtype, and with return_lse (out, lse (B, H, Lq)
    float32).
    """
    B, H, Lq, E = q.shape
    Hkv, Ev = k_cache.shape[1], v_cache.shape[-1]
    paged = block_table is not None
    block_size = k_cache.shape[2] if paged else 1
    cap = block_table.shape[1] * block_size if paged else k_cache.shape[2]
    Lnew = k_new.shape[2] if k_new is not None else 0
    group = H // Hkv
    dev = q.device
    seqlens = cache_seqlens.to(torch.int32).contiguous()
    leftpad = seqlens if cache_leftpad is None else cache_leftpad.to(torch.int32).contiguous()
    table = block_table.to(torch.int32).contiguous() if paged else seqlens  # dummy when contiguous
    num_blocks = max(1, k_cache.shape[0])
    out = torch.empty((B, H, Lq, Ev), dtype=q.dtype, device=dev)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=dev) if return_lse else None
    rotary = rotary_cos is not None and k_new is not None and k_new.numel() > 0
    if rotary:
        cos, sin = rotary_cos, rotary_sin
        rot_args = (*cos.stride(), *sin.stride())
        max_pos, rotary_half = cos.shape[0], cos.shape[1]
        q_rot = torch.empty((B, H, Lq, E), dtype=q.dtype, device=dev)
    else:
        cos = sin = seqlens  # dummy pointers, never read
        rot_args, max_pos, rotary_half = (0, 0, 0, 0), 1, 0
        q_rot = q
    if k_new is not None and k_new.numel() > 0:
        rows_l = max(Lnew, Lq) if rotary else Lnew
        block_l = append_block_l(rows_l, E, rotary)
        _kvcache_append_kernel[grid_folded(triton.cdiv(rows_l, block_l), B * Hkv)](
            k_new, v_new, k_cache, v_cache, seqlens, leftpad, cos, sin, q, q_rot, table,
            *k_new.stride(), *v_new.stride(), *k_cache.stride(), *v_cache.stride(), *rot_args,
            *q.stride(), table.stride(0) if paged else 0,
            Hkv, B * Hkv, Lnew, cap, E, Ev, max_pos, rotary_half, group, Lq, block_size,
            num_blocks,
            HEAD_DIM=_head_block(E), HEAD_DIM_V=_head_block(Ev), BLOCK_L=block_l,
            HAS_LEFTPAD=cache_leftpad is not None, ROTARY=rotary,
            ROTARY_INTERLEAVED=bool(rotary_interleaved) and rotary, PAGED=paged,
        )
    q = q_rot
    if out.numel() == 0:
        if lse is not None:
            lse.fill_(float("-inf"))
        return (out, lse) if return_lse else out
    rows = Lq * group
    block_m = min(_decode_max_block_m(q.dtype == torch.float32, max(E, Ev)),
                  max(16, triton.next_power_of_2(rows)))
    m_blocks = triton.cdiv(rows, block_m)
    if num_splits is None:
        num_splits = kvcache_num_splits(B, Hkv, m_blocks, cap, dev)
    num_splits = max(1, int(num_splits))
    split = num_splits > 1
    if split:
        out_partial = torch.empty((B * H * Lq, num_splits, Ev), dtype=torch.float32, device=dev)
        lse_partial = torch.empty((B * H * Lq, num_splits), dtype=torch.float32, device=dev)
    else:
        out_partial = lse_partial = out  # unused
    slopes = alibi_slopes if alibi_slopes is not None else seqlens  # dummy pointers, never read
    sinks_arg = sinks.contiguous() if sinks is not None else seqlens
    lse_arg = lse if lse is not None else seqlens
    window = window_left >= 0 or window_right >= 0
    _kvcache_split_kernel[grid_folded(num_splits * m_blocks, B * Hkv)](
        q, k_cache, v_cache, seqlens, leftpad,
        out, out_partial, lse_partial, slopes, sinks_arg, table, lse_arg,
        scale * math.log2(math.e), softcap * math.log2(math.e),
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        *_slope_strides(alibi_slopes),
        H, Hkv, B * Hkv, Lq, group, cap, Lnew, num_splits, E, Ev,
        _seq_key(cap),
        table.stride(0) if paged else 0, block_size, num_blocks, int(window_left),
        int(window_right),
        HEAD_DIM=_head_block(E), HEAD_DIM_V=_head_block(Ev), BLOCK_M=block_m,
        CAUSAL=bool(causal), SPLIT=split, HAS_LEFTPAD=cache_leftpad is not None,
        SOFTCAP=softcap > 0.0, ALIBI=alibi_slopes is not None, SINKS=sinks is not None,
        PAGED=paged, WINDOW=window, RETURN_LSE=return_lse,
        **_dot_args(q.dtype, dev),
    )
    if split:
        _kvcache_combine_kernel[(B * H * Lq,)](
            out_partial, lse_partial, out, sinks_arg, lse_arg, num_splits, Ev, H, Lq,
            HEAD_DIM_V=_head_block(Ev), BLOCK_SPLITS=triton.next_power_of_2(num_splits),
            SINKS=sinks is not None, RETURN_LSE=return_lse,
        )
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# packed variable-length attention (fastattn.attention_varlen)
# ---------------------------------------------------------------------------------------------
# attention_varlen runs the sdpa kernels with VARLEN on: the grid covers (blocks of
# max_seqlen_q or max_seqlen_k, B * heads), each program reads its sequence's first rows and
# lengths from cu_seqlens (clamped into the packed rows), programs past their sequence's end
# return at once, and the loops run on the sequence's rows as on one batch entry of
# attention_fwd. lse / delta are (H, total_q); the dropout counter of (h, row r of sequence b,
# key j) is (h * total_q + cu_q[b]) * cdiv(total_k, 4) + (r - cu_q[b]) * cdiv(S_b, 4) + j // 4:
# disjoint between sequences and heads, the same in the forward and both backward kernels.
def _packed_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, head, row, dim) strides of a packed (total, heads, dim) tensor for the VARLEN
    kernels, whose batch entry index is the sequence's first row: the row stride twice."""
    return t.stride(0), t.stride(1), t.stride(0), t.stride(2)


@device_guard
def attention_varlen_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
    window_left: int, window_right: int, bottom_right: bool, dropout_p: float, seed: int,
    softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of packed variable-length attention (csrc/fastattn.cpp: attention_varlen_fwd).

    q (total_q, H, E), k (total_k, Hkv, E), v (total_k, Hkv, Ev) in one float dtype, any
    strides; cu_seqlens_q / cu_seqlens_k int32 (B + 1,); sequence b: rows [cu_q[b], cu_q[b + 1])
    against keys [cu_k[b], cu_k[b + 1]), at most max_seqlen_q / max_seqlen_k of them (the grid
    covers that many). Window, dropout and score modifiers as in attention_fwd, per sequence
    (diag_offset = S_b - L_b when bottom_right, else 0); alibi_slopes float32 (B, H) by strides.
    Returns out (total_q, H, Ev) contiguous in q's dtype and lse (H, total_q) float32.
    """
    total_q, H, E = q.shape
    total_k, Hkv, Ev = k.shape[0], k.shape[1], v.shape[-1]
    B = cu_seqlens_q.shape[0] - 1
    # zeros: rows a too small max_seqlen_q (unchecked on GPU tensors) leaves out stay defined
    out = torch.zeros((total_q, H, Ev), dtype=q.dtype, device=q.device)
    lse = torch.full((H, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or B == 0 or max_seqlen_q == 0:
        return out, lse
    if total_k == 0 or max_seqlen_k == 0:
        if sinks is not None:
            lse.copy_(sinks.view(H, 1).expand(H, total_q))
        return out, lse
    cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    slopes = alibi_slopes if alibi_slopes is not None else lse  # dummy pointers, never read
    sinks_arg = sinks.contiguous() if sinks is not None else lse
    grid = lambda meta: grid_folded(triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), B * H)
    _attention_fwd_kernel[grid](
        q, k, v, q, out, lse, slopes, sinks_arg, cu_q, cu_k,
        scale * math.log2(math.e), dropout_p, seed, softcap * math.log2(math.e),
        *_packed_strides(q), *_packed_strides(k), *_packed_strides(v), 0, 0, 0, 0,
        *_packed_strides(out), *_slope_strides(alibi_slopes),
        H, B * H, total_q, total_k, H // Hkv, E, Ev,
        window_left, window_right, 0,
        _seq_key(max_seqlen_q), _seq_key(max_seqlen_k),
        HEAD_DIM=_head_block(E), HEAD_DIM_V=_head_block(Ev),
        HAS_MASK=False, HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
        DROPOUT=dropout_p > 0.0, SOFTCAP=softcap > 0.0, ALIBI=alibi_slopes is not None,
        SINKS=sinks is not None, VARLEN=True, BOTTOM_RIGHT=bool(bottom_right),
        **_dot_args(q.dtype, q.device),
    )
    return out, lse


@device_guard
def attention_varlen_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, grad_lse: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
    max_seqlen_k: int, scale: float, window_left: int, window_right: int, bottom_right: bool,
    dropout_p: float, seed: int, deterministic: bool, softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of attention_varlen_fwd from the saved lse (H, total_q); grad_lse optional.
    Returns dq (total_q, H, E), dk (total_k, Hkv, E), dv (total_k, Hkv, Ev) in q's dtype, as
    (total, heads, dim) views of (heads, total, dim) buffers, and dsinks (H,) float32 when sinks
    are given (else an empty tensor). deterministic: dQ from its own kernel without atomics."""
    total_q, H, E = q.shape
    total_k, Hkv, Ev = k.shape[0], k.shape[1], v.shape[-1]
    B = cu_seqlens_q.shape[0] - 1
    dev = q.device
    dk = torch.zeros((Hkv, total_k, E), dtype=k.dtype, device=dev).transpose(0, 1)
    dv = torch.zeros((Hkv, total_k, Ev), dtype=v.dtype, device=dev).transpose(0, 1)
    dsinks = torch.zeros((H if sinks is not None else 0,), dtype=torch.float32, device=dev)
    lse = lse.contiguous()
    delta = torch.zeros((H, total_q), dtype=torch.float32, device=dev)
    has_grad_lse = grad_lse is not None
    grad_lse_c = grad_lse.contiguous() if has_grad_lse else delta
    if total_q * H > 0:
        # delta = rowsum(dO * O) - grad_lse over the (1, H, total_q) rows
        block_m = 32 if Ev <= 128 else 16
        o4, do4 = out.unsqueeze(0).transpose(1, 2), grad_out.unsqueeze(0).transpose(1, 2)
        _attention_bwd_preprocess_kernel[grid_folded(triton.cdiv(total_q, block_m), H)](
            o4, do4, grad_lse_c, delta, *o4.stride(), *do4.stride(), H, H, total_q, Ev,
            HEAD_DIM_V=_head_block(Ev), HAS_GRAD_LSE=has_grad_lse, BLOCK_M=block_m,
        )
        if sinks is not None:
            _attention_sink_grad_kernel[(H,)](
                sinks.contiguous(), lse, delta, dsinks, H, 1, total_q,
                BLOCK=min(1024, max(16, triton.next_power_of_2(total_q))))
    if (q.numel() == 0 or k.numel() == 0 or v.numel() == 0 or B == 0 or max_seqlen_q == 0
            or max_seqlen_k == 0):
        dq = torch.zeros((H, total_q, E), dtype=q.dtype, device=dev).transpose(0, 1)
        return dq, dk, dv, dsinks
    if deterministic:
        dq = torch.zeros((H, total_q, E), dtype=q.dtype, device=dev).transpose(0, 1)
    else:
        dq = torch.zeros((H, total_q, E), dtype=torch.float32, device=dev).transpose(0, 1)
    cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    slopes = alibi_slopes if alibi_slopes is not None else lse  # dummy pointer, never read
    common = dict(
        HEAD_DIM=_head_block(E), HEAD_DIM_V=_head_block(Ev),
        HAS_MASK=False, HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
        DROPOUT=dropout_p > 0.0, SOFTCAP=softcap > 0.0, ALIBI=alibi_slopes is not None,
        VARLEN=True, BOTTOM_RIGHT=bool(bottom_right), **_dot_args(q.dtype, dev),
    )
    qk_scale = scale * math.log2(math.e)
    softcap2 = softcap * math.log2(math.e)
    strides = (*_packed_strides(q), *_packed_strides(k), *_packed_strides(v), 0, 0, 0, 0,
               *_packed_strides(grad_out), *_packed_strides(dq))
    grid = lambda meta: grid_folded(triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), B * Hkv)
    _attention_bwd_dkdv_kernel[grid](
        q, k, v, q, grad_out, lse, delta, dq, dk, dv, q, slopes, cu_q, cu_k,
        scale, qk_scale, dropout_p, seed, softcap2,
        *strides, *_packed_strides(dk), *_packed_strides(dv), 0, 0, 0, 0,
        *_slope_strides(alibi_slopes),
        H, Hkv, B * Hkv, total_q, total_k, H // Hkv, E, Ev,
        window_left, window_right, 0,
        _seq_key(max_seqlen_q), _seq_key(max_seqlen_k),
        ATOMIC_DQ=not deterministic, STORE_DMASK=False, **common,
    )
    if deterministic:
        grid = lambda meta: grid_folded(triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), B * H)
        _attention_bwd_dq_kernel[grid](
            q, k, v, q, grad_out, lse, delta, dq, slopes, cu_q, cu_k,
            scale, qk_scale, dropout_p, seed, softcap2,
            *strides, *_slope_strides(alibi_slopes),
            H, B * H, total_q, total_k, H // Hkv, E, Ev,
            window_left, window_right, 0,
            _seq_key(max_seqlen_q), _seq_key(max_seqlen_k),
            **common,
        )
    else:
        # (heads, total, E) float32 -> q's dtype, the same (total, heads, E) view
        dq = dq.transpose(0, 1).to(q.dtype).transpose(0, 1)
    return dq, dk, dv, dsinks


@device_guard
def attention_dropout_mask(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float,
    seed: int,
) -> torch.Tensor:
    """The dropout keep mask attention_fwd / attention_varlen_fwd draw with (dropout_p, seed)
    (csrc/fastattn.cpp: attention_dropout_mask): cu_seqlens None: bool (B, H, L, S) from
    q (B, H, L, E), k (B, Hkv, S, E); else bool (total_q, H, max_seqlen_k) from q (total_q, H, E),
    k (total_k, Hkv, E), False past each sequence's keys."""
    varlen = cu_seqlens_q is not None
    if varlen:
        (total_q, H, _), total_k = q.shape, k.shape[0]
        B = cu_seqlens_q.shape[0] - 1
        keep = torch.zeros((total_q, H, max_seqlen_k), dtype=torch.uint8, device=q.device)
        sizes, strides, blocks_m = (total_q, total_k), _packed_strides(keep), max_seqlen_q
        cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    else:
        B, H, L, _ = q.shape
        keep = torch.zeros((B, H, L, k.shape[2]), dtype=torch.uint8, device=q.device)
        sizes, strides, blocks_m = (L, k.shape[2]), keep.stride(), L
        cu_q = cu_k = keep  # dummy pointers, never read
    if keep.numel() and B * H and blocks_m:
        _attention_dropout_mask_kernel[grid_folded(triton.cdiv(blocks_m, 32), B * H)](
            keep, cu_q, cu_k, dropout_p, seed, *strides, H, B * H, *sizes, keep.shape[-1],
            VARLEN=varlen, BLOCK_M=32, BLOCK_N=64,
        )
    return keep.view(torch.bool)
