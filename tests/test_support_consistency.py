"""What ``_supports`` accepts, the kernels run: the option grid of attention (dtypes, head dims,
mask, causal, window, dropout, GQA, lse), of layer_norm / rms_norm (input, weight and bias
dtypes, residual, offset) and of the int8 ops (input or output dtype) walked through each
backend's support predicate, and every accepted call run on tiny shapes through the Triton
interpreter and the CUDA host emulator (csrc/cuda/emulation, built by tests/test_cuda_build.py).
A call that a predicate accepts and a kernel then rejects would raise under an explicit backend,
and under ``backend="auto"`` would fail where the next backend would have run."""

from __future__ import annotations

import ctypes
import itertools
import math
import types
from pathlib import Path

import pytest
import torch

from fastattn.ops import attention as ops_attention
from fastattn.ops import int8 as ops_int8
from fastattn.ops import layer_norm as ops_layer_norm
from tests import test_cuda_build as cb
from tests.test_cuda_build import builds, emu  # noqa: F401  (the emulator's fixtures)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# head dims from every CUDA bucket the emulator builds (64, 96, 128, 256) and past the maximum
HEAD_DIMS = (40, 64, 80, 128, 256, 320)
# (mask, causal, window, gqa, lse): rotated over the grid so that each option is on and off for
# every dtype (one run per accepted point keeps the interpreter and the emulator fast)
OPTIONS = [(True, True, False, True, False), (False, False, True, False, True),
           (True, False, True, True, True), (False, True, False, False, False)]
GRID = list(itertools.product(DTYPES, HEAD_DIMS, (False, True)))
CUDA_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"


def _options(i: int) -> dict:
    return dict(zip(("mask", "causal", "window", "gqa", "lse"), OPTIONS[i % len(OPTIONS)],
                    strict=True))


def _inputs(dtype, E, opt, B=1, H=2, L=5, S=7):
    Hkv = 1 if opt["gqa"] else H
    q = torch.randn(B, H, L, E).to(dtype)
    k = torch.randn(B, Hkv, S, E).to(dtype)
    v = torch.randn(B, Hkv, S, E).to(dtype)
    mask = torch.randn(B, H, L, S).to(dtype) if opt["mask"] else None
    return q, k, v, mask


def _accepted(backend, dtype, E, dropout, device):
    return ops_attention._supports(backend, torch.device(device), (dtype, E, dropout)) is None


# ---------------------------------------------------------------------------------------------
# Triton: the interpreter runs what is accepted for CPU tensors; on a (pretend) A100 / H100 what
# is accepted has a tile that fits, for every kernel, masked or not
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(len(GRID)))
def test_triton_accepted_calls_run(i):
    pytest.importorskip("triton", reason="needs triton installed")
    from fastattn.triton.attention import _interpret

    if not _interpret():
        pytest.skip("runs the kernels under TRITON_INTERPRET=1")
    dtype, E, dropout = GRID[i]
    if not _accepted("triton", dtype, E, dropout, "cpu"):
        assert E > ops_attention._MAX_HEAD_DIM
        return
    opt = _options(i)
    q, k, v, mask = _inputs(dtype, E, opt)
    q.requires_grad_()
    out = ops_attention.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=0.25 if dropout else 0.0, is_causal=opt["causal"],
        window=(2, 1) if opt["window"] else None, enable_gqa=opt["gqa"],
        return_lse=opt["lse"], backend="triton")
    out, lse = out if opt["lse"] else (out, None)
    loss = out.float().sum() + (lse[torch.isfinite(lse)].sum() if lse is not None else 0)
    (dq,) = torch.autograd.grad(loss, (q,))
    assert torch.isfinite(out.float()).all() and torch.isfinite(dq.float()).all()


