"""Attention semantics suite, shared by every backend ("reference", "cpu", "triton").

Each case runs ``fastattn.scaled_dot_product_attention`` / ``attention_with_kvcache`` with an
explicit backend and holds out, lse and the gradients (q, k, v, float mask) to the correctness rule (docs/design.md)
against ``fastattn.reference`` in float64 (factor 2 for outputs, 3 for gradients), with plain
PyTorch in the kernel's dtype as the low-precision baseline. Backends that cannot run here skip
with the reason (the C++ extension not built, triton not in interpreter mode on CPU...).

Shapes are tiny: Triton kernels run through the interpreter on CPU (every op of every program
instance in numpy). ``TestGPU`` repeats the checks at real sizes on CUDA when a GPU is present.
"""

from __future__ import annotations

import contextlib
import functools
import math

import pytest
import torch
from helpers import assert_close_rule, is_interpret, nan_padded, skip_unless_backend

import fastattn
from fastattn import reference
from fastattn.ops._backend import availability

BACKENDS = ("reference", "cpu", "triton")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SHAPES = ((1, 1), (17, 33), (33, 17), (64, 64))


def need(backend: str, device: str = "cpu", op: str = "attention_fwd") -> None:
    """Skip unless ``backend`` runs ``op`` on ``device`` here (the C++ ops need their kernel)."""
    skip_unless_backend(backend, device)
    why = availability(backend, device, op if backend in ("cpu", "cuda") else None)
    if why is not None:
        pytest.skip(f"backend {backend!r} cannot run {op} on {device}: {why}")


@contextlib.contextmanager
def deterministic_algorithms():
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def make_qkv(B, H, Hkv, L, S, E, Ev=None, dtype=torch.float32, device="cpu"):
    Ev = E if Ev is None else Ev
    q = torch.randn(B, H, L, E, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, S, E, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, S, Ev, dtype=dtype, device=device)
    return q, k, v


