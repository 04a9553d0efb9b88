"""The fixed GPU smoke set of bench/gpu_check.sh (``pytest -m gpu_smoke``): every kernel family
(attention forward/backward and decoding, LayerNorm/RMSNorm, int8 quantize/GEMM/weight-only) on
both GPU backends ("triton", "cuda"), one moderate shape each, compared with fastattn.reference
in float32 on the GPU by DESIGN's rule. Test names start with the family (attention_, norm_,
int8_), which the check's summary groups by.

Run with FASTATTN_TRITON_AUTOTUNE=0 on a fresh machine: one compile per Triton kernel instead of
one per candidate. Imports nothing beyond torch and fastattn (no hypothesis), and skips without
a CUDA device.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rule, skip_unless_backend

import fastattn
from fastattn import reference

pytestmark = [pytest.mark.gpu, pytest.mark.gpu_smoke]
BACKENDS = ["triton", "cuda"]


@pytest.fixture(autouse=True)
def _compiled():
    from fastattn.ops._backend import triton_interpret

    if triton_interpret():
        pytest.skip("the smoke set runs compiled kernels: set TRITON_INTERPRET=0")


def _randn(*shape, dtype=torch.bfloat16, scale=1.0, device="cuda"):
    return (torch.randn(*shape, device=device) * scale).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,E,masked", [(torch.bfloat16, 128, False),
                                            (torch.float16, 64, True),
                                            (torch.float32, 64, False)], ids=str)
def test_attention_forward_backward(backend, dtype, E, masked):
    skip_unless_backend(backend, "cuda")
    torch.manual_seed(0)
    B, H, Hkv, L, S = 2, 4, 2, 300, 517
    q, k, v = (_randn(B, h, n, E, dtype=dtype).requires_grad_()
               for h, n in ((H, L), (Hkv, S), (Hkv, S)))
    mask = _randn(B, 1, L, S, dtype=dtype) if masked else None
    kw = dict(is_causal=not masked, enable_gqa=True, causal_alignment="bottom_right")
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend, **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    f32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = reference.scaled_dot_product_attention(
        *f32, mask.float() if masked else None, **kw)
    ref_grads = torch.autograd.grad(ref, f32, dout.float())
    low = [t.detach().requires_grad_() for t in (q, k, v)]
    ref_low = reference.scaled_dot_product_attention(*low, mask, **kw)
    low_grads = torch.autograd.grad(ref_low, low, dout)
    assert_close_rule(out, ref, ref_low)
    for name, g, r, lo in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads, strict=True):
        assert_close_rule(g, r, lo, factor=3.0, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_kvcache(backend):
    skip_unless_backend(backend, "cuda")
    torch.manual_seed(0)
    B, H, Hkv, cap, E = 3, 8, 2, 4096, 128
    q = _randn(B, H, 1, E)
    k_cache, v_cache = _randn(B, Hkv, cap, E), _randn(B, Hkv, cap, E)
    lens = torch.tensor([1, 1000, 4000], dtype=torch.int32, device="cuda")
    k_new, v_new = _randn(B, Hkv, 1, E), _randn(B, Hkv, 1, E)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = fastattn.attention_with_kvcache(q, kc, vc, lens, k_new, v_new, causal=True,
                                          backend=backend)
    ref = reference.attention_with_kvcache(q.float(), k_cache.float(), v_cache.float(), lens,
                                           k_new.float(), v_new.float(), causal=True)
    low = reference.attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), lens, k_new,
                                           v_new, causal=True)
    assert_close_rule(out, ref, low)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_attention_kvcache_rotary(backend, interleaved):
    """A Llama decoding step: q / k_new / v_new views of one fused qkv projection, float32
    tables (max_pos, E/2), left-padded batch, the rotary embedding fused into the call."""
    skip_unless_backend(backend, "cuda")
    torch.manual_seed(0)
    B, H, Hkv, cap, E = 3, 8, 2, 4096, 128
    qkv = _randn(B, 1, (H + 2 * Hkv) * E)
    heads = qkv.view(B, 1, H + 2 * Hkv, E).transpose(1, 2)
    q, k_new, v_new = heads[:, :H], heads[:, H:H + Hkv], heads[:, H + Hkv:]
    k_cache, v_cache = _randn(B, Hkv, cap, E), _randn(B, Hkv, cap, E)
    lens = torch.tensor([1, 1000, 4000], dtype=torch.int32, device="cuda")
    leftpad = torch.tensor([0, 10, 3000], dtype=torch.int32, device="cuda")
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, E, 2, device="cuda").float() / E))
    freqs = torch.outer(torch.arange(8192, device="cuda").float(), inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    kc, vc = k_cache.clone(), v_cache.clone()
    rot = dict(cache_leftpad=leftpad, rotary_cos=cos, rotary_sin=sin,
               rotary_interleaved=interleaved)
    out = fastattn.attention_with_kvcache(q, kc, vc, lens, k_new, v_new, backend=backend, **rot)
    kr, vr = k_cache.float(), v_cache.float()
    ref = reference.attention_with_kvcache(q.float(), kr, vr, lens, k_new.float(), v_new.float(),
                                           **rot)
    kl, vl = k_cache.clone(), v_cache.clone()
    low = reference.attention_with_kvcache(q, kl, vl, lens, k_new, v_new, **rot)
    assert_close_rule(out, ref, low)
    torch.testing.assert_close(kc, kl, atol=1e-6, rtol=2 ** -7)  # one rounding of the same value
    assert torch.equal(vc, vl)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_kvcache_paged(backend, device="cuda"):
    """Serving: a paged cache of shuffled 16-token blocks, a sliding window, two new tokens for
    one query (speculative-decoding shape), lse; against the reference on the same pool."""
    skip_unless_backend(backend, device)
    torch.manual_seed(0)
    B, H, Hkv, E, bs, max_blocks = 3, 8, 2, 128, 16, 64
    num_blocks = B * max_blocks + 5
    q = _randn(B, H, 1, E, device=device)
    pool_k, pool_v = _randn(num_blocks, Hkv, bs, E, device=device), _randn(
        num_blocks, Hkv, bs, E, device=device)
    table = torch.randperm(num_blocks, device=device)[:B * max_blocks].view(B, max_blocks)
    table = table.to(torch.int32)
    lens = torch.tensor([1, 700, 1000], dtype=torch.int32, device=device)
    k_new, v_new = _randn(B, Hkv, 2, E, device=device), _randn(B, Hkv, 2, E, device=device)
    kw = dict(causal=True, window=(256, 0), return_lse=True, block_table=table)
    kc, vc = pool_k.clone(), pool_v.clone()
    out, lse = fastattn.attention_with_kvcache(q, kc, vc, lens, k_new, v_new, backend=backend,
                                               **kw)
    ref, ref_lse = reference.attention_with_kvcache(q.float(), pool_k.float(), pool_v.float(),
                                                    lens, k_new.float(), v_new.float(), **kw)
    kl, vl = pool_k.clone(), pool_v.clone()
    low, low_lse = reference.attention_with_kvcache(q, kl, vl, lens, k_new, v_new, **kw)
    assert_close_rule(out, ref, low)
    assert_close_rule(lse, ref_lse, low_lse.float(), name="lse")
    assert torch.equal(kc, kl) and torch.equal(vc, vl)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_varlen_forward_backward(backend, device="cuda"):
    """Packed sequences (one empty, one of a single row, L != S), GQA, bottom-right causal."""
    skip_unless_backend(backend, device)
    torch.manual_seed(0)
    H, Hkv, E = 4, 2, 128
    lq, lk = [300, 0, 1, 77], [517, 3, 1, 77]
    cu_q = torch.tensor([0, 300, 300, 301, 378], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 517, 520, 521, 598], dtype=torch.int32, device=device)
    q = _randn(sum(lq), H, E, device=device).requires_grad_()
    k = _randn(sum(lk), Hkv, E, device=device).requires_grad_()
    v = _randn(sum(lk), Hkv, E, device=device).requires_grad_()
    kw = dict(is_causal=True, causal_alignment="bottom_right")
    out = fastattn.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), backend=backend,
                                    **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    f32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = reference.attention_varlen(*f32, cu_q, cu_k, **kw)
    ref_grads = torch.autograd.grad(ref, f32, dout.float())
    low = [t.detach().requires_grad_() for t in (q, k, v)]
    ref_low = reference.attention_varlen(*low, cu_q, cu_k, **kw)
    low_grads = torch.autograd.grad(ref_low, low, dout)
    assert_close_rule(out, ref, ref_low)
    for name, g, r, lo in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads, strict=True):
        assert_close_rule(g, r, lo, factor=3.0, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("N", [4096, 20000])
def test_norm_forward_backward(backend, rms, N):
    skip_unless_backend(backend, "cuda")
    torch.manual_seed(0)
    M = 512
    x = _randn(M, N, scale=2.0).requires_grad_()
    r = _randn(M, N)
    w = (_randn(N, dtype=torch.float32) * 0.5 + 1).bfloat16().requires_grad_()
    fn = fastattn.rms_norm if rms else fastattn.layer_norm
    ref_fn = reference.rms_norm if rms else reference.layer_norm
    out, summed = fn(x, (N,), w, residual=r, backend=backend)
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w), dy)
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref, _ = ref_fn(xf, (N,), wf, residual=r.float())
    ref_grads = torch.autograd.grad(ref, (xf, wf), dy.float())
    xl, wl = x.detach().requires_grad_(), w.detach().requires_grad_()
    low, _ = ref_fn(xl, (N,), wl, residual=r)
    low_grads = torch.autograd.grad(low, (xl, wl), dy)
    assert_close_rule(out, ref, low)
    assert torch.equal(summed, x.detach() + r)
    for name, g, rg, lg in zip(("dx", "dw"), grads, ref_grads, low_grads, strict=True):
        assert_close_rule(g, rg, lg, factor=3.0, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M", [16, 1000])
def test_int8_quantize_gemm_weight_only(backend, M):
    skip_unless_backend(backend, "cuda")
    torch.manual_seed(0)
    K, N = 4096, 2048
    x = _randn(M, K, scale=3.0)
    xq, xs = fastattn.quantize_per_token(x, backend=backend)
    rq, rs = reference.quantize_per_token(x)
    assert torch.equal(xs, rs) and (xq.int() - rq.int()).abs().max() <= 1
    w_int8, w_scale = reference.quantize_per_channel(torch.randn(N, K, device="cuda") / 64)
    assert torch.equal(fastattn.int8_gemm(xq, w_int8, backend=backend),
                       reference.int8_gemm(xq, w_int8))
    bias = _randn(N)
    out = fastattn.int8_linear(x, w_int8, w_scale, bias, backend=backend)
    ref = reference.int8_linear(x.float(), w_int8, w_scale, bias.float())
    assert_close_rule(out, ref, reference.int8_linear(x, w_int8, w_scale, bias))
    wo = fastattn.int8_weight_only_linear(x[:16], w_int8, w_scale, bias, backend=backend)
    ref_wo = reference.int8_weight_only_linear(x[:16].float(), w_int8, w_scale, bias.float())
    assert_close_rule(wo, ref_wo, F.linear(x[:16], (w_int8.float() * w_scale[:, None]).bfloat16(),
                                           bias))