@pytest.mark.parametrize("major,smem", [(8, 166_912), (9, 232_448), (8, 101_376)])
def test_triton_accepted_calls_have_a_fitting_tile(monkeypatch, major, smem):
    """On an A100, an H100 and a 99 KB consumer part: whenever _supports accepts a CUDA call,
    every kernel's pruning keeps a candidate for it, masked or not (and every candidate of the
    lists is compiled within the limits by test_triton_resources.py). When none fits, the call
    is refused with the reason, never launched."""
    pytest.importorskip("triton", reason="needs triton installed")
    from fastattn.triton import attention as A

    monkeypatch.setattr(A, "_interpret", lambda: False)
    monkeypatch.setattr(A, "_device_limits", lambda index: (major, smem, 100))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cuda = torch.device("cuda", 0)
    for dtype, E in itertools.product(DTYPES, (16, 40, 64, 80, 128, 200, 256)):
        why = ops_attention._supports("triton", cuda, (dtype, E, False))
        elem = torch.empty((), dtype=dtype).element_size()
        q = types.SimpleNamespace(device=cuda, element_size=lambda e=elem: e, dtype=dtype)
        for kernel, table in ((A._prune_fwd, A._FWD_TUNING), (A._prune_bwd_dkdv, A._DKDV_TUNING),
                              (A._prune_bwd_dq, A._DQ_TUNING),
                              (A._prune_decode, A._DECODE_TUNING)):
            configs = A._tuning_configs(table, interpret=None)
            for has_mask in (False, True):
                args = dict(HEAD_DIM=A._head_block(E), HEAD_DIM_V=A._head_block(E),
                            HAS_MASK=has_mask,
                            BLOCK_M=A._decode_max_block_m(elem == 4, A._head_block(E)))
                if why is None:
                    assert kernel(configs, {"Q": q}, **args), (dtype, E, has_mask)
                else:
                    assert "fits" in why
        if why is not None:
            print(f"refused on sm_{major}x/{smem} B: {why}")


# the score modifiers (softcap, ALiBi, sinks all on) at the smallest, the largest and a refused
# head dim, with and without dropout: whatever cpu / triton accept runs, forward and backward
MOD_POINTS = [i for i, (_, E, _) in enumerate(GRID) if E in (40, 256, 320)]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("i", MOD_POINTS)
def test_score_modifier_calls_run(backend, i):
    from fastattn.ops._backend import availability

    if availability(backend, "cpu", "attention_fwd" if backend == "cpu" else None) is not None:
        pytest.skip(f"backend {backend!r} cannot run here")
    dtype, E, dropout = GRID[i]
    key = (dtype, E, dropout, True)
    if ops_attention._supports(backend, torch.device("cpu"), key) is not None:
        assert E > ops_attention._MAX_HEAD_DIM
        return
    opt = _options(i)
    q, k, v, mask = _inputs(dtype, E, opt)
    H = q.shape[1]
    sinks = torch.randn(H, requires_grad=True)
    q.requires_grad_()
    out, lse = ops_attention.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=0.25 if dropout else 0.0, is_causal=opt["causal"],
        window=(2, 1) if opt["window"] else None, enable_gqa=opt["gqa"], return_lse=True,
        softcap=3.0, alibi_slopes=torch.rand(H), sinks=sinks, backend=backend)
    dq, dsinks = torch.autograd.grad(out.float().sum() + lse.sum(), (q, sinks))
    for t in (out, lse, dq, dsinks):
        assert torch.isfinite(t.float()).all()


# ---------------------------------------------------------------------------------------------
# CUDA: the host emulator runs what is accepted (the bindings of csrc/cuda take what the kernels
# take, and reject dropout: check_no_dropout)
# ---------------------------------------------------------------------------------------------
def test_cuda_refuses_what_the_binding_rejects():
    binding = (CUDA_DIR / "attention_cuda.cpp").read_text()
    if "check_no_dropout(dropout_p, op)" in binding:
        for dtype, E in itertools.product(DTYPES, HEAD_DIMS):
            assert not _accepted("cuda", dtype, E, True, "cuda"), (dtype, E)
    if "check_no_score_mods(" in binding:
        for dtype, E in itertools.product(DTYPES, HEAD_DIMS):
            why = ops_attention._supports("cuda", torch.device("cuda"), (dtype, E, False, True))
            assert why is not None, (dtype, E)


@pytest.mark.parametrize("i", range(len(GRID)))
def test_cuda_accepted_calls_run_on_the_emulator(i, request):
    dtype, E, dropout = GRID[i]
    if not _accepted("cuda", dtype, E, dropout, "cuda"):
        return
    if cb.NVCC is None:
        pytest.skip("nvcc is not on PATH")
    emulator = request.getfixturevalue("emu")
    assert not dropout  # the kernels take no dropout argument: accepted dropout cannot run
    opt = _options(i)
    q, k, v, mask = _inputs(dtype, E, opt)
    L, S = q.shape[2], k.shape[2]
    wl, wr, diag = cb.window_args(L, S, opt["causal"], (2, 1) if opt["window"] else None,
                                  "top_left")
    scale = 1.0 / math.sqrt(E)
    out, lse = cb.attention_fwd(emulator, q, k, v, mask, scale, wl, wr, diag)
    glse = torch.randn(lse.shape) if opt["lse"] else None
    dq, dk, dv, _ = cb.attention_bwd(emulator, torch.randn_like(out), q, k, v, out, lse, glse, mask,
                                     scale, wl, wr, diag, opt["mask"])
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t.float()).all()


