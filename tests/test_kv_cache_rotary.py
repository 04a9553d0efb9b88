"""Rotary embedding fused into ``fastattn.attention_with_kvcache`` (``rotary_cos``, ``rotary_sin``,
``rotary_interleaved``: FlashAttention's ``flash_attn_with_kvcache`` arguments) on every backend
that runs here: "reference", "cpu" (every instruction-set path) and "triton" (interpreter).

The oracle is written from the formula, in float64, without fastattn.reference: q token i and
k_new token i of sequence b rotated at p = cache_seqlens[b] - cache_leftpad[b] + i, pairs
(j, j + rotary_dim/2) or (2j, 2j + 1), (x1 c - x2 s, x2 c + x1 s), then softmax attention over
the keys [cache_leftpad[b], cache_seqlens[b] + Lq), bottom-right causal. The low-precision
baseline of the correctness rule (docs/design.md) is plain PyTorch in the test's dtype: q and
k_new rotated as the op defines it, rounded once to the dtype, then attention in that dtype
(fastattn.reference.scaled_dot_product_attention: matmul, exp, matmul in the dtype, the
low-precision baseline of every attention test here). transformers' ``apply_rotary_pos_emb``
(rotate_half on a (max_pos, E) table) is checked to give the same keys.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rule, skip_unless_backend

import fastattn
from fastattn import reference
from fastattn.ops._backend import availability

BACKENDS = ("reference", "cpu", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (B, H, Hkv, Lq, capacity, E, cache_seqlens, cache_leftpad)
CASES = {
    "decode-gqa": (2, 4, 2, 1, 40, 64, [5, 30], None),
    "lq3-leftpad": (3, 2, 2, 3, 40, 40, [0, 17, 30], [0, 5, 12]),
    # 8 query heads per kv head times 3 tokens: more than 16 rows, the CPU's blocked path
    "gqa8-lq3-leftpad": (2, 8, 1, 3, 48, 80, [9, 40], [2, 0]),
    "odd-head-dim": (1, 2, 1, 2, 20, 111, [7], None),
}


def need(backend: str) -> None:
    skip_unless_backend(backend)
    why = availability(backend, "cpu", "attention_kvcache" if backend == "cpu" else None)
    if why is not None:
        pytest.skip(f"backend {backend!r} cannot run attention_kvcache here: {why}")


def tables(max_pos: int, rotary_dim: int, dtype=torch.float32, base: float = 10000.0):
    """Llama's tables (max_pos, rotary_dim / 2), built once from inv_freq as a model does."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float()
                               / rotary_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def positions(lens, leftpad, b: int, Lq: int) -> torch.Tensor:
    lp = 0 if leftpad is None else leftpad[b]
    return (torch.arange(Lq) + lens[b] - lp).clamp_min(0)


def rotate64(x, cos, sin, pos, interleaved):
    """The formula, pair by pair, in float64: x (..., L, E), pos (L,)."""
    x = x.double()
    y = x.clone()
    half = cos.shape[1]
    for j in range(half):
        a, b = (2 * j, 2 * j + 1) if interleaved else (j, j + half)
        c, s = cos[pos, j].double(), sin[pos, j].double()
        x1, x2 = x[..., a], x[..., b]
        y[..., a] = x1 * c - x2 * s
        y[..., b] = x2 * c + x1 * s
    return y


def rotate_lowp(x, cos, sin, pos, interleaved):
    """transformers' apply_rotary_pos_emb in x's dtype (cos/sin cast to it): Llama's rotate_half,
    or GPT-J's rotate_every_two; the dims past rotary_dim pass through."""
    half = cos.shape[1]
    c, s = cos[pos].to(x.dtype), sin[pos].to(x.dtype)
    rot, rest = x[..., :2 * half], x[..., 2 * half:]
    if interleaved:
        c, s = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        turned = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)
        turned = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * c + turned * s, rest), dim=-1)


