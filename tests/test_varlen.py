"""fastattn.attention_varlen: packed variable-length attention on every backend ("reference",
"cpu", "triton") against a loop of per-sequence ``fastattn.reference.scaled_dot_product_attention``
calls, by the correctness rule of docs/design.md: the loop in float64 is the oracle, the same loop
in the kernel's dtype the low-precision baseline (factor 2 for out and lse, 3 for the gradients of
q, k, v and sinks).

The packed batches hold sequences of length 0 and 1 and L != S both ways; the options cover GQA,
both causal alignments, sliding windows, softcap / ALiBi ((H,) and (B, H)) / sinks, dropout
(checked exactly against the reference given the keep mask the kernel drew, returned by
return_dropout_mask, as tests/test_attention.py does for sdpa), the deterministic backward,
opcheck and torch.compile(fullgraph=True), and a hypothesis property over random cu_seqlens. Triton runs under
the interpreter on CPU tensors: its cases are the smallest.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rule, skip_unless_backend

import fastattn
from fastattn import reference
from fastattn.ops._backend import availability

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (query lengths, key lengths) per sequence: empty sequences on either side, length 1, L != S
LENS = ([5, 0, 1, 37, 20, 3, 0], [7, 3, 0, 37, 45, 1, 0])
SMALL_LENS = ([3, 0, 1, 9, 5], [4, 2, 0, 9, 12])  # the interpreter's (Triton) batches
TINY_LENS = ([2, 0, 1, 5], [3, 2, 0, 6])  # ... for the checks that run the op many times
OPTIONS = {
    "plain": {},
    "causal": dict(is_causal=True),
    "causal_br": dict(is_causal=True, causal_alignment="bottom_right"),
    "window_br": dict(window=(3, 2), causal_alignment="bottom_right"),
    "window_causal": dict(window=(4, -1), is_causal=True),
    "mods": dict(softcap=5.0, alibi="BH", sinks=True, scale=0.3),
    "alibi_h_causal_br": dict(alibi="H", is_causal=True, causal_alignment="bottom_right"),
}


def need(backend: str) -> None:
    skip_unless_backend(backend)
    if backend == "cpu":
        for op in ("attention_varlen_fwd", "attention_varlen_bwd"):
            why = availability("cpu", "cpu", op)
            if why is not None:
                pytest.skip(f"cpu cannot run {op}: {why}")


def cu(lens) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def make(lens_q, lens_k, H=4, Hkv=2, E=40, Ev=None, dtype=torch.float32, option=None):
    """Packed q, k, v, the offsets, and the keywords of ``option`` with its tensors made."""
    Ev = E if Ev is None else Ev
    q = torch.randn(sum(lens_q), H, E).to(dtype)
    k = torch.randn(sum(lens_k), Hkv, E).to(dtype)
    v = torch.randn(sum(lens_k), Hkv, Ev).to(dtype)
    kw = dict(OPTIONS[option] if option else {})
    alibi = kw.pop("alibi", None)
    if alibi is not None:
        kw["alibi_slopes"] = torch.rand(H) if alibi == "H" else torch.rand(len(lens_q), H)
    if kw.pop("sinks", False):
        kw["sinks"] = torch.randn(H)
    return q, k, v, cu(lens_q), cu(lens_k), kw


def sdpa_loop(q, k, v, cu_q, cu_k, dtype, *, dropout_mask=None, **kw):
    """The oracle: reference.scaled_dot_product_attention per sequence, in ``dtype`` (the inputs
    cast), concatenated: out (total_q, H, Ev), lse (H, total_q), and the cast leaves."""
    ins = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    sinks = kw.pop("sinks", None)
    if sinks is not None:
        sinks = sinks.detach().to(dtype).requires_grad_()
        ins.append(sinks)
    slopes = kw.pop("alibi_slopes", None)
    outs, lses = [], []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        rows = slice(cq[b], cq[b + 1])
        keys = slice(ck[b], ck[b + 1])
        s = slopes[b] if slopes is not None and slopes.dim() == 2 else slopes
        keep = None
        if dropout_mask is not None:
            keep = dropout_mask[rows, :, :ck[b + 1] - ck[b]].transpose(0, 1)[None]
        o, lse = reference.scaled_dot_product_attention(
            ins[0][rows].transpose(0, 1)[None], ins[1][keys].transpose(0, 1)[None],
            ins[2][keys].transpose(0, 1)[None], enable_gqa=True, return_lse=True,
            sinks=sinks, alibi_slopes=s, dropout_mask=keep, **kw)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1), ins


def finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def check_varlen(backend, lens_q, lens_k, dtype, *, H=4, Hkv=2, E=40, option="plain",
                 grad=True):
    """Runs the backend on one packed batch and holds out, lse and the gradients of q, k, v
    (and sinks) to the rule against the per-sequence loop."""
    q, k, v, cu_q, cu_k, kw = make(lens_q, lens_k, H, Hkv, E, dtype=dtype, option=option)
    sinks = kw.get("sinks")
    leaves = [q, k, v] + ([sinks] if sinks is not None else [])
    for t in leaves:
        t.requires_grad_(grad)
    out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                         return_lse=True, backend=backend, **kw)
    assert out.shape == (q.shape[0], H, v.shape[-1]) and out.dtype == dtype
    assert lse.shape == (H, q.shape[0]) and lse.dtype == torch.float32
    o_hi, l_hi, ins_hi = sdpa_loop(q, k, v, cu_q, cu_k, torch.float64, **dict(kw))
    o_lo, l_lo, ins_lo = sdpa_loop(q, k, v, cu_q, cu_k, dtype, **dict(kw))
    assert_close_rule(out, o_hi, o_lo, name="out")
    assert_close_rule(lse, l_hi, l_lo.float(), name="lse")
    if not grad:
        return
    g_out = torch.randn_like(o_hi)
    g_lse = torch.randn_like(l_hi)

    def loss(o, lse):
        return (o * g_out.to(o.dtype)).sum() + (finite(lse) * g_lse.to(lse.dtype)).sum()

    loss(out.double(), lse.double()).backward()
    loss(o_hi, l_hi).backward()
    loss(o_lo, l_lo).backward()
    for name, t, hi, lo in zip(("dq", "dk", "dv", "dsinks")[:len(leaves)], leaves, ins_hi,
                               ins_lo, strict=True):
        assert t.grad is not None and t.grad.shape == t.shape, name
        assert_close_rule(t.grad, hi.grad, lo.grad, factor=3.0, name=name)


# ---------------------------------------------------------------------------------------------
# forward and backward against the per-sequence loop
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_matches_sdpa_loop(dtype, option):
    need("cpu")
    check_varlen("cpu", *LENS, dtype, option=option)


@pytest.mark.parametrize("option", ["causal", "window_br", "mods"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_odd_head_dim_72(dtype, option):
    need("cpu")
    check_varlen("cpu", *LENS, dtype, E=72, option=option)


@pytest.mark.parametrize("option", ["plain", "causal_br", "mods"])
def test_cpu_mha_and_long_sequences(option):
    """H == Hkv, and sequences spanning several 64-row / 64-key blocks (a block never holds two
    sequences' rows, whatever the packing)."""
    need("cpu")
    check_varlen("cpu", [130, 1, 70, 0, 65], [64, 129, 1, 3, 200], torch.float32, H=2, Hkv=2,
                 option=option)


@pytest.mark.parametrize("option", ["causal", "window_br", "mods"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_matches_sdpa_loop(dtype, option):
    need("triton")
    check_varlen("triton", *SMALL_LENS, dtype, option=option)


def test_triton_float16_odd_head_dim():
    need("triton")
    check_varlen("triton", *SMALL_LENS, torch.float16, E=72, option="alibi_h_causal_br")


@pytest.mark.parametrize("option", ["causal_br", "mods"])
def test_reference_matches_sdpa_loop(option):
    check_varlen("reference", *LENS, torch.float32, option=option)
    # the reference op is the loop itself: exactly, in float64
    q, k, v, cu_q, cu_k, kw = make(*LENS, dtype=torch.float64, option=option)
    out, lse = reference.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    o, lse_loop, _ = sdpa_loop(q, k, v, cu_q, cu_k, torch.float64, **dict(kw))
    torch.testing.assert_close(out, o, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_loop, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_every_sequence_empty_of_keys(backend):
    """total_k = 0: every row sees nothing: out 0, lse the sink; dsinks = sum of grad_lse."""
    need(backend)
    q, k, v, cu_q, cu_k, _ = make([2, 3], [0, 0], H=2, Hkv=1)
    sinks = torch.randn(2, requires_grad=True)
    out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, 3, 0, sinks=sinks,
                                         return_lse=True, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(lse, sinks.detach()[:, None].expand(2, 5))
    g = torch.randn_like(lse)
    (dsinks,) = torch.autograd.grad((lse * g).sum(), (sinks,))
    torch.testing.assert_close(dsinks, g.sum(1))


# ---------------------------------------------------------------------------------------------
# dropout: the keep mask the kernels drew (return_dropout_mask), given to the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_dropout_matches_reference_given_the_keep_mask(backend):
    """attention_varlen(return_dropout_mask=True) returns the packed (total_q, H, max_seqlen_k)
    keep mask the backend drew; forward and gradients equal the per-sequence reference run with
    it, by the rule; the same seed gives the same output without asking for the mask."""
    need(backend)
    lens_q, lens_k = SMALL_LENS if backend == "triton" else LENS
    p, seed, H = 0.3, 5, 4
    kw = dict(is_causal=True, causal_alignment="bottom_right", window=(6, -1))
    q, k, v, cu_q, cu_k, _ = make(lens_q, lens_k, H=H, option=None)
    for t in (q, k, v):
        t.requires_grad_()
    torch.manual_seed(seed)
    out, lse, keep = fastattn.attention_varlen(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k) + 2, dropout_p=p, backend=backend,
        return_lse=True, return_dropout_mask=True, **kw)
    assert keep.dtype == torch.bool and keep.shape == (q.shape[0], H, max(lens_k) + 2)
    torch.manual_seed(seed)
    again, lse_again = fastattn.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q),
                                                 max(lens_k) + 2, dropout_p=p, backend=backend,
                                                 return_lse=True, **kw)
    assert torch.equal(out, again) and torch.equal(lse, lse_again)
    # each row's flags for its own sequence's keys: about p dropped; False past them
    cq, ck = cu_q.tolist(), cu_k.tolist()
    own = torch.zeros_like(keep)
    for b in range(len(cq) - 1):
        own[cq[b]:cq[b + 1], :, :ck[b + 1] - ck[b]] = True
    assert not keep[~own].any()
    dropped = 1.0 - keep[own].float().mean().item()
    assert 0.15 < dropped < 0.45, f"dropped fraction {dropped:.3f} for p = {p}"

    g = torch.randn_like(out)
    out.backward(g)
    o_hi, _, ins_hi = sdpa_loop(q, k, v, cu_q, cu_k, torch.float64, dropout_p=p,
                                dropout_mask=keep, **kw)
    o_lo, _, ins_lo = sdpa_loop(q, k, v, cu_q, cu_k, torch.float32, dropout_p=p,
                                dropout_mask=keep, **kw)
    o_hi.backward(g.double())
    o_lo.backward(g)
    assert_close_rule(out, o_hi, o_lo, name="out")
    for name, t, hi, lo in zip(("dq", "dk", "dv"), (q, k, v), ins_hi, ins_lo, strict=True):
        assert_close_rule(t.grad, hi.grad, lo.grad, factor=3.0, name=name)
    # reference.attention_varlen takes the same packed keep mask
    ref = reference.attention_varlen(q.detach().double(), k.detach().double(),
                                     v.detach().double(), cu_q, cu_k, dropout_p=p,
                                     dropout_mask=keep, **kw)
    torch.testing.assert_close(ref, o_hi.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_dropout_mask_is_the_applied_one(backend):
    """With V = identity of each sequence's keys (Ev = S_max, no mask or window: every P > 0),
    out[r, h, j] = P[r, j] * keep / (1 - p): its nonzeros are exactly the returned mask.
    Without dropout the mask is None."""
    need(backend)
    lens_q, lens_k = TINY_LENS if backend == "triton" else SMALL_LENS
    q, k, _, cu_q, cu_k, _ = make(lens_q, lens_k, H=2, Hkv=1)
    smax = max(lens_k)
    eye = torch.zeros(k.shape[0], 1, smax)
    ck = cu_k.tolist()
    for b in range(len(ck) - 1):
        n = ck[b + 1] - ck[b]
        eye[ck[b]:ck[b + 1], :, :n] = torch.eye(n)[:, None, :]
    out, keep = fastattn.attention_varlen(q, k, eye, cu_q, cu_k, max(lens_q), smax,
                                          dropout_p=0.4, return_dropout_mask=True,
                                          backend=backend)
    assert torch.equal(keep, out != 0)
    assert not keep.all()
    out, none = fastattn.attention_varlen(q, k, eye, cu_q, cu_k, max(lens_q), smax,
                                          return_dropout_mask=True, backend=backend)
    assert none is None


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_dropout_reproducible_by_seed(backend):
    need(backend)
    q, k, v, cu_q, cu_k, _ = make(*TINY_LENS, H=2, Hkv=1)
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(fastattn.attention_varlen(q, k, v, cu_q, cu_k, 5, 6, dropout_p=0.2,
                                              backend=backend))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


# ---------------------------------------------------------------------------------------------
# deterministic backward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_deterministic_backward_bitwise(backend):
    need(backend)
    lens_q, lens_k = TINY_LENS if backend == "triton" else LENS
    q, k, v, cu_q, cu_k, kw = make(lens_q, lens_k, H=2, Hkv=1, dtype=torch.bfloat16,
                                   option="mods")
    leaves = [q, k, v, kw["sinks"]]
    g = torch.randn(q.shape[0], 2, 40, dtype=torch.bfloat16)

    def grads():
        for t in leaves:
            t.grad = None
            t.requires_grad_()
        torch.manual_seed(1)
        out = fastattn.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                        dropout_p=0.1, backend=backend, **kw)
        out.backward(g)
        return [t.grad.clone() for t in leaves]

    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(first, grads(), strict=True):  # the default path: the same up to rounding
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------
# hypothesis: random cu_seqlens
# ---------------------------------------------------------------------------------------------
def test_random_cu_seqlens_property():
    """Random packings (0-6 sequences of 0-33 rows and keys), heads, head dims and options on the
    CPU kernels (float32), against the loop, forward and backward."""
    need("cpu")
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=15, deadline=None, derandomize=True)
    @hypothesis.given(
        lens=st.lists(st.tuples(st.integers(0, 33), st.integers(0, 33)), min_size=0,
                      max_size=6),
        heads=st.sampled_from([(1, 1), (3, 1), (4, 2), (2, 2)]),
        E=st.sampled_from([8, 17, 40, 64]),
        option=st.sampled_from(list(OPTIONS)),
        seed=st.integers(0, 2**16),
    )
    def prop(lens, heads, E, option, seed):
        torch.manual_seed(seed)
        lens_q = [a for a, _ in lens]
        lens_k = [b for _, b in lens]
        if sum(lens_q) == 0:  # nothing to compare (the op returns an empty tensor)
            return
        check_varlen("cpu", lens_q, lens_k, torch.float32, H=heads[0], Hkv=heads[1], E=E,
                     option=option)

    prop()


