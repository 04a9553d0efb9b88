"""fastattn.nn.MultiheadAttention against torch.nn.MultiheadAttention.

the correctness rule (docs/design.md) per case: the reference is torch's module in float64, the low-precision baseline is
torch's module in the test dtype, fastattn's module runs in the test dtype on the same weights.
Outputs (and returned weights) within 2x torch's own error, gradients (inputs and parameters)
within 3x.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import fastattn
from fastattn.nn import MultiheadAttention
from tests.helpers import assert_close_rule

E, H = 32, 4
B, L, S = 3, 6, 9

OPTIONS = {
    "default": {},
    "kdim_vdim": {"kdim": 12, "vdim": 20},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "no_bias": {"bias": False},
}


def _torch_mha(dtype=torch.float64, **kw) -> nn.MultiheadAttention:
    m = nn.MultiheadAttention(kw.pop("embed_dim", E), kw.pop("num_heads", H), **kw)
    with torch.no_grad():  # non-zero biases so that every parameter matters
        for name, p in m.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.5)
    return m.to(dtype)


def _inputs(kind: str, batch_first: bool, kdim: int = E, vdim: int = E, L=L, S=S):
    shape = (lambda n, d: (B, n, d)) if batch_first else (lambda n, d: (n, B, d))
    q = torch.randn(*shape(L, E), dtype=torch.float64)
    if kind == "self":
        return [q, q, q]
    k = torch.randn(*shape(S, kdim), dtype=torch.float64)
    if kind == "cross_shared":
        return [q, k, k]
    return [q, k, torch.randn(*shape(S, vdim), dtype=torch.float64)]


def _cast(tensors, dtype):
    """Cast to dtype as fresh leaves requiring grad, keeping which arguments are the same tensor."""
    memo = {}
    out = []
    for t in tensors:
        if id(t) not in memo:
            memo[id(t)] = t.detach().to(dtype).requires_grad_()
        out.append(memo[id(t)])
    return out


def _run(module, inputs, dtype, masks=None, seed=1, **kw):
    """Forward + backward of one module on inputs cast to dtype; returns tensors to compare."""
    module = module.to(dtype)
    xs = _cast(inputs, dtype)
    masks = {k: (v.to(dtype) if v is not None and v.is_floating_point() else v)
             for k, v in (masks or {}).items()}
    out, w = module(*xs, **{**masks, **kw})
    gen = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)).sum()
    if w is not None:
        loss = loss + (w * torch.randn(w.shape, generator=gen, dtype=torch.float64).to(dtype)).sum()
    loss.backward()
    res = {"out": out, "weights": w}
    for i, x in enumerate(dict.fromkeys(xs)):
        res[f"grad_input{i}"] = x.grad
    for name, p in module.named_parameters():
        res[f"grad_{name}"] = p.grad
    return res


def _check_against_torch(mha64, inputs, masks=None, dtype=torch.float32, ours_kw=None, **kw):
    ref = _run(copy.deepcopy(mha64), inputs, torch.float64, masks, **kw)
    low = _run(copy.deepcopy(mha64), inputs, dtype, masks, **kw)
    ours = _run(MultiheadAttention.from_module(copy.deepcopy(mha64)), inputs, dtype, masks,
                **{**kw, **(ours_kw or {})})
    assert ours.keys() == ref.keys()
    for name in ref:
        if ref[name] is None:
            assert ours[name] is None, name
            continue
        assert_close_rule(ours[name], ref[name], low[name], name=name,
                          factor=3.0 if name.startswith("grad") else 2.0)


CASES = [(opt, kind) for opt in OPTIONS for kind in ("self", "cross_shared", "cross")
         if not (opt == "kdim_vdim" and kind != "cross")]


@pytest.mark.parametrize("need_weights,average", [(False, True), (True, False)])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("option,kind", CASES)
def test_matches_torch(option, kind, batch_first, need_weights, average):
    kw = OPTIONS[option]
    mha = _torch_mha(batch_first=batch_first, **kw)
    inputs = _inputs(kind, batch_first, kw.get("kdim", E), kw.get("vdim", E))
    s = inputs[1].shape[1 if batch_first else 0]
    kpm = torch.zeros(B, s, dtype=torch.bool)
    kpm[1, -3:] = True
    _check_against_torch(mha, inputs, {"key_padding_mask": kpm}, need_weights=need_weights,
                         average_attn_weights=average)


def _attn_mask(kind: str, L: int, S: int) -> torch.Tensor | None:
    """torch.nn.MultiheadAttention polarity: bool True = NOT allowed; float = added."""
    if kind == "none":
        return None
    shape = (L, S) if kind.endswith("2d") else (B * H, L, S)
    blocked = torch.rand(shape) < 0.3
    blocked[..., 0] = False  # every query keeps at least one key (torch gives NaN otherwise)
    if kind.startswith("bool"):
        return blocked
    return torch.randn(shape, dtype=torch.float64).masked_fill(blocked, float("-inf"))


def _padding_mask(kind: str, S: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, -2:] = True
    pad[2, 1:4] = True
    if kind == "bool":
        return pad
    return torch.zeros(B, S, dtype=torch.float64).masked_fill(pad, float("-inf")) + \
        0.5 * torch.randn(B, S, dtype=torch.float64)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("kpm", ["none", "bool", "float"])
@pytest.mark.parametrize("attn", ["none", "bool2d", "float2d", "bool3d", "float3d"])
def test_masks(attn, kpm, need_weights):
    mha = _torch_mha(batch_first=True)
    inputs = _inputs("cross_shared", True)
    masks = {"attn_mask": _attn_mask(attn, L, S), "key_padding_mask": _padding_mask(kpm, S)}
    _check_against_torch(mha, inputs, masks, need_weights=need_weights)


@pytest.mark.parametrize("option", ["default", "bias_kv", "zero_attn"])
@pytest.mark.parametrize("with_padding", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_is_causal(option, with_padding, need_weights):
    """is_causal=True with the causal mask given (torch's hint) matches torch reading the mask.

    (torch itself is inconsistent with appended keys: its need_weights=False path drops the mask
    for the hint and so hides the bias_k/zero key, its other paths show it; fastattn shows it.)"""
    mha = _torch_mha(batch_first=True, **OPTIONS[option])
    inputs = _inputs("self", True)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    masks = {"attn_mask": causal,
             "key_padding_mask": _padding_mask("bool", L) if with_padding else None}
    _check_against_torch(mha, inputs, masks, need_weights=need_weights,
                         ours_kw={"is_causal": True})


@pytest.mark.parametrize("option", ["default", "bias_kv"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_is_causal_without_mask(option, need_weights):
    """torch requires the mask with is_causal; fastattn takes the flag alone, same result."""
    mha = _torch_mha(batch_first=True, **OPTIONS[option])
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)  # True = not allowed
    _check_against_torch(mha, _inputs("self", True), {"attn_mask": causal},
                         need_weights=need_weights, ours_kw={"attn_mask": None, "is_causal": True})


@pytest.mark.parametrize("need_weights", [False, True])
def test_unbatched(need_weights):
    mha = _torch_mha(batch_first=True)
    q, k = torch.randn(L, E, dtype=torch.float64), torch.randn(S, E, dtype=torch.float64)
    kpm = torch.zeros(S, dtype=torch.bool)
    kpm[-2:] = True
    attn = _attn_mask("bool3d", L, S)[:H]  # (num_heads, L, S) for unbatched input
    _check_against_torch(mha, [q, k, k], {"key_padding_mask": kpm, "attn_mask": attn},
                         need_weights=need_weights)


@pytest.mark.parametrize("embed_dim,num_heads,L,S", [(80, 2, 1, 17), (222, 2, 17, 1), (64, 8, 13, 13)])
def test_odd_shapes(embed_dim, num_heads, L, S):
    """head dims 40, 111 and 8; single-query and single-key rows."""
    mha = _torch_mha(embed_dim=embed_dim, num_heads=num_heads, batch_first=True)
    q = torch.randn(B, L, embed_dim, dtype=torch.float64)
    k = torch.randn(B, S, embed_dim, dtype=torch.float64)
    _check_against_torch(mha, [q, k, k], need_weights=False)


def test_noncontiguous_inputs():
    mha = _torch_mha(batch_first=True)
    big = torch.randn(B, 2 * L, 3 * E, dtype=torch.float64)
    q = big[:, ::2, E:2 * E]  # strided in the sequence and feature dims
    k = torch.randn(E, S, B, dtype=torch.float64).permute(2, 1, 0)
    assert not q.is_contiguous() and not k.is_contiguous()
    _check_against_torch(mha, [q, k, k], need_weights=True)


def test_bfloat16():
    mha = _torch_mha(batch_first=True)
    _check_against_torch(mha, _inputs("self", True),
                         {"key_padding_mask": _padding_mask("bool", L)}, dtype=torch.bfloat16,
                         need_weights=False)


def test_dropout_training():
    """In training the weights returned are the dropped ones that produced the output."""
    mha = MultiheadAttention(E, H, dropout=0.5, batch_first=True).train()
    x = torch.randn(B, L, E)
    torch.manual_seed(3)
    out, w = mha(x, x, x, average_attn_weights=False)
    assert (w == 0).float().mean() > 0.2  # about half of the weights are dropped
    v = torch.nn.functional.linear(x, mha.in_proj_weight[2 * E:], mha.in_proj_bias[2 * E:])
    v = v.view(B, L, H, E // H).transpose(1, 2)  # (B, H, L, D)
    expect = mha.out_proj(torch.matmul(w, v).transpose(1, 2).reshape(B, L, E))
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    # same seed, same draw
    torch.manual_seed(3)
    torch.testing.assert_close(mha(x, x, x, average_attn_weights=False)[0], out)
    torch.manual_seed(4)
    a, _ = mha(x, x, x, need_weights=False)
    mha.eval()
    b, _ = mha(x, x, x, need_weights=False)
    assert not torch.allclose(a, b)


def test_fully_masked_rows_give_zeros():
    """A query that may see no key gets zeros (torch: NaN), in the output and the gradient."""
    mha = MultiheadAttention(E, H, batch_first=True, bias=False)
    x = torch.randn(B, L, E, requires_grad=True)
    blocked = torch.zeros(L, L, dtype=torch.bool)
    blocked[2] = True
    out, w = mha(x, x, x, attn_mask=blocked)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    assert out[:, 2].abs().max() == 0 and w[:, 2].abs().max() == 0
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_calls_fastattn_kernel(monkeypatch):
    calls = []
    real = fastattn.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("is_causal"))
        return real(*args, **kwargs)

    monkeypatch.setattr(fastattn, "scaled_dot_product_attention", spy)
    mha = MultiheadAttention(E, H, batch_first=True).eval()
    x = torch.randn(B, L, E)
    with torch.no_grad():
        mha(x, x, x, need_weights=False)
        mha(x, x, x, need_weights=False, is_causal=True)
        assert calls == [False, True]
        mha(x, x, x)  # need_weights=True (the default): the explicit path, as in torch
    assert calls == [False, True]


def test_from_module_shares_state():
    ref = _torch_mha(dtype=torch.float32, batch_first=True, add_bias_kv=True).eval()
    ours = MultiheadAttention.from_module(ref, backend="reference")
    assert isinstance(ours, nn.MultiheadAttention) and not ours.training
    assert ours.backend == "reference"
    assert ours.in_proj_weight is ref.in_proj_weight and ours.out_proj is ref.out_proj
    assert list(ours.state_dict()) == list(ref.state_dict())
    # constructing and loading both ways
    fresh = MultiheadAttention(E, H, batch_first=True, add_bias_kv=True)
    fresh.load_state_dict(ref.state_dict())
    back = nn.MultiheadAttention(E, H, batch_first=True, add_bias_kv=True)
    back.load_state_dict(fresh.state_dict())
    x = torch.randn(B, L, E)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x, x, x)[0], back.eval()(x, x, x)[0])
    # deepcopy and pickle give independent, working modules
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(clone) is MultiheadAttention and clone.in_proj_weight is not ref.in_proj_weight
        with torch.no_grad():
            torch.testing.assert_close(clone(x, x, x)[0], ours(x, x, x)[0])
    with pytest.raises(TypeError, match="mha"):
        MultiheadAttention.from_module(nn.Linear(2, 2))


def test_bad_input_raises():
    mha = MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(B, L, E)
    with pytest.raises(AssertionError, match="query"):
        mha(torch.randn(B, L, E + 1), x, x)
    with pytest.raises(AssertionError, match="query"):
        mha(torch.randn(B, 2, L, E), x, x)
    with pytest.raises(RuntimeError, match="attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(L, L + 1, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(B, L, L, dtype=torch.bool))
    with pytest.raises(AssertionError, match="attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.int64))
    with pytest.raises(AssertionError, match="key_padding_mask"):
        mha(x, x, x, key_padding_mask=torch.zeros(B, L + 1, dtype=torch.bool))
    with pytest.raises(AssertionError, match="key"):
        mha(x, torch.randn(B, S, E), torch.randn(B, S + 1, E))


@pytest.mark.parametrize("train", [False, True])
def test_compile_fullgraph(train):
    """The module's own code compiles without graph breaks; the op is pinned to the reference so
    that only this module is under test (the kernels' compile tests live with the ops)."""
    mha = MultiheadAttention(E, H, batch_first=True, backend="reference").train(train)
    x = torch.randn(B, L, E, requires_grad=True)
    kpm = _padding_mask("bool", L)
    eager, _ = mha(x, x, x, key_padding_mask=kpm, need_weights=False)
    compiled = torch.compile(mha, fullgraph=True, backend="aot_eager")
    out, _ = compiled(x, x, x, key_padding_mask=kpm, need_weights=False)
    if not train:
        torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_script_is_refused_clearly():
    """TorchScript is deprecated: scripting the drop-in raises a clear error that names the way
    out, not a failure deep inside TorchScript's compiler."""
    m = fastattn.nn.MultiheadAttention(16, 4)
    with pytest.raises(RuntimeError, match="cannot be scripted.*torch.compile"):
        torch.jit.script(m)
