"""What ``_supports`` accepts, the kernels run: the option grid of attention (dtypes, head dims,
mask, causal, window, dropout, GQA, lse) walked through each backend's support predicate, and
every accepted call run on tiny shapes through the Triton interpreter and the CUDA host emulator
(csrc/cuda/emulation, built by tests/test_cuda_build.py). A call that a predicate accepts and a
kernel then rejects would raise under an explicit backend, and under ``backend="auto"`` would
fail where the next backend would have run."""

from __future__ import annotations

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
# _kvcache_supports accepts runs on Triton (interpreter); the CUDA kernels refuse each feature,
# with its name, before a kernel could reject the call
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
    B, H, Hkv, Lq, bs = 2, 4, 2, 2, 16
    Lnew = 3 if on["lnew"] else Lq
    q = torch.randn(B, H, Lq, E).to(dtype)
    kc, vc = (torch.randn(6 if on["paged"] else B, Hkv, bs if on["paged"] else 48, E).to(dtype)
              for _ in range(2))
    table = torch.tensor([[5, 0, 2], [1, 4, 3]], dtype=torch.int32) if on["paged"] else None
    kn, vn = torch.randn(B, Hkv, Lnew, E).to(dtype), torch.randn(B, Hkv, Lnew, E).to(dtype)
    sl = torch.tensor([3, 30], dtype=torch.int32)
    out = ops_attention.attention_with_kvcache(
        q, kc, vc, sl, kn, vn, block_table=table, window=(5, 0) if on["window"] else None,
        return_lse=on["lse"], backend="triton")
    out, lse = out if on["lse"] else (out, torch.zeros(1))
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("feature", SERVING)
def test_cuda_kvcache_refuses_serving_features(feature):
    key, _ = _serving_key(torch.float16, 64, SERVING.index(feature))
    why = ops_attention._kvcache_supports("cuda", torch.device("cuda"), key)
    assert why is not None and "cuda" in why
    assert ops_attention._kvcache_supports("cuda", torch.device("cuda"),
                                           (torch.float16, 64, False, False)) is None

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