# ---------------------------------------------------------------------------------------------
# attention_with_kvcache with the rotary embedding: what _kvcache_supports accepts on each GPU
# backend runs (Triton under the interpreter, CUDA on the emulator)
# ---------------------------------------------------------------------------------------------
KV_GRID = list(itertools.product(DTYPES, HEAD_DIMS))


def _kv_inputs(dtype, E, i):
    B, H, Hkv, Lq, cap = 2, 4, 2 if i % 2 else 4, 1 + i % 3, 24
    q = torch.randn(B, H, Lq, E).to(dtype)
    kc, vc = torch.randn(B, Hkv, cap, E).to(dtype), torch.randn(B, Hkv, cap, E).to(dtype)
    kn, vn = torch.randn(B, Hkv, Lq, E).to(dtype), torch.randn(B, Hkv, Lq, E).to(dtype)
    sl = torch.tensor([3, 20], dtype=torch.int32)
    lp = torch.tensor([1, 0], dtype=torch.int32) if i % 2 else None
    rd = (E // 2) & ~1 if i % 3 == 1 else E & ~1
    freqs = torch.outer(torch.arange(32).float(), torch.rand(rd // 2))
    table_dtype = torch.float32 if i % 2 else dtype
    cos, sin = freqs.cos().to(table_dtype), freqs.sin().to(table_dtype)
    return q, kc, vc, sl, kn, vn, lp, cos, sin, bool(i % 4 >= 2)


@pytest.mark.parametrize("i", range(len(KV_GRID)))
def test_triton_kvcache_rotary_accepted_calls_run(i):
    pytest.importorskip("triton", reason="needs triton installed")
    from fastattn.triton.attention import _interpret

    if not _interpret():
        pytest.skip("runs the kernels under TRITON_INTERPRET=1")
    dtype, E = KV_GRID[i]
    if ops_attention._kvcache_supports("triton", torch.device("cpu"), (dtype, E, True)):
        assert E > ops_attention._MAX_HEAD_DIM
        return
    q, kc, vc, sl, kn, vn, lp, cos, sin, inter = _kv_inputs(dtype, E, i)
    out = ops_attention.attention_with_kvcache(q, kc, vc, sl, kn, vn, cache_leftpad=lp,
                                               rotary_cos=cos, rotary_sin=sin,
                                               rotary_interleaved=inter, backend="triton")
    assert torch.isfinite(out.float()).all() and torch.isfinite(kc.float()).all()


@pytest.mark.parametrize("i", range(len(KV_GRID)))
def test_cuda_kvcache_rotary_accepted_calls_run_on_the_emulator(i, request):
    dtype, E = KV_GRID[i]
    if ops_attention._kvcache_supports("cuda", torch.device("cuda"), (dtype, E, True)):
        return
    if cb.NVCC is None:
        pytest.skip("nvcc is not on PATH")
    emulator = request.getfixturevalue("emu")
    q, kc, vc, sl, kn, vn, lp, cos, sin, inter = _kv_inputs(dtype, E, i)
    out, _ = cb.attention_kvcache(emulator, q, kc, vc, sl, lp, kn, vn, 1.0 / math.sqrt(E), True,
                                  rotary_cos=cos, rotary_sin=sin, rotary_interleaved=inter)
    assert torch.isfinite(out.float()).all() and torch.isfinite(kc.float()).all()


# ---------------------------------------------------------------------------------------------
# attention_with_kvcache for serving (block_table, window, return_lse, Lnew != Lq): what
# _kvcache_supports accepts runs on Triton (interpreter) and on the CUDA emulator
# ---------------------------------------------------------------------------------------------
SERVING = ("paged", "window", "lse", "lnew")
SERVING_GRID = list(itertools.product(DTYPES, (40, 128, 320), range(4)))


def _serving_key(dtype, E, i):
    on = [i == j or i == 3 for j in range(4)]  # each feature alone, then all four
    return (dtype, E, False, False, *on), dict(zip(SERVING, on, strict=True))


@pytest.mark.parametrize("i", range(len(SERVING_GRID)))
def test_triton_kvcache_serving_accepted_calls_run(i):
    pytest.importorskip("triton", reason="needs triton installed")
    from fastattn.triton.attention import _interpret

    if not _interpret():
        pytest.skip("runs the kernels under TRITON_INTERPRET=1")
    dtype, E, j = SERVING_GRID[i]
    key, on = _serving_key(dtype, E, j)
    if ops_attention._kvcache_supports("triton", torch.device("cpu"), key):
        assert E > ops_attention._MAX_HEAD_DIM
        return
    q, kc, vc, sl, kn, vn, table = _serving_inputs(dtype, E, on)
    out = ops_attention.attention_with_kvcache(
        q, kc, vc, sl, kn, vn, block_table=table, window=(5, 0) if on["window"] else None,
        return_lse=on["lse"], backend="triton")
    out, lse = out if on["lse"] else (out, torch.zeros(1))
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()


def _serving_inputs(dtype, E, on):
    B, H, Hkv, Lq, bs = 2, 4, 2, 2, 16
    Lnew = 3 if on["lnew"] else Lq
    q = torch.randn(B, H, Lq, E).to(dtype)
    kc, vc = (torch.randn(6 if on["paged"] else B, Hkv, bs if on["paged"] else 48, E).to(dtype)
              for _ in range(2))
    table = torch.tensor([[5, 0, 2], [1, 4, 3]], dtype=torch.int32) if on["paged"] else None
    kn, vn = torch.randn(B, Hkv, Lnew, E).to(dtype), torch.randn(B, Hkv, Lnew, E).to(dtype)
    sl = torch.tensor([3, 30], dtype=torch.int32)
    return q, kc, vc, sl, kn, vn, table


@pytest.mark.parametrize("i", range(len(SERVING_GRID)))
def test_cuda_kvcache_serving_accepted_calls_run_on_the_emulator(i, request):
    dtype, E, j = SERVING_GRID[i]
    key, on = _serving_key(dtype, E, j)
    if ops_attention._kvcache_supports("cuda", torch.device("cuda"), key):
        assert E > ops_attention._MAX_HEAD_DIM
        return
    if cb.NVCC is None:
        pytest.skip("nvcc is not on PATH")
    emulator = request.getfixturevalue("emu")
    q, kc, vc, sl, kn, vn, table = _serving_inputs(dtype, E, on)
    res = cb.attention_kvcache(emulator, q, kc, vc, sl, None, kn, vn, 1.0 / math.sqrt(E), True,
                               window=(5, 0) if on["window"] else (-1, -1),
                               return_lse=on["lse"], block_table=table)
    out, lse = (res[0], res[1]) if on["lse"] else (res[0], torch.zeros(1))
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()


# ---------------------------------------------------------------------------------------------
# attention_varlen: what _varlen_supports accepts for CUDA tensors runs forward and backward on
# the emulator (sequences of 0 and 1 rows, L != S, the options rotated as above)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(len(GRID)))
def test_cuda_varlen_accepted_calls_run_on_the_emulator(i, request):
    dtype, E, dropout = GRID[i]
    for score_mods in (False, True):
        if ops_attention._varlen_supports("cuda", torch.device("cuda"),
                                          (dtype, E, dropout, score_mods)) is None:
            break
    else:
        return
    assert not dropout and not score_mods  # the kernels take neither
    if cb.NVCC is None:
        pytest.skip("nvcc is not on PATH")
    emulator = request.getfixturevalue("emu")
    opt = _options(i)
    H, Hkv = 2, 1 if opt["gqa"] else 2
    lq, lk = [3, 0, 1, 6], [5, 2, 0, 6]
    cu_q = torch.tensor([0, 3, 3, 4, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 7, 7, 13], dtype=torch.int32)
    q = torch.randn(sum(lq), H, E).to(dtype)
    k, v = torch.randn(sum(lk), Hkv, E).to(dtype), torch.randn(sum(lk), Hkv, E).to(dtype)
    wl, wr, _ = cb.window_args(0, 0, opt["causal"], (2, 1) if opt["window"] else None,
                               "top_left")
    br = bool(i % 2)
    scale = 1.0 / math.sqrt(E)
    out, lse = cb.attention_varlen_fwd(emulator, q, k, v, cu_q, cu_k, 6, 6, scale, wl, wr, br)
    glse = torch.randn(lse.shape) if opt["lse"] else None
    grads = cb.attention_varlen_bwd(emulator, torch.randn_like(out), q, k, v, out, lse, glse,
                                    cu_q, cu_k, 6, 6, scale, wl, wr, br)
    for t in (out, *grads):
        assert torch.isfinite(t.float()).all()


# ---------------------------------------------------------------------------------------------
# the other ops: each float dtype accepted by both GPU backends runs under the interpreter
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_and_int8_accepted_dtypes_run(dtype):
    pytest.importorskip("triton", reason="needs triton installed")
    from fastattn.triton import int8_gemm as G
    from fastattn.triton import layer_norm as LN
    from fastattn.triton.attention import _interpret

    if not _interpret():
        pytest.skip("runs the kernels under TRITON_INTERPRET=1")
    cpu = torch.device("cpu")
    x = torch.randn(3, 40).to(dtype)
    w = torch.ones(40, dtype=dtype)
    for backend in ("triton", "cuda"):
        assert ops_layer_norm._supports(backend, cpu, (dtype, dtype, dtype)) is None
        assert ops_int8._supports(backend, cpu, (dtype,)) is None
    y, _, mean, rstd = LN.layer_norm_fwd(x, w, w, None, 1e-5, False)
    LN.layer_norm_bwd(y, None, x, w, w, mean, rstd, False)
    xq, xs = G.quantize_per_token(x)
    assert torch.isfinite(G.int8_gemm(xq, xq, xs, xs, None, dtype).float()).all()
    assert torch.isfinite(G.int8_weight_only_linear(x, xq, xs, None).float()).all()


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
def test_silu_mul_accepted_dtypes_run(dtype):
    """silu_mul: what _supports accepts for Triton runs under the interpreter; the cuda backend
    has no kernel and refuses every call (auto then takes Triton on CUDA tensors); float64 is
    refused by both (the reference runs it)."""
    from fastattn.ops import activation as ops_activation

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert ops_activation._supports("cuda", cuda, (dtype,)) is not None
    why = ops_activation._supports("triton", cpu, (dtype,))
    if dtype == torch.float64:
        assert why is not None and "dtype" in why
        return
    assert why is None
    pytest.importorskip("triton", reason="needs triton installed")
    from fastattn.triton import activation as A
    from fastattn.triton.attention import _interpret

    if not _interpret():
        pytest.skip("runs the kernels under TRITON_INTERPRET=1")
    x = torch.randn(3, 2 * 40).to(dtype)
    out = A.silu_mul_fwd(x)
    dx = A.silu_mul_bwd(torch.randn(3, 40).to(dtype), x)
    assert out.shape == (3, 40) and dx.shape == x.shape
    assert torch.isfinite(out.float()).all() and torch.isfinite(dx.float()).all()


# ---------------------------------------------------------------------------------------------
# layer_norm / rms_norm (with the fused call's offset) and the int8 ops on the CUDA emulator:
# every dtype combination the CUDA predicate accepts runs through the kernels of csrc/cuda, with
# the operands prepared as the bindings prepare them (layer_norm_cuda.cpp: weight and bias in the
# input's dtype, else both promoted to float32, and offset folded into a float32 weight;
# int8_cuda.cpp: scales and bias as float32, the output dtype of a scaled GEMM float32 when none
# is given). The rest of what is refused is a dtype the CUDA kernels have no instance for.
# ---------------------------------------------------------------------------------------------
ALL_DTYPES = DTYPES + (torch.float64,)
NORM_GRID = list(itertools.product(ALL_DTYPES, (None,) + ALL_DTYPES, (None,) + ALL_DTYPES))
# rows that take the vector configs (64, 1024, 8192 elements) and the generic kernel (333:
# not 16-byte aligned), each with the residual, RMS and the offset rotated over the grid
NORM_COLS = (64, 333, 1024, 8192)


def _close_to(out, ref, dtype, what):
    """A loose bound (the accuracy of each kernel is tested in tests/test_cuda_build.py): the
    kernel computed the norm, not something else."""
    assert torch.isfinite(out.float()).all(), f"{what}: non-finite output"
    tol = 16 * torch.finfo(dtype).eps * (1 + ref.abs().max().item())
    err = (out.double() - ref).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("i", range(len(NORM_GRID)))
def test_cuda_norm_accepted_calls_run_on_the_emulator(i, request):
    from fastattn import reference

    x_dt, w_dt, b_dt = NORM_GRID[i]
    cuda = torch.device("cuda")
    rms, residual, offset = i % 2 == 1, i % 3 == 0, 1.0 if i % 4 >= 2 else 0.0
    if rms:
        b_dt = None
    why = ops_layer_norm._supports("cuda", cuda, (x_dt, w_dt, b_dt))
    fused = ops_layer_norm._supports_fused(
        "cuda", cuda, ((x_dt, x_dt if residual else None, w_dt, b_dt, None, None, None), 8, True))
    if why is not None or fused is not None:
        assert torch.float64 in (x_dt, w_dt, b_dt), (why, fused)
        assert why is not None and fused is not None, (why, fused)
        return
    if cb.NVCC is None:
        pytest.skip("nvcc is not on PATH")
    emulator = request.getfixturevalue("emu")
    M, N = 3, NORM_COLS[i % len(NORM_COLS)]
    eps = 1e-5
    x = torch.randn(M, N).to(x_dt)
    r = torch.randn(M, N).to(x_dt) if residual else None
    w = (torch.randn(N) * 0.5 + 1).to(w_dt) if w_dt is not None else None
    b = torch.randn(N).to(b_dt) if b_dt is not None else None
    # the binding's parameters: offset makes the weight float32 (w + offset), and any mix other
    # than "all of the input's dtype" runs the float32-parameter kernels
    kw = w.float() + offset if w is not None and offset else w
    pf32 = any(t is not None and t.dtype != x_dt for t in (kw, b))
    prep = lambda t: None if t is None else (t.float() if pf32 else t).contiguous()  # noqa: E731
    kw, kb = prep(kw), prep(b)

    out, _ = cb.guarded((M, N), x_dt)
    rout, _ = cb.guarded((M, N), x_dt) if residual else (None, None)
    mean, rstd = torch.empty(M), torch.empty(M)
    st = [x.stride(0), r.stride(0) if residual else 0, out.stride(0), N if residual else 0]
    emulator.check(emulator.lib.fa_emu_layer_norm_fwd(
        cb.DT[x_dt], cb._p(x), cb._p(r), cb._p(kw), cb._p(kb), cb._p(out), cb._p(rout),
        cb._fp(mean), cb._fp(rstd), ctypes.c_longlong(M), ctypes.c_longlong(N), cb._i64(st),
        ctypes.c_float(eps), int(rms), int(pf32)))
    xs = (x + r) if residual else x
    w64 = w.double() + offset if w is not None else None
    b64 = b.double() if b is not None else None
    ref = (reference.rms_norm(xs.double(), (N,), w64, eps) if rms
           else reference.layer_norm(xs.double(), (N,), w64, b64, eps))
    _close_to(out, ref, x_dt, f"forward {x_dt} {w_dt} {b_dt} N={N}")

    g = torch.randn(M, N).to(x_dt)
    gr = torch.randn(M, N).to(x_dt) if residual else None
    gi, _ = cb.guarded((M, N), x_dt)
    pdt = torch.float32 if pf32 else x_dt
    gw = torch.full((N,), float("nan"), dtype=pdt) if kw is not None else None
    gb = torch.full((N,), float("nan"), dtype=pdt) if kb is not None else None
    xsaved = rout if residual else x
    st2 = [g.stride(0), gr.stride(0) if residual else 0, xsaved.stride(0), gi.stride(0)]
    emulator.check(emulator.lib.fa_emu_layer_norm_bwd(
        cb.DT[x_dt], cb._p(g), cb._p(gr), cb._p(xsaved), cb._p(kw), cb._fp(mean), cb._fp(rstd),
        cb._p(gi), cb._p(gw), cb._p(gb), ctypes.c_longlong(M), ctypes.c_longlong(N),
        cb._i64(st2), int(rms), int(pf32), cb.SMS))
    for name, t in (("grad_input", gi), ("grad_weight", gw), ("grad_bias", gb)):
        assert t is None or torch.isfinite(t.float()).all(), f"{name}: non-finite"


INT8_DTYPES = (None,) + ALL_DTYPES


@pytest.mark.parametrize("dtype", INT8_DTYPES, ids=str)
def test_cuda_int8_accepted_calls_run_on_the_emulator(dtype, request):
    """quantize_per_token and the weight-only linear take x's dtype as the key, int8_gemm its
    output dtype (None: int32 without scales, float32 with them): each accepted key runs."""
    from fastattn import reference

    cuda = torch.device("cuda")
    why = ops_int8._supports("cuda", cuda, (dtype,))
    if why is not None:
        assert dtype == torch.float64, why
        return
    if cb.NVCC is None:
        pytest.skip("nvcc is not on PATH")
    emulator = request.getfixturevalue("emu")
    M, N, K = 5, 24, 80
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    sa, sb, bias = torch.rand(M) * 0.01 + 1e-3, torch.rand(N) * 0.01 + 1e-3, torch.randn(N)
    if dtype is None:
        assert torch.equal(cb.int8_gemm(emulator, a, b), reference.int8_gemm(a, b))
        out_dtype = torch.float32  # what the binding writes for a scaled GEMM without out_dtype
    else:
        out_dtype = dtype
        x = torch.randn(M, K).to(dtype)
        q, s = cb.quantize(emulator, x)
        q_ref, s_ref = reference.quantize_per_token(x)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
        out, _ = cb.guarded((M, N), dtype)
        emulator.check(emulator.lib.fa_emu_int8_weight_only(
            cb.DT[dtype], cb._p(x), cb._p(b), cb._fp(sb), cb._fp(bias), cb._p(out),
            cb._i64([M, N, K]), cb._i64([x.stride(0), b.stride(0), out.stride(0)])))
        ref = (x.double() @ b.double().t()) * sb.double() + bias.double()
        _close_to(out, ref, dtype, f"weight-only {dtype}")
    got = cb.int8_gemm(emulator, a, b, sa, sb, bias, out_dtype)
    ref = reference.int8_gemm(a, b, sa.double(), sb.double(), bias.double(),
                              out_dtype=torch.float64)
    _close_to(got, ref, out_dtype, f"int8_gemm -> {out_dtype}")


# ---------------------------------------------------------------------------------------------
# attention_varlen: what _varlen_supports accepts on cpu / triton runs (forward and backward,
# every option on that the kernels take); the CUDA kernels' share runs on the emulator above.
# The Triton varlen kernels prune with the sdpa kernels' tables and models (_FWD,
# _DKDV, _DQ), whose fitting tiles test_triton_accepted_calls_have_a_fitting_tile checks.
# ---------------------------------------------------------------------------------------------
# per dtype: head dim 40 with dropout, 256 without, 320 (refused)
VARLEN_POINTS = [i for i, (_, E, dropout) in enumerate(GRID)
                 if (E, dropout) in ((40, True), (256, False), (320, False))]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("i", VARLEN_POINTS)
def test_varlen_accepted_calls_run(backend, i):
    from fastattn.ops._backend import availability

    if availability(backend, "cpu", "attention_varlen_fwd" if backend == "cpu" else None):
        pytest.skip(f"backend {backend!r} cannot run here")
    dtype, E, dropout = GRID[i]
    key = (dtype, E, dropout, True)
    if ops_attention._varlen_supports(backend, torch.device("cpu"), key) is not None:
        assert E > ops_attention._MAX_HEAD_DIM
        return
    H, Hkv = 2, 1
    cu_q = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    q = torch.randn(5, H, E).to(dtype).requires_grad_()
    k, v = torch.randn(6, Hkv, E).to(dtype), torch.randn(6, Hkv, E).to(dtype)
    sinks = torch.randn(H, requires_grad=True)
    out, lse = ops_attention.attention_varlen(
        q, k, v, cu_q, cu_k, 3, 3, dropout_p=0.25 if dropout else 0.0, is_causal=True,
        window=(2, -1), causal_alignment="bottom_right", softcap=3.0,
        alibi_slopes=torch.rand(3, H), sinks=sinks, return_lse=True, backend=backend)
    dq, dsinks = torch.autograd.grad(out.float().sum() + lse.sum(), (q, sinks))
    for t in (out, lse, dq, dsinks):
        assert torch.isfinite(t.float()).all()


def test_cuda_varlen_refuses_what_the_binding_rejects():
    """The CUDA varlen kernels take neither dropout nor the score modifiers (the binding's
    check_no_dropout / check_no_score_mods): refused, so auto takes Triton for those calls."""
    for dtype, E, dropout in GRID:
        for mods in (False, True):
            why = ops_attention._varlen_supports("cuda", torch.device("cuda"),
                                                 (dtype, E, dropout, mods))
            assert (why is None) == (not dropout and not mods and E <= 256), (dtype, E, mods)