def finite(x: torch.Tensor) -> torch.Tensor:
    """lse with -inf (empty rows) replaced by 0, so a loss can use it (its gradient there is 0)."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def check_attention(backend, q, k, v, attn_mask=None, *, grad=True, mask_grad=False,
                    lse_grad=True, **kwargs):
    """Run the backend on (q, k, v, attn_mask) as given (strides included) and hold out, lse and
    the gradients of q, k, v (and of the float mask when mask_grad) to the rule. With lse_grad
    the loss uses lse too, so the gradient flowing into lse is checked as well."""
    leaves = [q, k, v] + ([attn_mask] if mask_grad else [])
    for t in leaves:
        t.requires_grad_(grad)
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, attn_mask, return_lse=True,
                                                     backend=backend, **kwargs)
    assert out.shape == (*q.shape[:3], v.shape[-1]) and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32

    def ref(dtype):
        dev = q.device
        ins = [t.detach().to(dev, dtype).requires_grad_(grad) for t in (q, k, v)]
        m = attn_mask
        if m is not None:
            m = m.detach().to(dev)
            if m.dtype != torch.bool:
                m = m.to(dtype).requires_grad_(mask_grad)
        o, lse_ref = reference.scaled_dot_product_attention(*ins, m, return_lse=True, **kwargs)
        return o, lse_ref.float(), ins + ([m] if mask_grad else [])

    o_hi, l_hi, ins_hi = ref(torch.float64)
    o_lo, l_lo, ins_lo = ref(q.dtype)
    assert_close_rule(out, o_hi, o_lo, name="out")
    assert_close_rule(lse, l_hi, l_lo, name="lse")
    if not grad:
        return out, lse
    g_out = torch.randn_like(o_hi)
    g_lse = torch.randn_like(l_hi, dtype=torch.float64)

    def loss(o, lse):
        value = (o * g_out.to(o.dtype)).sum()
        return value + (finite(lse) * g_lse.to(lse.dtype)).sum() if lse_grad else value

    loss(out.double(), lse.double()).backward()
    loss(o_hi, l_hi.double()).backward()
    loss(o_lo, l_lo).backward()
    for name, t, hi, lo in zip(("dq", "dk", "dv", "dmask"), leaves, ins_hi, ins_lo, strict=False):
        assert t.grad is not None, f"{name}: no gradient"
        assert t.grad.shape == t.shape
        assert_close_rule(t.grad, hi.grad, lo.grad, factor=3.0, name=name)
    return out, lse


# ---------------------------------------------------------------------------------------------
# forward and backward vs the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E,Ev", [(40, 40), (64, 64), (80, 48), (111, 111), (128, 128),
                                  (256, 256)])
def test_forward_head_dims(backend, dtype, E, Ev):
    need(backend)
    q, k, v = make_qkv(1, 2, 2, 17, 33, E, Ev, dtype)
    check_attention(backend, q, k, v, grad=False, is_causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L,S", SHAPES)
@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
def test_forward_backward(backend, dtype, L, S, causal):
    need(backend)
    E = {1: 40, 17: 64, 33: 80, 64: 64}[L]
    q, k, v = make_qkv(1, 2, 2, L, S, E, dtype=dtype)
    check_attention(backend, q, k, v, is_causal=causal != "none",
                    causal_alignment="top_left" if causal == "none" else causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("E,Ev,dtype", [(40, 40, torch.bfloat16), (111, 111, torch.float16),
                                        (128, 64, torch.float32), (256, 256, torch.bfloat16)],
                         ids=str)
def test_backward_head_dims(backend, E, Ev, dtype):
    need(backend)
    q, k, v = make_qkv(2, 1, 1, 33, 17, E, Ev, dtype)
    check_attention(backend, q, k, v, is_causal=True, causal_alignment="bottom_right")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mask_shape", ["LS", "B1LS"])
def test_masks_broadcast(backend, kind, mask_shape):
    need(backend)
    B, H, L, S = 2, 2, 17, 33
    q, k, v = make_qkv(B, H, H, L, S, 40, dtype=torch.float16)
    shape = (L, S) if mask_shape == "LS" else (B, 1, L, S)
    if kind == "bool":
        mask = torch.rand(shape) > 0.3
    else:
        mask = torch.randn(shape, dtype=q.dtype)
        mask.masked_fill_(torch.rand(shape) < 0.2, float("-inf"))
    check_attention(backend, q, k, v, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_float_mask_gradient(backend, dtype):
    need(backend)
    B, H, L, S = 1, 2, 33, 17
    q, k, v = make_qkv(B, H, H, L, S, 64, dtype=dtype)
    # (B, 1, L, S): the gradient is reduced over the broadcast head dim
    mask = torch.randn(B, 1, L, S, dtype=dtype)
    check_attention(backend, q, k, v, mask, mask_grad=True, is_causal=True,
                    causal_alignment="bottom_right")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,Hkv,dtype", [(4, 2, torch.float16), (4, 1, torch.bfloat16),
                                         (3, 1, torch.float32)], ids=str)
def test_gqa(backend, H, Hkv, dtype):
    need(backend)
    q, k, v = make_qkv(1, H, Hkv, 33, 64, 64, dtype=dtype)
    check_attention(backend, q, k, v, is_causal=True, causal_alignment="bottom_right",
                    enable_gqa=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window,causal,align,L,S", [
    ((5, 3), False, "top_left", 64, 64),
    ((7, -1), True, "top_left", 33, 33),
    ((-1, 4), False, "bottom_right", 17, 33),
    ((3, 0), True, "bottom_right", 33, 17),  # the first query rows see nothing
    ((0, 0), False, "top_left", 17, 33),  # the diagonal only
])
def test_windows(backend, window, causal, align, L, S):
    need(backend)
    q, k, v = make_qkv(1, 2, 2, L, S, 64, dtype=torch.bfloat16)
    check_attention(backend, q, k, v, window=window, is_causal=causal, causal_alignment=align)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["bool_mask", "float_mask", "window"])
def test_fully_masked_rows(backend, how):
    need(backend)
    B, H, L, S = 1, 2, 17, 33
    q, k, v = make_qkv(B, H, H, L, S, 40, dtype=torch.float16)
    kwargs = {}
    empty = torch.zeros(L, dtype=torch.bool)
    mask = None
    if how == "bool_mask":
        mask = torch.rand(L, S) > 0.5
        mask[[0, 5, 16]] = False
        empty[[0, 5, 16]] = True
    elif how == "float_mask":
        mask = torch.randn(B, H, L, S, dtype=q.dtype)
        mask[:, :, 3] = float("-inf")
        empty[3] = True
    else:  # bottom-right causal with L > S: rows i < L - S see no key
        L2, S2 = 33, 17
        q, k, v = make_qkv(B, H, H, L2, S2, 40, dtype=q.dtype)
        kwargs = dict(is_causal=True, causal_alignment="bottom_right")
        empty = torch.arange(L2) < L2 - S2
    # the reference's own lse gradient is NaN on a row whose float mask is all -inf (d log(0)):
    # the loss leaves lse out there
    out, lse = check_attention(backend, q, k, v, mask, mask_grad=how == "float_mask",
                               lse_grad=how != "float_mask", **kwargs)
    assert torch.isfinite(out).all()
    assert torch.all(out[:, :, empty] == 0)
    assert torch.all(lse[:, :, empty] == -math.inf) and torch.isfinite(lse[:, :, ~empty]).all()
    assert torch.all(q.grad[:, :, empty] == 0) and torch.isfinite(q.grad).all()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    if how == "float_mask":
        assert torch.all(mask.grad[:, :, empty] == 0) and torch.isfinite(mask.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "nan_padded"])
def test_non_contiguous(backend, layout):
    need(backend)
    B, H, Hkv, L, S, E = 2, 2, 1, 17, 33, 80
    if layout == "transposed":  # (B, L, H, E) storage, the layout of a fused QKV projection
        q = torch.randn(B, L, H, E, dtype=torch.float16).transpose(1, 2)
        k = torch.randn(B, S, Hkv, E, dtype=torch.float16).transpose(1, 2)
        v = torch.randn(B, S, Hkv, E, dtype=torch.float16).transpose(1, 2)
        mask = torch.randn(S, L, dtype=torch.float16).t()  # (L, S) with transposed strides
    else:  # every read past a tensor's extent sees NaN
        q, k, v = (nan_padded(t) for t in make_qkv(B, H, Hkv, L, S, E, dtype=torch.float16))
        mask = nan_padded(torch.randn(B, 1, L, S, dtype=torch.float16))
    assert not q.is_contiguous() and not mask.is_contiguous()
    check_attention(backend, q, k, v, mask, mask_grad=True, is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_lse_false_and_scale(backend):
    need(backend)
    q, k, v = make_qkv(1, 2, 2, 17, 17, 64)
    out = fastattn.scaled_dot_product_attention(q, k, v, scale=0.3, backend=backend)
    assert isinstance(out, torch.Tensor)
    exp = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.3)
    assert_close_rule(out, exp, reference.scaled_dot_product_attention(q, k, v, scale=0.3))
    check_attention(backend, q, k, v, scale=0.3)


# ---------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------
def dropout_keep_mask(backend, q, k, p, seed):
    """The keep mask the backend returns (return_dropout_mask) for (q, k) with this torch seed,
    and the output with V = identity (Ev = S): out[b, h, i, j] = P[i, j] * keep[i, j] / (1 - p),
    where P > 0 everywhere (no mask), so out != 0 is the mask the kernel applied."""
    B, Hkv, S, _ = k.shape
    eye = torch.eye(S, dtype=q.dtype).expand(B, Hkv, S, S)
    torch.manual_seed(seed)
    out, keep = fastattn.scaled_dot_product_attention(
        q, k, eye, dropout_p=p, backend=backend, enable_gqa=q.shape[1] != Hkv,
        return_dropout_mask=True)
    assert keep.dtype == torch.bool and keep.shape == (*q.shape[:3], S)
    return keep, out


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_statistics(backend):
    need(backend)
    p = 0.3
    q, k, _ = make_qkv(2, 2, 2, 64, 64, 16)
    keep, out = dropout_keep_mask(backend, q, k, p, seed=11)
    # the returned mask is the one the kernel applied
    assert torch.equal(keep, out != 0)
    frac = 1.0 - keep.double().mean().item()  # 16384 draws: std ~0.004
    assert abs(frac - p) < 0.025, f"dropped fraction {frac:.3f}, expected {p}"
    # kept weights are P / (1 - p): each row of P sums to 1, so rows of out average 1
    probs = reference.scaled_dot_product_attention(q.double(), k.double(),
                                                   torch.eye(64, dtype=torch.float64))
    torch.testing.assert_close(out[keep].double(), probs[keep] / (1 - p), rtol=1e-4, atol=1e-6)
    # the draws are not a pattern: rows and columns drop at the same rate
    assert (1 - keep.double().mean(dim=-1)).std() < 0.1
    assert (1 - keep.double().mean(dim=-2)).std() < 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_reproducible_by_seed(backend):
    need(backend)
    q, k, v = make_qkv(1, 2, 2, 33, 17, 32)
    torch.manual_seed(5)
    a = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.2, backend=backend)
    torch.manual_seed(5)
    b = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.2, backend=backend)
    torch.manual_seed(6)
    c = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.2, backend=backend)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["plain", "gqa_mask_causal", "window_lse_mods"])
def test_dropout_forward_backward_consistent(backend, case):
    """Forward and backward with dropout equal the reference (and its autograd) run with the keep
    mask the backend returns (return_dropout_mask), exactly by the rule; asking for the mask
    changes nothing else (the same output, lse and seed use)."""
    need(backend)
    p, seed = 0.25, 3
    H, Hkv = (2, 2) if case == "plain" else (4, 2)
    q, k, v = make_qkv(1, H, Hkv, 33, 40, 24)
    mask = torch.randn(33, 40) if case == "gqa_mask_causal" else None
    kwargs = {"plain": {},
              "gqa_mask_causal": dict(is_causal=True, causal_alignment="bottom_right",
                                      enable_gqa=True),
              "window_lse_mods": dict(window=(7, 3), enable_gqa=True, softcap=4.0,
                                      sinks=torch.randn(H))}[case]
    lse_too = case == "window_lse_mods"

    for t in (q, k, v):
        t.requires_grad_()
    torch.manual_seed(seed)
    res = fastattn.scaled_dot_product_attention(q, k, v, mask, dropout_p=p, backend=backend,
                                                return_lse=lse_too, return_dropout_mask=True,
                                                **kwargs)
    out, keep = res[0], res[-1]
    assert len(res) == 2 + lse_too
    assert keep.dtype == torch.bool and keep.shape == (1, H, 33, 40)
    assert 0.15 < 1.0 - keep.float().mean().item() < 0.35  # 5280 draws at p = 0.25
    torch.manual_seed(seed)
    again = fastattn.scaled_dot_product_attention(q, k, v, mask, dropout_p=p, backend=backend,
                                                  return_lse=lse_too, **kwargs)
    again = again if lse_too else (again,)
    for a, b in zip(res[:-1], again, strict=True):
        assert torch.equal(a, b)
    g = torch.randn_like(out)
    out.backward(g)

    def ref(dtype):
        ins = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        m = None if mask is None else mask.to(dtype)
        o, lse = reference.scaled_dot_product_attention(*ins, m, p, dropout_mask=keep,
                                                        return_lse=True, **kwargs)
        o.backward(g.to(dtype))
        return o, lse, ins

    o_hi, lse_hi, ins_hi = ref(torch.float64)
    o_lo, lse_lo, ins_lo = ref(torch.float32)
    assert_close_rule(out, o_hi, o_lo, name="out")
    if lse_too:
        assert_close_rule(res[1], lse_hi, lse_lo, name="lse")
    for name, t, hi, lo in zip(("dq", "dk", "dv"), (q, k, v), ins_hi, ins_lo, strict=True):
        assert_close_rule(t.grad, hi.grad, lo.grad, factor=3.0, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_any_rank_and_without_dropout(backend):
    """Rank-5 inputs return the mask as (..., L, S), the folded rank-4 call's mask for the same
    seed; without dropout the mask is None (after lse when both are asked for)."""
    need(backend)
    q, k, v = torch.randn(2, 3, 2, 9, 16), torch.randn(2, 3, 2, 11, 16), torch.randn(2, 3, 2, 11, 8)
    torch.manual_seed(4)
    out, keep = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5, backend=backend,
                                                      return_dropout_mask=True)
    assert out.shape == (2, 3, 2, 9, 8) and keep.shape == (2, 3, 2, 9, 11)
    torch.manual_seed(4)
    _, keep4 = fastattn.scaled_dot_product_attention(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), dropout_p=0.5, backend=backend,
        return_dropout_mask=True)
    assert torch.equal(keep.flatten(0, 1), keep4)
    out, lse, none = fastattn.scaled_dot_product_attention(q[0], k[0], v[0], backend=backend,
                                                           return_lse=True,
                                                           return_dropout_mask=True)
    assert none is None and lse.shape == (3, 2, 9)


# ---------------------------------------------------------------------------------------------
# deterministic backward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["gqa_causal", "window_mask_grad", "dropout"])
def test_deterministic_backward(backend, case):
    need(backend)
    H, Hkv = (4, 2) if case == "gqa_causal" else (2, 2)
    dtype = torch.float16 if case == "gqa_causal" else torch.bfloat16
    q, k, v = make_qkv(1, H, Hkv, 40, 33, 64, dtype=dtype)
    mask = torch.randn(40, 33, dtype=dtype) if case == "window_mask_grad" else None
    kwargs = {"gqa_causal": dict(is_causal=True, enable_gqa=True),
              "window_mask_grad": dict(window=(9, 4), causal_alignment="bottom_right"),
              "dropout": dict(dropout_p=0.2)}[case]
    leaves = [q, k, v] + ([mask] if mask is not None else [])
    g = torch.randn(1, H, 40, 64, dtype=dtype)

    def grads():
        for t in leaves:
            t.grad = None
            t.requires_grad_()
        torch.manual_seed(1)
        out = fastattn.scaled_dot_product_attention(q, k, v, mask, backend=backend, **kwargs)
        out.backward(g)
        return [t.grad.clone() for t in leaves]

    with deterministic_algorithms():
        first = grads()
        second = grads()
        for a, b in zip(first, second, strict=True):
            assert torch.equal(a, b)
        if case != "dropout":
            for t in leaves:
                t.grad = None
            check_attention(backend, q, k, v, mask, mask_grad=mask is not None, **kwargs)
    nondet = grads()  # the default (atomic) path computes the same gradients up to rounding
    for a, b in zip(first, nondet, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------
# torch.library / torch.compile
# ---------------------------------------------------------------------------------------------
def test_opcheck_triton_forward_backward():
    need("triton")
    q, k, v = make_qkv(1, 2, 1, 9, 20, 16, dtype=torch.float32)
    mask = torch.randn(1, 2, 9, 20)
    for t in (q, k, v, mask):
        t.requires_grad_()
    # GQA, a float mask with its gradient, bottom-right causal (diag_offset = S - L)
    torch.library.opcheck(torch.ops.fastattn.triton_attention_fwd,
                          (q, k, v, mask, 0.2, -1, 0, 11, 0.0, 0))
    # sliding window and dropout
    torch.library.opcheck(torch.ops.fastattn.triton_attention_fwd,
                          (q, k, v, None, 0.2, 3, 2, 0, 0.1, 1234))
    out, lse = torch.ops.fastattn.triton_attention_fwd(q, k, v, mask, 0.2, -1, 0, 11, 0.0, 0)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(),
            lse.detach(), torch.randn_like(lse), mask.detach(), 0.2, -1, 0, 11, 0.0, 0, True,
            False)
    torch.library.opcheck(torch.ops.fastattn.triton_attention_bwd, args)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck_dropout_mask(backend):
    """The keep-mask ops (return_dropout_mask) in both layouts: sdpa (B, H, L, S) and packed
    varlen (total_q, H, max_seqlen_k)."""
    need(backend, op="attention_dropout_mask")
    ops = torch.ops.fastattn
    op = ops.attention_dropout_mask if backend == "cpu" else ops.triton_attention_dropout_mask
    # the interpreter is slow: Triton skips opcheck's aot_dispatch tests
    utils = ({} if backend == "cpu" else
             dict(test_utils=("test_schema", "test_autograd_registration", "test_faketensor")))
    q, k, _ = make_qkv(2, 4, 2, 9, 20, 16)
    torch.library.opcheck(op, (q, k, None, None, 9, 20, 0.3, 1234), **utils)
    cu_q = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 6, 11], dtype=torch.int32)
    args = (torch.randn(7, 4, 16), torch.randn(11, 2, 16), cu_q, cu_k, 4, 6, 0.3, 1234)
    torch.library.opcheck(op, args, **utils)
    keep = op(*args)
    assert keep.shape == (7, 4, 6) and keep.dtype == torch.bool
    assert not keep[:3, :, 5:].any() and not keep[3:, :, 5:].any()  # past S_b = 5, 1, 5


def test_opcheck_triton_kvcache():
    need("triton")
    B, H, Hkv, Lq, cap, E = 2, 4, 2, 3, 24, 16
    q = torch.randn(B, H, Lq, E)
    kc, vc = torch.randn(B, Hkv, cap, E), torch.randn(B, Hkv, cap, E)
    kn, vn = torch.randn(B, Hkv, Lq, E), torch.randn(B, Hkv, Lq, E)
    lens = torch.tensor([5, 20], dtype=torch.int32)
    torch.library.opcheck(torch.ops.fastattn.triton_attention_kvcache,
                          (q, kc, vc, lens, kn, vn, 0.17, True))
    torch.library.opcheck(torch.ops.fastattn.triton_attention_kvcache,
                          (q, kc, vc, lens, None, None, 0.17, False))
    torch.library.opcheck(torch.ops.fastattn.triton_attention_kvcache,
                          (q, kc, vc, lens, kn, vn, 0.17, True, torch.tensor([2, 0], dtype=torch.int32)))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile_fullgraph(backend):
    need(backend)
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 4, 2, 33, 17, 64)
    mask = torch.randn(33, 17)

    def f(q, k, v, mask):
        out, lse = fastattn.scaled_dot_product_attention(
            q, k, v, mask, is_causal=True, causal_alignment="bottom_right", enable_gqa=True,
            return_lse=True, backend=backend)
        return (out * out).sum() + finite(lse).sum()

    # aot_eager: dynamo (fullgraph), fake tensors and AOT autograd around the op; inductor's C++
    # code generation for the surrounding elementwise glue would add ~20 s here and test
    # nothing about the op (TestGPU compiles with inductor)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ins = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    exp_ins = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    loss = compiled(*ins)
    loss.backward()
    exp = f(*exp_ins)
    exp.backward()
    torch.testing.assert_close(loss, exp)
    for a, b in zip(ins, exp_ins, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def _bad_cases():
    q, k, v = make_qkv(1, 4, 2, 5, 6, 8)
    return [
        ("rank", dict(query=q[0]), RuntimeError, "same number of dimensions"),
        ("rank_2d", dict(query=q[0, 0], key=k[0, 0], value=v[0, 0]), RuntimeError,
         "at least 3 dimensions"),
        ("head_dims", dict(key=torch.randn(1, 2, 6, 9)), ValueError, "head dims"),
        ("gqa_flag", dict(enable_gqa=False), ValueError, "enable_gqa"),
        ("gqa_multiple", dict(key=torch.randn(1, 3, 6, 8), value=torch.randn(1, 3, 6, 8)),
         ValueError, "multiple"),
        ("mask_shape", dict(attn_mask=torch.ones(5, 7, dtype=torch.bool)), ValueError,
         "attn_mask"),
        ("mask_dtype", dict(attn_mask=torch.zeros(5, 6, dtype=torch.float64)), TypeError,
         "attn_mask"),
        ("dtype_mix", dict(value=v.half()), RuntimeError, "dtype"),
        ("device_mix", dict(key=k.to("meta")), RuntimeError, "same device"),
        ("mask_device", dict(attn_mask=torch.ones(5, 6, dtype=torch.bool, device="meta")),
         RuntimeError, "attn_mask"),
        ("dropout_high", dict(dropout_p=1.0), ValueError, "dropout_p"),
        ("dropout_neg", dict(dropout_p=-0.1), ValueError, "dropout_p"),
        ("window_value", dict(window=(-2, 3)), ValueError, "window"),
        ("window_type", dict(window=(1.5, 2)), TypeError, "window"),
        ("window_len", dict(window=(1, 2, 3)), TypeError, "window"),
        ("alignment", dict(causal_alignment="center"), ValueError, "causal_alignment"),
        ("scale", dict(scale=float("nan")), ValueError, "scale"),
        ("integer", dict(query=q.long(), key=k.long(), value=v.long()), TypeError,
         "floating-point"),
    ], (q, k, v)


_BAD, _BAD_QKV = _bad_cases()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,override,exc,match", _BAD, ids=[c[0] for c in _BAD])
def test_bad_input(backend, name, override, exc, match):
    need(backend)
    q, k, v = _BAD_QKV
    args = dict(query=q, key=k, value=v, enable_gqa=True)
    args.update(override)
    with pytest.raises(exc, match=match):
        fastattn.scaled_dot_product_attention(**args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [(), (2,), (2, 3)], ids=["3d", "4d", "5d"])
def test_any_rank_like_sdpa(backend, batch):
    """(..., H, L, E) inputs of any rank >= 3, as F.scaled_dot_product_attention takes them: the
    leading dims are batch dims (GQA over the dim before L), masks broadcast over them, and the
    kernels see (B, H, L, E) views of the inputs."""
    need(backend)
    q = torch.randn(*batch, 4, 5, 16)
    k, v = torch.randn(*batch, 2, 7, 16), torch.randn(*batch, 2, 7, 8)
    mask = torch.rand(*batch[-1:], 1, 5, 7) > 0.3  # broadcast over the leading batch dim
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True,
                                                     return_lse=True, backend=backend)
    hi = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), mask, enable_gqa=True)
    lo = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)
    assert out.shape == (*batch, 4, 5, 8) and lse.shape == (*batch, 4, 5)
    assert_close_rule(out, hi, lo)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_output_is_token_major(backend):
    """The kernels store out (B, H, L, Ev) as (B, L, H, Ev) memory, as FlashAttention and torch's
    CPU flash attention do: the (B, L, H * Ev) rows an output projection reads are a view."""
    need(backend)
    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 8)
    out = fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend=backend)
    assert out.shape == (2, 4, 5, 8) and out.transpose(1, 2).is_contiguous()
    rows = out.transpose(1, 2).reshape(2, 5, 32)
    assert rows.data_ptr() == out.data_ptr()  # no copy


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_kvcache_input(backend):
    need(backend, op="attention_kvcache")
    q = torch.randn(2, 4, 1, 8)
    kc, vc = torch.zeros(2, 2, 10, 8), torch.zeros(2, 2, 10, 8)
    lens = torch.tensor([3, 4], dtype=torch.int32)
    call = lambda **kw: fastattn.attention_with_kvcache(
        **{**dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=lens, backend=backend), **kw})
    with pytest.raises(TypeError, match="cache_seqlens"):
        call(cache_seqlens=lens.long())
    with pytest.raises(ValueError, match="cache_seqlens"):
        call(cache_seqlens=torch.tensor([3, 10], dtype=torch.int32), k_new=torch.zeros(2, 2, 1, 8),
             v_new=torch.zeros(2, 2, 1, 8))
    with pytest.raises(ValueError, match="k_new"):  # (any number of new tokens, but E = 8)
        call(k_new=torch.zeros(2, 2, 2, 4), v_new=torch.zeros(2, 2, 2, 8))
    with pytest.raises(ValueError, match="together"):
        call(k_new=torch.zeros(2, 2, 1, 8))
    with pytest.raises(ValueError, match="multiple"):
        call(q=torch.randn(2, 3, 1, 8))
    with pytest.raises(TypeError, match="dtype"):
        call(k_cache=kc.half(), v_cache=vc.half())
    with pytest.raises(TypeError, match="cache_leftpad"):
        call(cache_leftpad=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="cache_leftpad"):
        call(cache_leftpad=torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_leftpad"):
        call(cache_leftpad=torch.tensor([0, 5], dtype=torch.int32))  # past the 4 cached keys


# ---------------------------------------------------------------------------------------------
# decoding with a KV cache
# ---------------------------------------------------------------------------------------------
def check_kvcache(backend, B, H, Hkv, Lq, cap, E, lens, *, new, causal=True, dtype=torch.float32,
                  device="cpu", run=None, leftpad=None):
    q = torch.randn(B, H, Lq, E, dtype=dtype, device=device)
    kc = torch.randn(B, Hkv, cap, E, dtype=dtype, device=device)
    vc = torch.randn(B, Hkv, cap, E, dtype=dtype, device=device)
    kn = torch.randn(B, Hkv, Lq, E, dtype=dtype, device=device) if new else None
    vn = torch.randn(B, Hkv, Lq, E, dtype=dtype, device=device) if new else None
    lens = torch.tensor(lens, dtype=torch.int32, device=device)
    lp = None if leftpad is None else torch.tensor(leftpad, dtype=torch.int32, device=device)
    caches = {d: (kc.detach().to("cpu", d), vc.detach().to("cpu", d))
              for d in (torch.float64, dtype)}
    if run is None:
        out = fastattn.attention_with_kvcache(q, kc, vc, lens, kn, vn, causal=causal,
                                              cache_leftpad=lp, backend=backend)
    else:
        out = run(q, kc, vc, lens, kn, vn, 1.0 / math.sqrt(E), causal, lp)
    outs = {}
    for d, (kc_ref, vc_ref) in caches.items():
        cvt = lambda t, d=d: None if t is None else t.detach().to("cpu", d)
        outs[d] = reference.attention_with_kvcache(cvt(q), kc_ref, vc_ref, lens.cpu(), cvt(kn),
                                                   cvt(vn), causal=causal,
                                                   cache_leftpad=None if lp is None else lp.cpu())
    assert out.shape == (B, H, Lq, E) and out.dtype == dtype
    assert_close_rule(out, outs[torch.float64], outs[dtype])
    # the append is exact and touches nothing else
    assert torch.equal(kc.cpu(), caches[dtype][0]) and torch.equal(vc.cpu(), caches[dtype][1])
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("new", [False, True])
@pytest.mark.parametrize("Lq", [1, 3])
@pytest.mark.parametrize("H,Hkv", [(2, 2), (4, 1)])
def test_kvcache(backend, new, Lq, H, Hkv):
    need(backend, op="attention_kvcache")
    check_kvcache(backend, 3, H, Hkv, Lq, 70, 64, [0 if new else 1, 17, 64], new=new)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_kvcache_non_causal_low_precision(backend, dtype):
    need(backend, op="attention_kvcache")
    check_kvcache(backend, 2, 4, 2, 3, 48, 80, [9, 40], new=True, causal=False, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Lq,H,Hkv", [(1, 4, 2), (3, 2, 2), (5, 8, 1)])
def test_kvcache_leftpad(backend, Lq, H, Hkv):
    """Left-padded sequences (cache_leftpad): the keys before each sequence's first token are not
    seen; a causal row whose visible range is empty (batch 2, first query) gives zeros. Lq=5 with
    8 query heads per kv head runs the CPU's blocked path (more than 16 rows per kv head)."""
    need(backend, op="attention_kvcache")
    lens, leftpad = [3, 40, 61], [0, 25, 60 + Lq]
    out = check_kvcache(backend, 3, H, Hkv, Lq, 70, 32, lens, new=True, leftpad=leftpad)
    if Lq > 1:
        assert torch.equal(out[2, :, 0], torch.zeros_like(out[2, :, 0]))
    check_kvcache(backend, 3, H, Hkv, Lq, 70, 32, [5, 40, 65 - Lq], new=False, causal=False,
                  leftpad=[5, 1, 17], dtype=torch.bfloat16)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_kvcache_triton_split_k(num_splits):
    """The split-K path with its combine kernel, including splits that see no key (seqlen 2 with
    8 splits) and a causal Lq > 1 whose first rows see fewer keys than the last."""
    need("triton")
    from fastattn.triton.attention import attention_kvcache

    run = lambda *a: attention_kvcache(*a, num_splits=num_splits)
    check_kvcache("triton", 3, 6, 2, 2, 66, 40, [2, 33, 64], new=True, run=run,
                  dtype=torch.bfloat16)
    check_kvcache("triton", 1, 2, 2, 1, 66, 40, [50], new=False, run=run)
    # splits that start inside and wholly before the first token of a left-padded sequence
    check_kvcache("triton", 2, 2, 2, 1, 66, 40, [50, 64], new=True, run=run, leftpad=[20, 41])