def expected(q, kc, vc, lens, kn, vn, leftpad, cos, sin, interleaved, *, causal=True, hi=True):
    """(out, k_cache after the call): float64 from the formula (hi), or (not hi) plain PyTorch in
    q's dtype: q and k_new rotated as the op defines it (exactly, rounded once to the dtype),
    then attention in the dtype."""
    B, H, Lq, E = q.shape
    Hkv = kc.shape[1]
    scale = 1.0 / math.sqrt(E)
    dt = torch.float64 if hi else q.dtype
    kc = kc.to(dt).clone()
    vc = vc.to(dt).clone()
    outs = []
    for b in range(B):
        n = lens[b]
        lp = 0 if leftpad is None else leftpad[b]
        pos = positions(lens, leftpad, b, Lq)
        qb = rotate64(q[b], cos, sin, pos, interleaved).to(dt)
        kc[b, :, n:n + Lq] = rotate64(kn[b], cos, sin, pos, interleaved).to(dt)
        vc[b, :, n:n + Lq] = vn[b].to(dt)
        k = kc[b, :, lp:n + Lq].repeat_interleave(H // Hkv, 0)
        v = vc[b, :, lp:n + Lq].repeat_interleave(H // Hkv, 0)
        key = torch.arange(lp, n + Lq)
        visible = key[None, :] <= (n + torch.arange(Lq))[:, None] if causal else (
            torch.ones(Lq, key.numel(), dtype=torch.bool))
        if hi:
            s = (qb @ k.transpose(-1, -2)) * scale
            o = torch.softmax(s.masked_fill(~visible, float("-inf")), -1) @ v
        else:  # plain PyTorch in the dtype, as every attention test of the project takes it
            o = reference.scaled_dot_product_attention(qb[None], k[None], v[None], visible,
                                                       scale=scale)[0]
        outs.append(torch.nan_to_num(o, nan=0.0).masked_fill(~visible.any(-1)[:, None], 0.0))
    return torch.stack(outs), kc


def make(case, dtype, seed=0):
    B, H, Hkv, Lq, cap, E, lens, leftpad = CASES[case]
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return (rn(B, H, Lq, E), rn(B, Hkv, cap, E), rn(B, Hkv, cap, E), lens, rn(B, Hkv, Lq, E),
            rn(B, Hkv, Lq, E), leftpad)


def run_and_check(backend, q, kc, vc, lens, kn, vn, leftpad, cos, sin, interleaved, causal=True):
    """Runs the backend and checks the output (the rule), the cache (rotated k_new and v_new at
    [cache_seqlens, +Lq), nothing else touched) and that q / k_new / v_new are unchanged."""
    dtype = q.dtype
    sl = torch.tensor(lens, dtype=torch.int32)
    lp = None if leftpad is None else torch.tensor(leftpad, dtype=torch.int32)
    ins = [t.clone() for t in (q, kn, vn, cos, sin)]
    kc0, vc0 = kc.clone(), vc.clone()
    out = fastattn.attention_with_kvcache(q, kc, vc, sl, kn, vn, cache_leftpad=lp,
                                          rotary_cos=cos, rotary_sin=sin,
                                          rotary_interleaved=interleaved, causal=causal,
                                          backend=backend)
    for a, b in zip(ins, (q, kn, vn, cos, sin), strict=True):
        assert torch.equal(a, b), "an input was modified"
    hi, kc_hi = expected(q, kc0, vc0, lens, kn, vn, leftpad, cos, sin, interleaved,
                         causal=causal)
    lo, _ = expected(q, kc0, vc0, lens, kn, vn, leftpad, cos, sin, interleaved, causal=causal,
                     hi=False)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close_rule(out, hi, lo)
    # the cache: the rotated new keys (float32 arithmetic rounded once to the dtype: within one
    # unit in the last place of the exact value), v_new as is, every other slot untouched
    Lq = q.shape[2]
    written = torch.zeros(kc.shape[0], kc.shape[2], dtype=torch.bool)
    vc_want = vc0.clone()
    for b, n in enumerate(lens):
        written[b, n:n + Lq] = True
        vc_want[b, :, n:n + Lq] = vn[b]
    w = written[:, None, :, None].expand_as(kc)
    assert torch.equal(kc[~w], kc0[~w]), "k_cache written outside [cache_seqlens, +Lq)"
    assert torch.equal(vc, vc_want), "v_cache is not the old cache with v_new at cache_seqlens"
    torch.testing.assert_close(kc.double()[w], kc_hi[w], atol=1e-6,
                               rtol=torch.finfo(dtype).eps)
    return out


# ---------------------------------------------------------------------------------------------
# every backend against the formula
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
def test_rotary_matches_formula(backend, case, dtype, interleaved, partial):
    need(backend)
    q, kc, vc, lens, kn, vn, leftpad = make(case, dtype)
    E = q.shape[-1]
    rotary_dim = (E // 2) & ~1 if partial else E & ~1  # odd E: all but the last dim
    cos, sin = tables(64, rotary_dim)
    run_and_check(backend, q, kc, vc, lens, kn, vn, leftpad, cos, sin, interleaved)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_tables_in_q_dtype_and_strided_non_causal(backend, dtype):
    """Tables in q's dtype, cos a column slice of a wider table (strided), sin transposed
    storage; non-causal."""
    need(backend)
    q, kc, vc, lens, kn, vn, leftpad = make("lq3-leftpad", dtype, seed=1)
    cos, sin = tables(50, 32, dtype)
    cos = torch.cat((cos, cos), dim=1)[:, :16]
    sin = sin.t().contiguous().t()
    assert not cos.is_contiguous() and not sin.is_contiguous()
    run_and_check(backend, q, kc, vc, lens, kn, vn, leftpad, cos, sin, False, causal=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_qkv_views_as_a_llama_layer_makes_them(backend):
    """The decoding step of a converted Llama layer: q, k_new, v_new are views of one fused qkv
    projection (B, 1, (H + 2 Hkv) E) (not contiguous), float32 tables (max_pos, E/2), a
    preallocated cache. Same result, bit for bit, as contiguous copies of the same tensors."""
    need(backend)
    B, H, Hkv, E, cap = 2, 4, 2, 64, 32
    qkv = torch.randn(B, 1, (H + 2 * Hkv) * E)
    heads = qkv.view(B, 1, H + 2 * Hkv, E).transpose(1, 2)
    q, kn, vn = heads[:, :H], heads[:, H:H + Hkv], heads[:, H + Hkv:]
    assert not q.is_contiguous() and not kn.is_contiguous()
    cos, sin = tables(4096, E)
    lens = torch.tensor([3, 17], dtype=torch.int32)
    kc, vc = torch.randn(B, Hkv, cap, E), torch.randn(B, Hkv, cap, E)
    kc2, vc2 = kc.clone(), vc.clone()
    out = fastattn.attention_with_kvcache(q, kc, vc, lens, kn, vn, rotary_cos=cos,
                                          rotary_sin=sin, backend=backend)
    out2 = fastattn.attention_with_kvcache(q.contiguous(), kc2, vc2, lens, kn.contiguous(),
                                           vn.contiguous(), rotary_cos=cos, rotary_sin=sin,
                                           backend=backend)
    assert torch.equal(out, out2) and torch.equal(kc, kc2) and torch.equal(vc, vc2)
    run_and_check(backend, q, kc2.clone(), vc2.clone(), [4, 18], kn, vn, None, cos, sin, False)


def test_decode_steps_match_a_full_prefix():
    """Feeding a sequence token by token through the cache with rotary gives, at every step,
    the rotary attention of the whole prefix in float64 (RoPE is relative: what the cache holds
    is what a model without a cache computes)."""
    need("cpu")
    H, Hkv, E, T = 4, 2, 32, 9
    cos, sin = tables(16, E)
    q = torch.randn(1, H, T, E, dtype=torch.float64)
    k = torch.randn(1, Hkv, T, E, dtype=torch.float64)
    v = torch.randn(1, Hkv, T, E, dtype=torch.float64)
    pos = torch.arange(T)
    qr = rotate64(q[0], cos, sin, pos, False)[None]
    kr = rotate64(k[0], cos, sin, pos, False)[None]
    full = F.scaled_dot_product_attention(qr, kr.repeat_interleave(2, 1), v.repeat_interleave(
        2, 1), is_causal=True)
    kc, vc = torch.zeros(1, Hkv, T, E), torch.zeros(1, Hkv, T, E)
    for t in range(T):
        out = fastattn.attention_with_kvcache(
            q[:, :, t:t + 1].float(), kc, vc, torch.tensor([t], dtype=torch.int32),
            k[:, :, t:t + 1].float(), v[:, :, t:t + 1].float(), rotary_cos=cos, rotary_sin=sin,
            backend="cpu")
        torch.testing.assert_close(out.double(), full[:, :, t:t + 1], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("isa", ["amx", "avx512", "avx2", "portable"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_instruction_sets(isa, dtype, monkeypatch):
    """Every CPU path (FASTATTN_CPU_ISA caps the choice per call): the decoding path (one row per
    kv head, the AVX-512 register kernel), GQA rows and the blocked path."""
    need("cpu")
    monkeypatch.setenv("FASTATTN_CPU_ISA", isa)
    for case in ("decode-gqa", "gqa8-lq3-leftpad", "odd-head-dim"):
        q, kc, vc, lens, kn, vn, leftpad = make(case, dtype, seed=2)
        E = q.shape[-1]
        for interleaved in (False, True):
            cos, sin = tables(64, E & ~1)
            run_and_check("cpu", q, kc.clone(), vc.clone(), lens, kn, vn, leftpad, cos, sin,
                          interleaved)
    # one row per kv head (MHA decoding): the register-only AVX-512 kernel
    B, H, E = 2, 3, 128
    q, kc, vc = torch.randn(B, H, 1, E).to(dtype), torch.randn(B, H, 50, E).to(dtype), None
    vc = torch.randn(B, H, 50, E).to(dtype)
    kn, vn = torch.randn(B, H, 1, E).to(dtype), torch.randn(B, H, 1, E).to(dtype)
    cos, sin = tables(64, E)
    run_and_check("cpu", q, kc, vc, [10, 49], kn, vn, None, cos, sin, False)


def test_positions_follow_the_left_padding():
    """Left padding does not count: a left-padded sequence gets the rotation its unpadded copy
    gets (same positions 0, 1, ...), as transformers' position_ids do; and padding tokens among
    the new ones (before cache_leftpad) are rotated at position 0 and not attended to."""
    need("cpu")
    H, E, n = 2, 32, 5
    cos, sin = tables(32, E)
    q, kn, vn = torch.randn(1, H, 1, E), torch.randn(1, H, 1, E), torch.randn(1, H, 1, E)
    kc = torch.randn(1, H, 16, E)
    vc = torch.randn(1, H, 16, E)
    plain_k, plain_v = kc[:, :, 3:].clone(), vc[:, :, 3:].clone()
    out_pad = fastattn.attention_with_kvcache(
        q, kc, vc, torch.tensor([n + 3], dtype=torch.int32), kn, vn,
        cache_leftpad=torch.tensor([3], dtype=torch.int32), rotary_cos=cos, rotary_sin=sin)
    out = fastattn.attention_with_kvcache(
        q, plain_k, plain_v, torch.tensor([n], dtype=torch.int32), kn, vn, rotary_cos=cos,
        rotary_sin=sin)
    torch.testing.assert_close(out_pad, out, atol=1e-6, rtol=1e-5)
    assert torch.equal(kc[:, :, n + 3], plain_k[:, :, n])
    # the prompt of a left-padded sequence as new tokens: 2 padding tokens first
    kc, vc = torch.zeros(1, H, 8, E), torch.zeros(1, H, 8, E)
    q, kn, vn = torch.randn(1, H, 4, E), torch.randn(1, H, 4, E), torch.randn(1, H, 4, E)
    out = fastattn.attention_with_kvcache(
        q, kc, vc, torch.tensor([0], dtype=torch.int32), kn, vn,
        cache_leftpad=torch.tensor([2], dtype=torch.int32), rotary_cos=cos, rotary_sin=sin)
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    pos = torch.tensor([0, 0, 0, 1])
    torch.testing.assert_close(kc[0, :, :4].double(), rotate64(kn[0], cos, sin, pos, False),
                               atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# backend choice, torch.library.opcheck, torch.compile
# ---------------------------------------------------------------------------------------------
def test_supports_refuses_rotary_where_not_implemented(monkeypatch):
    from fastattn.ops import attention as A

    cpu = torch.device("cpu")
    for b in A._KVCACHE_ROTARY:
        assert A._kvcache_supports(b, cpu, (torch.float32, 64, True)) is None
    monkeypatch.setattr(A, "_KVCACHE_ROTARY", ("cpu",))
    why = A._kvcache_supports("triton", cpu, (torch.float32, 64, True))
    assert why is not None and "rotary" in why
    assert A._kvcache_supports("triton", cpu, (torch.float32, 64, False)) is None


def _op_args(rotary_dtype=torch.float32, interleaved=True):
    B, H, Hkv, Lq, cap, E = 2, 4, 2, 3, 24, 16
    q = torch.randn(B, H, Lq, E)
    kc, vc = torch.randn(B, Hkv, cap, E), torch.randn(B, Hkv, cap, E)
    kn, vn = torch.randn(B, Hkv, Lq, E), torch.randn(B, Hkv, Lq, E)
    lens = torch.tensor([5, 20], dtype=torch.int32)
    lp = torch.tensor([2, 0], dtype=torch.int32)
    cos, sin = tables(32, 12, rotary_dtype)
    return (q, kc, vc, lens, kn, vn, 0.17, True, lp, cos, sin, interleaved)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend):
    need(backend)
    op = (torch.ops.fastattn.attention_kvcache if backend == "cpu"
          else torch.ops.fastattn.triton_attention_kvcache)
    torch.library.opcheck(op, _op_args())
    torch.library.opcheck(op, _op_args(interleaved=False))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile_fullgraph(backend):
    need(backend)
    torch._dynamo.reset()
    q, kc, vc, lens, kn, vn, _, _, lp, cos, sin, _ = _op_args()
    kc2, vc2 = kc.clone(), vc.clone()

    def step(q, kc, vc, lens, kn, vn, lp, cos, sin):
        out = fastattn.attention_with_kvcache(q, kc, vc, lens, kn, vn, cache_leftpad=lp,
                                              rotary_cos=cos, rotary_sin=sin,
                                              rotary_interleaved=True, backend=backend)
        return out * 2.0

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(q, kc, vc, lens, kn, vn, lp, cos, sin)
    want = step(q, kc2, vc2, lens, kn, vn, lp, cos, sin)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(kc, kc2, atol=0, rtol=0)
    torch.testing.assert_close(vc, vc2, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_same_keys_as_transformers_apply_rotary_pos_emb(backend, interleaved):
    """The cache holds what transformers' Llama (rotate_half, cos = cat(freqs, freqs)) or GPT-J
    (rotate_every_two) computes for k at the token's position_ids, and the output is that
    attention, in float32."""
    need(backend)
    q, kc, vc, lens, kn, vn, leftpad = make("lq3-leftpad", torch.float32, seed=3)
    cos, sin = tables(64, 40)
    kc0 = kc.clone()
    out = run_and_check(backend, q, kc, vc, lens, kn, vn, leftpad, cos, sin, interleaved)
    Lq = q.shape[2]
    for b, n in enumerate(lens):
        pos = positions(lens, leftpad, b, Lq)
        want = rotate_lowp(kn[b], cos, sin, pos, interleaved)
        torch.testing.assert_close(kc[b, :, n:n + Lq], want, atol=1e-6, rtol=1e-6)
        assert torch.equal(kc[b, :, :n], kc0[b, :, :n])
    assert torch.isfinite(out).all()