# ---------------------------------------------------------------------------------------------
# torch.library / torch.compile
# ---------------------------------------------------------------------------------------------
def _op_args(option="mods"):
    q, k, v, cu_q, cu_k, kw = make(*TINY_LENS, H=2, Hkv=1, E=16, option=option)
    B, H = cu_q.shape[0] - 1, q.shape[1]
    slopes = kw["alibi_slopes"].expand(B, H) if kw["alibi_slopes"].dim() == 1 else kw["alibi_slopes"]
    return q, k, v, cu_q, cu_k, slopes, kw["sinks"]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck_forward_backward(backend):
    need(backend)
    ops = torch.ops.fastattn
    fwd, bwd = ((ops.attention_varlen_fwd, ops.attention_varlen_bwd) if backend == "cpu"
                else (ops.triton_attention_varlen_fwd, ops.triton_attention_varlen_bwd))
    q, k, v, cu_q, cu_k, slopes, sinks = _op_args()
    for t in (q, k, v, sinks):
        t.requires_grad_()
    # the interpreter is slow: Triton skips opcheck's aot_dispatch tests (test_torch_compile_
    # fullgraph traces it through torch.compile instead)
    utils = ({} if backend == "cpu" else
             dict(test_utils=("test_schema", "test_autograd_registration", "test_faketensor")))
    # bottom-right causal with the modifiers; a window and dropout
    torch.library.opcheck(fwd, (q, k, v, cu_q, cu_k, 5, 6, 0.2, -1, 0, True, 0.0, 0, 5.0,
                                slopes, sinks), **utils)
    if backend == "cpu":  # (the same fake for Triton, whose interpreter is slow)
        torch.library.opcheck(fwd, (q, k, v, cu_q, cu_k, 5, 6, 0.2, 3, 2, False, 0.1, 1234))
    out, lse = fwd(q, k, v, cu_q, cu_k, 5, 6, 0.2, -1, 0, True, 0.0, 0, 5.0, slopes, sinks)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
            torch.randn_like(lse), cu_q, cu_k, 5, 6, 0.2, -1, 0, True, 0.0, 0, False, 5.0,
            slopes, sinks.detach())
    torch.library.opcheck(bwd, args, **utils)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile_fullgraph(backend):
    need(backend)
    q, k, v, cu_q, cu_k, kw = make(*TINY_LENS, H=2, Hkv=1, option="mods")
    for t in (q, k, v, kw["sinks"]):
        t.requires_grad_()

    def f(q, k, v, cu_q, cu_k, sinks):
        out, lse = fastattn.attention_varlen(
            q, k, v, cu_q, cu_k, 5, 6, is_causal=True, causal_alignment="bottom_right",
            softcap=5.0, alibi_slopes=kw["alibi_slopes"], sinks=sinks, return_lse=True,
            backend=backend)
        return out.float().sum() + finite(lse).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v, cu_q, cu_k, kw["sinks"])
    g_got = torch.autograd.grad(got, (q, k, v, kw["sinks"]))
    want = f(q, k, v, cu_q, cu_k, kw["sinks"])
    g_want = torch.autograd.grad(want, (q, k, v, kw["sinks"]))
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b)


def test_auto_picks_cpu_and_cuda_refuses_varlen_score_mods():
    """"auto" runs the CPU kernels on CPU tensors; the CUDA varlen kernels take no dropout and no
    score modifiers, so _supports refuses those calls there (auto then takes Triton)."""
    from fastattn.ops import attention as A

    for dtype in DTYPES:
        for E in (40, 64, 128, 256):
            cuda = torch.device("cuda")
            assert A._varlen_supports("cuda", cuda, (dtype, E, False, False)) is None
            why = A._varlen_supports("cuda", cuda, (dtype, E, False, True))
            assert why is not None and "CUDA" in why
            why = A._varlen_supports("cuda", cuda, (dtype, E, True, False))
            assert why is not None and "CUDA" in why
    assert "attention_varlen" in fastattn.backends()["auto"]
    if availability("cpu", "cpu", "attention_varlen_fwd") is None:
        from fastattn.ops import _backend

        assert _backend.pick("attention_varlen", torch.device("cpu"), "auto",
                             (torch.float32, 40, False, False), A._varlen_supports) == "cpu"