# ---------------------------------------------------------------------------------------------
# score modifiers: softcap, ALiBi, sinks (scale -> softcap -> alibi -> masks -> softmax + sink)
# ---------------------------------------------------------------------------------------------
def test_reference_score_modifiers_formula():
    """The oracle itself, against the definition written out row by row in float64: softcap,
    ALiBi at bottom-right positions, causal, and the sink in the denominator; the sink's
    gradient is -sum_i p_sink_i * delta_i with delta_i = rowsum(dO * O)."""
    B, H, L, S, E = 1, 2, 3, 5, 8
    q, k, v = (t.double() for t in make_qkv(B, H, H, L, S, E))
    cap, scale = 1.5, 0.7
    slopes = torch.tensor([0.25, 0.5])
    sinks = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)
    out, lse = reference.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, causal_alignment="bottom_right", return_lse=True,
        softcap=cap, alibi_slopes=slopes, sinks=sinks)
    want_out, want_lse = torch.zeros_like(out), torch.zeros_like(lse)
    for h in range(H):
        for i in range(L):
            pos_q = i + S - L
            x = [cap * math.tanh(scale * float(q[0, h, i] @ k[0, h, j]) / cap)
                 - float(slopes[h]) * abs(pos_q - j) for j in range(pos_q + 1)]
            w = [math.exp(xj) for xj in x]
            den = sum(w) + math.exp(float(sinks.detach()[h]))
            want_out[0, h, i] = sum(wj * v[0, h, j] for j, wj in enumerate(w)) / den
            want_lse[0, h, i] = math.log(den)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    delta = (g * out.detach()).sum(-1)  # (B, H, L)
    p_sink = torch.exp(sinks.detach()[None, :, None] - lse.detach())
    torch.testing.assert_close(sinks.grad, -(p_sink * delta).sum((0, 2)), rtol=1e-12, atol=1e-12)


def check_score_mods(backend, q, k, v, *, sinks=None, lse_grad=True, **kwargs):
    """Run the backend with the score modifiers and hold out, lse and the gradients of q, k, v
    and sinks to the rule against the float64 reference (factor 2 / 3)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    s = None if sinks is None else sinks.detach().clone().requires_grad_()
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, return_lse=True, backend=backend,
                                                     sinks=s, **kwargs)

    def ref(dtype):
        ins = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        sk = None
        if sinks is not None:
            sk = sinks.detach().to(dtype if dtype == torch.float64 else torch.float32)
            ins.append(sk.requires_grad_())
        o, l_ref = reference.scaled_dot_product_attention(*ins[:3], return_lse=True, sinks=sk,
                                                          **kwargs)
        return o, l_ref.float(), ins

    (o_hi, l_hi, ins_hi), (o_lo, l_lo, ins_lo) = ref(torch.float64), ref(q.dtype)
    assert_close_rule(out, o_hi, o_lo, name="out")
    assert_close_rule(lse, l_hi, l_lo, name="lse")
    g_out, g_lse = torch.randn_like(o_hi), torch.randn_like(l_hi, dtype=torch.float64)

    def loss(o, lse):
        value = (o * g_out.to(o.dtype)).sum()
        return value + (finite(lse) * g_lse.to(lse.dtype)).sum() if lse_grad else value

    loss(out.double(), lse.double()).backward()
    loss(o_hi, l_hi.double()).backward()
    loss(o_lo, l_lo).backward()
    leaves = [q, k, v] + ([s] if s is not None else [])
    names = ("dq", "dk", "dv", "dsinks")[:len(leaves)]
    for name, t, hi, lo in zip(names, leaves, ins_hi, ins_lo, strict=True):
        assert t.grad is not None and t.grad.shape == t.shape, f"{name}: no gradient"
        assert_close_rule(t.grad, hi.grad, lo.grad, factor=3.0, name=name)
    return out, lse


# B=2, H=4 over Hkv=2 (GQA), L=17, S=33 unless the case says otherwise
SCORE_MOD_CASES = {
    "softcap": dict(softcap=2.0, scale=1.0, is_causal=True),
    "alibi_heads": dict(alibi="h", is_causal=True, causal_alignment="bottom_right"),
    "alibi_batch_window": dict(alibi="bh", window=(5, 2)),
    "sinks_window": dict(sinks=True, window=(3, 0)),
    # L > S, bottom-right causal: the first rows see no key (out 0, lse = the sink)
    "all_empty_rows": dict(softcap=3.0, alibi="bh", sinks=True, is_causal=True,
                           causal_alignment="bottom_right", L=33, S=17),
}


def score_mod_args(case, dtype):
    kw = dict(SCORE_MOD_CASES[case])
    L, S = kw.pop("L", 17), kw.pop("S", 33)
    B, H = 2, 4
    q, k, v = make_qkv(B, H, 2, L, S, 32, dtype=dtype)
    alibi = kw.pop("alibi", None)
    if alibi is not None:
        kw["alibi_slopes"] = torch.rand(H) * 0.5 if alibi == "h" else torch.rand(B, H) * 0.5
    if kw.pop("sinks", False):
        kw["sinks"] = torch.randn(H) * 2.0
    return q, k, v, kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(SCORE_MOD_CASES))
def test_score_modifiers(backend, dtype, case):
    need(backend)
    q, k, v, kw = score_mod_args(case, dtype)
    out, lse = check_score_mods(backend, q, k, v, enable_gqa=True, **kw)
    if case == "all_empty_rows":  # rows 0..15 see no key
        assert torch.equal(out[:, :, :16], torch.zeros_like(out[:, :, :16]))
        # (the reference computes in the input dtype: its sink is rounded to bfloat16)
        tol = 1e-2 if backend == "reference" and dtype != torch.float32 else 1e-6
        torch.testing.assert_close(lse[:, :, :16], kw["sinks"][None, :, None].expand(2, 4, 16),
                                   rtol=0, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_modifiers_strided(backend):
    """Slopes and sinks given as strided views (every other element) run as their values say,
    in both functions."""
    need(backend)
    q, k, v = make_qkv(2, 4, 2, 9, 13, 16)
    slopes, sinks = torch.rand(2, 4, 2)[..., 0], torch.randn(8)[::2]
    check_score_mods(backend, q, k, v, enable_gqa=True, is_causal=True, alibi_slopes=slopes,
                     sinks=sinks)
    need(backend, op="attention_kvcache")
    lens = torch.tensor([3, 9], dtype=torch.int32)
    kc, vc = torch.randn(2, 2, 16, 16), torch.randn(2, 2, 16, 16)
    outs = [f(q[:, :, :2].to(d), kc.to(d), vc.to(d), lens, alibi_slopes=slopes[0], sinks=sinks)
            for f, d in ((reference.attention_with_kvcache, torch.float64),
                         (reference.attention_with_kvcache, torch.float32),
                         (functools.partial(fastattn.attention_with_kvcache, backend=backend),
                          torch.float32))]
    assert_close_rule(outs[2], outs[0], outs[1])


def test_score_modifiers_cuda_refused():
    """The CUDA kernels implement none of the modifiers: _supports says so, so "auto" on a GPU
    takes Triton and an explicit backend="cuda" raises with the reason."""
    from fastattn.ops import attention as ops_attention

    cuda = torch.device("cuda")
    why = ops_attention._supports("cuda", cuda, (torch.bfloat16, 64, False, True))
    assert why is not None and "sinks" in why
    assert ops_attention._supports("cuda", cuda, (torch.bfloat16, 64, False, False)) is None
    why = ops_attention._kvcache_supports("cuda", cuda, (torch.bfloat16, 64, False, True))
    assert why is not None and "softcap" in why


def check_kvcache_mods(backend, Lq, H, Hkv, *, alibi_batch, leftpad=None, run=None,
                       dtype=torch.float32, only=None):
    """attention_with_kvcache with softcap, ALiBi and sinks (or only the one named) against the
    float64 reference."""
    B, cap, E = 3, 40, 32
    q = torch.randn(B, H, Lq, E, dtype=dtype)
    kc, vc = (torch.randn(B, Hkv, cap, E, dtype=dtype) for _ in range(2))
    kn, vn = (torch.randn(B, Hkv, Lq, E, dtype=dtype) for _ in range(2))
    lens = torch.tensor([0, 11, 30], dtype=torch.int32)
    lp = None if leftpad is None else torch.tensor(leftpad, dtype=torch.int32)
    slopes = torch.rand(B, H) * 0.5 if alibi_batch else torch.rand(H) * 0.5
    mods = dict(softcap=4.0, alibi_slopes=slopes, sinks=torch.randn(H))
    if only is not None:
        mods = {name: (x if name == only else None) for name, x in mods.items()}
    outs = {}
    for d in (torch.float64, dtype):
        outs[d] = reference.attention_with_kvcache(
            q.to(d), kc.to(d), vc.to(d), lens, kn.to(d), vn.to(d), cache_leftpad=lp, **mods)
    if run is None:
        out = fastattn.attention_with_kvcache(q, kc, vc, lens, kn, vn, cache_leftpad=lp,
                                              backend=backend, **mods)
    else:
        out = run(q, kc, vc, lens, kn, vn, 1.0 / math.sqrt(E), True, lp, None, None, False,
                  mods["softcap"], slopes, mods["sinks"])
    assert_close_rule(out, outs[torch.float64], outs[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Lq,H,Hkv", [(1, 4, 2), (3, 2, 2), (5, 8, 1)])
def test_kvcache_score_modifiers(backend, Lq, H, Hkv):
    """Decoding with the modifiers; Lq=5 with 8 query heads per kv head runs the CPU's blocked
    path, the others its decoding kernel; left padding leaves the ALiBi distances unchanged."""
    need(backend, op="attention_kvcache")
    check_kvcache_mods(backend, Lq, H, Hkv, alibi_batch=Lq != 3, leftpad=[0, 4, 29])
    check_kvcache_mods(backend, Lq, H, Hkv, alibi_batch=Lq == 3, dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("only", ["softcap", "alibi_slopes", "sinks"])
def test_kvcache_one_score_modifier(backend, only):
    """One query row per kv head, each modifier alone (on the CPU: the register-only decoding
    kernel, with the sink in its combine step; the other two on its general path)."""
    need(backend, op="attention_kvcache")
    check_kvcache_mods(backend, 1, 2, 2, alibi_batch=False, only=only)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_kvcache_score_modifiers_triton_split_k(num_splits):
    """The sink in the split-K combine kernel (num_splits > 1) and in the split kernel (1)."""
    need("triton")
    from fastattn.triton.attention import attention_kvcache

    run = lambda *a: attention_kvcache(*a, num_splits=num_splits)
    check_kvcache_mods("triton", 2, 4, 2, alibi_batch=True, run=run)


def test_opcheck_score_modifiers():
    """opcheck (schema, fake tensors, autograd registration) of the C++ and Triton ops with the
    modifiers."""
    q, k, v = make_qkv(1, 2, 1, 9, 20, 16)
    slopes, sinks = torch.rand(1, 2), torch.randn(2)
    for t in (q, k, v, sinks):
        t.requires_grad_()
    ops = []
    if availability("cpu", "cpu", "attention_fwd") is None:
        ops.append((torch.ops.fastattn.attention_fwd, torch.ops.fastattn.attention_bwd,
                    torch.ops.fastattn.attention_kvcache))
    if availability("triton", "cpu") is None:
        ops.append((torch.ops.fastattn.triton_attention_fwd,
                    torch.ops.fastattn.triton_attention_bwd,
                    torch.ops.fastattn.triton_attention_kvcache))
    if not ops:
        pytest.skip("neither the C++ extension nor the Triton interpreter is available")
    for fwd, bwd, kvcache in ops:
        torch.library.opcheck(fwd, (q, k, v, None, 0.2, -1, 0, 11, 0.0, 0, 2.5, slopes, sinks))
        out, lse = fwd(q, k, v, None, 0.2, 3, 2, 0, 0.0, 0, 0.0, slopes, sinks)
        args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(),
                lse.detach(), torch.randn_like(lse), None, 0.2, 3, 2, 0, 0.0, 0, False, True,
                1.5, slopes, sinks.detach())
        torch.library.opcheck(bwd, args)
        kc, vc = torch.randn(2, 2, 24, 16), torch.randn(2, 2, 24, 16)
        kn, vn = torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16)
        lens = torch.tensor([5, 20], dtype=torch.int32)
        torch.library.opcheck(kvcache, (torch.randn(2, 4, 3, 16), kc, vc, lens, kn, vn, 0.17,
                                        True, None, None, None, False, 3.0, torch.rand(4),
                                        torch.randn(4)))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile_score_modifiers(backend):
    need(backend)
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 4, 2, 17, 33, 32)
    slopes, sinks = torch.rand(4), torch.randn(4)

    def f(q, k, v, sinks):
        out, lse = fastattn.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True, return_lse=True, softcap=5.0,
            alibi_slopes=slopes, sinks=sinks, backend=backend)
        return (out * out).sum() + lse.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ins = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    exp_ins = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    loss = compiled(*ins)
    loss.backward()
    exp = f(*exp_ins)
    exp.backward()
    torch.testing.assert_close(loss, exp)
    for a, b in zip(ins, exp_ins, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


# ---------------------------------------------------------------------------------------------
# the kernels compile for the GPU (CI has none: the interpreter does not type-check like the
# compiler does)
# ---------------------------------------------------------------------------------------------
_AOT_SCRIPT = r"""
import os, subprocess, sys, tempfile
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fastattn.triton.attention as A

arch, dt, D = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
# what the JIT sees for contiguous tensors: last-dim strides are 1, the rest divisible by 16
LAST = {"stride_qk", "stride_kk", "stride_vk", "stride_mn", "stride_ok", "stride_dok",
        "stride_dqk", "stride_dkk", "stride_dvk", "stride_dmn", "stride_knk", "stride_vnk",
        "stride_kck", "stride_vck"}
F = dict(HAS_MASK=True, HAS_LEFT=True, HAS_RIGHT=True, DROPOUT=True, INTERP_BF16=False,
         SOFTCAP=True, ALIBI=True, VARLEN=False, BOTTOM_RIGHT=False,
         DOT_PRECISION="tf32x3" if dt == "fp32" else "tf32")
fam = "hopper" if arch >= 90 else "ampere"
cfg = lambda table: table.get(fam + "_mask", table[fam])[min(256, max(64, D))][0]
P = lambda *names, **other: {**{n: "*" + dt for n in names}, **other}
kernels = [
    (A._attention_fwd_kernel.fn, cfg(A._FWD_TUNING),
     dict(HEAD_DIM=D, HEAD_DIM_V=D, SINKS=True, **F),
     P("Q", "K", "V", "Mask", "Out", Lse="*fp32", Slopes="*fp32", Sinks="*fp32")),
    (A._attention_bwd_dkdv_kernel.fn, cfg(A._DKDV_TUNING),
     dict(HEAD_DIM=D, HEAD_DIM_V=D, ATOMIC_DQ=True, STORE_DMASK=True, **F),
     P("Q", "K", "V", "Mask", "DO", "DK", "DV", "DMask", Lse="*fp32", Delta="*fp32",
       DQ="*fp32", Slopes="*fp32")),
    (A._attention_bwd_dq_kernel.fn, cfg(A._DQ_TUNING), dict(HEAD_DIM=D, HEAD_DIM_V=D, **F),
     P("Q", "K", "V", "Mask", "DO", "DQ", Lse="*fp32", Delta="*fp32", Slopes="*fp32")),
    (A._attention_sink_grad_kernel, (None, None, 4, 1), dict(BLOCK=1024),
     dict(Sinks="*fp32", Lse="*fp32", Delta="*fp32", DSinks="*fp32")),
    (A._attention_bwd_preprocess_kernel, (32, None, 4, 1),
     dict(HEAD_DIM_V=D, HAS_GRAD_LSE=True), P("Out", "DO", GradLse="*fp32", Delta="*fp32")),
    (A._kvcache_append_kernel, (None, None, 4, 1),
     dict(HEAD_DIM=D, HEAD_DIM_V=D, BLOCK_L=A.append_block_l(16, D, True), HAS_LEFTPAD=True,
          ROTARY=True, ROTARY_INTERLEAVED=False, PAGED=True),
     P("KNew", "VNew", "KCache", "VCache", "Q", "QRot", SeqLens="*i32", LeftPad="*i32",
       Cos="*fp32", Sin="*fp32", BlockTable="*i32")),
    (A._kvcache_split_kernel.fn, cfg(A._DECODE_TUNING),
     dict(HEAD_DIM=D, HEAD_DIM_V=D, BLOCK_M=16, CAUSAL=True, SPLIT=True, HAS_LEFTPAD=True,
          INTERP_BF16=False, DOT_PRECISION=F["DOT_PRECISION"], SOFTCAP=True, ALIBI=True,
          SINKS=True, PAGED=True, WINDOW=True, RETURN_LSE=True),
     P("Q", "KCache", "VCache", "Out", SeqLens="*i32", LeftPad="*i32", OutPartial="*fp32",
       LsePartial="*fp32", Slopes="*fp32", Sinks="*fp32", BlockTable="*i32", Lse="*fp32")),
    (A._kvcache_combine_kernel, (None, None, 4, 1),
     dict(HEAD_DIM_V=D, BLOCK_SPLITS=16, SINKS=True, RETURN_LSE=True),
     P("Out", OutPartial="*fp32", LsePartial="*fp32", Sinks="*fp32", Lse="*fp32")),
]
for fn, (bm, bn, warps, stages), const, ptrs in kernels:
    const = dict(const)
    if bm is not None:
        const["BLOCK_M"] = bm
    if bn is not None:
        const["BLOCK_N"] = bn
    const.update({n: 1 for n in fn.arg_names if n in LAST})
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        sig[n] = ("constexpr" if n in const else ptrs.get(n) or
                  ("fp32" if n in ("qk_scale", "sm_scale", "dropout_p", "softcap2") else
                   "i64" if n == "seed" else "i32"))
        if sig[n].startswith("*") or (n.startswith("stride_") and sig[n] == "i32"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", arch, 64),
                       options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    r = subprocess.run([ptxas, "-v", "--gpu-name=" + gpu, f.name, "-o", os.devnull],
                       capture_output=True, text=True)
    os.unlink(f.name)
    info = " ".join(line.split("info    :")[-1].strip() for line in r.stderr.splitlines()
                    if "registers" in line or "spill" in line)
    print(fn.__name__, (bm, bn, warps, stages), "smem", k.metadata.shared, info)
    assert r.returncode == 0, r.stderr
"""


@pytest.mark.parametrize("major,smem", [(9, 227 * 1024), (8, 163 * 1024), (8, 99 * 1024)])
def test_triton_autotune_pruning(monkeypatch, major, smem):
    """On a (pretend) Hopper / A100 / consumer GPU the prune predicates keep, for every kernel,
    head-dim class, mask and dtype, a non-empty set of configs from the right tuning list."""
    need("triton")
    import types

    from fastattn.triton import attention as A

    monkeypatch.setattr(A, "_interpret", lambda: False)
    monkeypatch.setattr(A, "_device_limits", lambda index: (major, smem, 100))
    family = "hopper" if major >= 9 else "ampere"
    kernels = [(A._FWD_TUNING, A._prune_fwd), (A._DKDV_TUNING, A._prune_bwd_dkdv),
               (A._DQ_TUNING, A._prune_bwd_dq), (A._DECODE_TUNING, A._prune_decode)]
    for table, prune in kernels:
        configs = A._tuning_configs(table, interpret=None)
        for elem, has_mask in ((2, False), (2, True), (4, False)):
            q = types.SimpleNamespace(device=torch.device("cuda", 0), element_size=lambda e=elem: e)
            for d in (16, 64, 128, 256):
                args = dict(HEAD_DIM=d, HEAD_DIM_V=d, HAS_MASK=has_mask, BLOCK_M=16)
                dtype = torch.float32 if elem == 4 else torch.bfloat16
                try:
                    kept = prune(configs, {"Q": q}, **args)
                except RuntimeError:  # only where _supports refuses the call: never launched
                    assert A.attention_unsupported_reason(dtype, d, torch.device("cuda", 0))
                    assert elem == 4 or smem < 160 * 1024, (d, elem, smem)
                    continue
                assert kept, (table is A._FWD_TUNING, d, has_mask, elem)
                key = lambda c: (c.kwargs.get("BLOCK_M"), c.kwargs["BLOCK_N"], c.num_warps,
                                 c.num_stages)
                variant = family + "_mask" if (has_mask or elem == 4) else family
                cands = table.get(variant, table[family])[min(256, max(64, d))]
                if smem >= 160 * 1024 and elem == 2:  # the tuned lists fit H100 and A100
                    assert {key(c) for c in kept} <= set(cands)
                    assert len(kept) == len(cands)


@pytest.mark.parametrize("arch,dtype,head_dim", [(90, "bf16", 128)])
def test_triton_kernels_compile_for_gpu(arch, dtype, head_dim):
    """Every kernel, with every feature on, compiles to a cubin for the H200 (sm_90a, triton's
    bundled ptxas; no GPU needed) at its first tuning candidate. Other targets: edit the
    parameters (each costs ~30 s of CPU)."""
    pytest.importorskip("triton", reason="needs triton installed")
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, str(arch), dtype, str(head_dim)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count("smem") == 8, r.stdout


# ---------------------------------------------------------------------------------------------
# GPU: the same checks at real sizes (skips without a CUDA device)
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
class TestGPU:
    @pytest.fixture(autouse=True)
    def _compiled(self):
        if is_interpret():
            pytest.skip("GPU tests run compiled kernels: set TRITON_INTERPRET=0")

    @pytest.mark.parametrize("backend", ["triton", "cuda"])
    @pytest.mark.parametrize("E", [40, 64, 80, 111, 128, 256])
    def test_head_dims(self, backend, E):
        need(backend, "cuda")
        q, k, v = make_qkv(2, 4, 2, 1023, 1100, E, dtype=torch.bfloat16, device="cuda")
        check_attention(backend, q, k, v, is_causal=True, causal_alignment="bottom_right",
                        enable_gqa=True)

    @pytest.mark.parametrize("backend", ["triton", "cuda"])
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("L,S,causal", [(4096, 4096, True), (113, 4096, False),
                                            (4096, 113, True)])
    def test_long(self, backend, dtype, L, S, causal):
        need(backend, "cuda")
        q, k, v = make_qkv(1, 2, 2, L, S, 128, dtype=dtype, device="cuda")
        check_attention(backend, q, k, v, is_causal=causal)

    @pytest.mark.parametrize("backend", ["triton", "cuda"])
    def test_masks_windows(self, backend):
        need(backend, "cuda")
        q, k, v = make_qkv(2, 4, 4, 1023, 2048, 64, dtype=torch.float16, device="cuda")
        mask = torch.randn(2, 1, 1023, 2048, dtype=torch.float16, device="cuda")
        check_attention(backend, q, k, v, mask, mask_grad=True, window=(256, 64),
                        causal_alignment="bottom_right")
        check_attention(backend, q, k, v, mask > 0.5)

    @pytest.mark.parametrize("backend", ["triton", "cuda"])
    def test_deterministic_and_dropout(self, backend):
        need(backend, "cuda")
        q, k, v = make_qkv(1, 4, 2, 2048, 2048, 128, dtype=torch.bfloat16, device="cuda")
        for t in (q, k, v):
            t.requires_grad_()
        with deterministic_algorithms():
            grads = []
            for _ in range(2):
                out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                            enable_gqa=True, backend=backend)
                grads.append(torch.autograd.grad(out.sum(), (q, k, v)))
        for a, b in zip(*grads, strict=True):
            assert torch.equal(a, b)
        torch.manual_seed(0)
        a = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.1, enable_gqa=True,
                                                  backend=backend)
        torch.manual_seed(0)
        b = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.1, enable_gqa=True,
                                                  backend=backend)
        assert torch.equal(a, b)

    @pytest.mark.parametrize("backend", ["triton", "cuda"])
    def test_torch_compile_inductor(self, backend):
        need(backend, "cuda")
        q, k, v = make_qkv(2, 8, 2, 1000, 1000, 128, dtype=torch.bfloat16, device="cuda")
        f = lambda q, k, v: fastattn.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True, backend=backend).float().square().sum()
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        exp_ins = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.compile(f, fullgraph=True)(*ins).backward()
        f(*exp_ins).backward()
        for a, b in zip(ins, exp_ins, strict=True):
            torch.testing.assert_close(a.grad, b.grad)

    @pytest.mark.parametrize("backend", ["triton", "cuda"])
    @pytest.mark.parametrize("B,H,Hkv,Lq,E", [(1, 32, 8, 1, 128), (4, 8, 8, 3, 64),
                                               (2, 16, 2, 1, 256)])
    def test_kvcache(self, backend, B, H, Hkv, Lq, E):
        need(backend, "cuda", op="attention_kvcache")
        lens = [4000 - 997 * b for b in range(B)]
        check_kvcache(backend, B, H, Hkv, Lq, 4096, E, lens, new=True, dtype=torch.bfloat16,
                      device="cuda")
