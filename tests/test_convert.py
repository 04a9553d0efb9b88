"""fastattn.convert on torch Transformer stacks.

Outputs and gradients of ``convert(copy.deepcopy(model))`` are held to the correctness rule (docs/design.md) against the
original model (reference: the original in float64; low precision: the original in the test
dtype); state_dicts load both ways; in eval mode under no_grad, where torch bypasses
nn.MultiheadAttention.forward with its fused fast path, the converted model still runs fastattn.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import pickle

import pytest
import torch
from torch import nn

import fastattn
from fastattn.convert import ConversionReport, ConvertedTransformerEncoderLayer
from tests.helpers import assert_close_rule

D_MODEL, NHEAD, B, S, T = 32, 4, 3, 7, 5


def _make(kind: str, batch_first: bool, norm_first: bool, dtype=torch.float64) -> nn.Module:
    kw = dict(d_model=D_MODEL, nhead=NHEAD, dim_feedforward=48, dropout=0.0,
              batch_first=batch_first, norm_first=norm_first, dtype=dtype)
    if kind == "encoder":
        model = nn.TransformerEncoder(nn.TransformerEncoderLayer(**kw), 2,
                                      norm=nn.LayerNorm(D_MODEL, dtype=dtype),
                                      enable_nested_tensor=not norm_first)
    elif kind == "decoder":
        model = nn.TransformerDecoder(nn.TransformerDecoderLayer(**kw), 2)
    else:
        model = nn.Transformer(num_encoder_layers=2, num_decoder_layers=2, **kw)
    with torch.no_grad():  # non-trivial norm parameters and biases, so that every one matters
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.3)
    return model


def _seq(n, batch_first, dtype=torch.float64):
    return torch.randn((B, n, D_MODEL) if batch_first else (n, B, D_MODEL), dtype=dtype)


def _padding(n):
    pad = torch.zeros(B, n, dtype=torch.bool)  # True = padding (torch's polarity)
    pad[1, -2:] = True
    pad[2, -4:] = True
    return pad


def _causal(n):
    return torch.ones(n, n, dtype=torch.bool).triu(1)  # True = not allowed


def _call_args(kind, batch_first):
    """(positional tensors, mask kwargs) for one forward of the model kind."""
    src, tgt = _seq(S, batch_first), _seq(T, batch_first)
    if kind == "encoder":
        return [src], {"mask": _causal(S), "src_key_padding_mask": _padding(S)}
    if kind == "decoder":
        return [tgt, src], {"tgt_mask": _causal(T), "tgt_key_padding_mask": _padding(T),
                            "memory_key_padding_mask": _padding(S), "tgt_is_causal": True}
    return [src, tgt], {"tgt_mask": _causal(T), "src_key_padding_mask": _padding(S),
                        "tgt_key_padding_mask": _padding(T), "memory_key_padding_mask": _padding(S)}


def _forward_backward(model, tensors, masks, dtype):
    model = model.to(dtype)
    xs = [t.detach().to(dtype).requires_grad_() for t in tensors]
    out = model(*xs, **masks)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out * g.to(dtype)).sum().backward()
    res = {"out": out}
    res.update({f"grad_input{i}": x.grad for i, x in enumerate(xs)})
    res.update({f"grad_{n}": p.grad for n, p in model.named_parameters()})
    return res


CASES = [(k, bf, nf) for k in ("encoder", "decoder", "transformer")
         for bf in (True, False) for nf in (False, True)]


@pytest.mark.parametrize("kind,batch_first,norm_first", CASES)
def test_stack_matches_original(kind, batch_first, norm_first):
    model = _make(kind, batch_first, norm_first)
    tensors, masks = _call_args(kind, batch_first)
    ref = _forward_backward(copy.deepcopy(model), tensors, masks, torch.float64)
    low = _forward_backward(copy.deepcopy(model), tensors, masks, torch.float32)
    converted = fastattn.convert(copy.deepcopy(model).float())
    n_mha = sum(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    assert converted.fastattn_report.replaced[
        "nn.MultiheadAttention -> fastattn.nn.MultiheadAttention"].__len__() == n_mha
    ours = _forward_backward(converted, tensors, masks, torch.float32)
    assert ours.keys() == ref.keys()
    for name in ref:
        assert_close_rule(ours[name], ref[name], low[name], name=name,
                          factor=3.0 if name.startswith("grad") else 2.0)


def test_stack_bfloat16():
    model = _make("encoder", True, False)
    tensors, masks = _call_args("encoder", True)
    ref = _forward_backward(copy.deepcopy(model), tensors, masks, torch.float64)
    low = _forward_backward(copy.deepcopy(model), tensors, masks, torch.bfloat16)
    ours = _forward_backward(fastattn.convert(copy.deepcopy(model).bfloat16()), tensors, masks,
                             torch.bfloat16)
    for name in ("out", "grad_input0", "grad_layers.0.self_attn.in_proj_weight"):
        assert_close_rule(ours[name], ref[name], low[name], name=name,
                          factor=3.0 if name.startswith("grad") else 2.0)


@pytest.mark.parametrize("kind", ["encoder", "transformer"])
def test_state_dict_round_trip(kind):
    original = _make(kind, True, False, dtype=torch.float32).eval()
    converted = fastattn.convert(copy.deepcopy(original))
    assert list(converted.state_dict()) == list(original.state_dict())
    tensors, masks = _call_args(kind, True)
    tensors = [t.float() for t in tensors]
    # fresh modules of both kinds, each loaded from the other
    fresh_converted = fastattn.convert(_make(kind, True, False, dtype=torch.float32)).eval()
    fresh_converted.load_state_dict(original.state_dict())
    fresh_original = _make(kind, True, False, dtype=torch.float32).eval()
    fresh_original.load_state_dict(converted.state_dict())
    with torch.no_grad():
        a = original(*tensors, **masks)
        torch.testing.assert_close(fresh_converted(*tensors, **masks), a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fresh_original(*tensors, **masks), a, rtol=1e-5, atol=1e-5)


def _count_calls(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_inference_fast_path_is_defeated(monkeypatch):
    """Eval + no_grad + batch_first + padding: torch runs its nested-tensor, fused-layer fast
    path; the converted encoder runs every layer's fastattn attention instead."""
    original = _make("encoder", True, False, dtype=torch.float32).eval()
    converted = fastattn.convert(copy.deepcopy(original))
    assert all(type(layer) is ConvertedTransformerEncoderLayer for layer in converted.layers)
    assert converted.use_nested_tensor is False
    x, pad = _seq(S, True, torch.float32), _padding(S)
    fused = _count_calls(monkeypatch, torch, "_transformer_encoder_layer_fwd")
    ours = _count_calls(monkeypatch, fastattn, "scaled_dot_product_attention")
    with torch.no_grad():
        a = original(x, src_key_padding_mask=pad)
        assert len(fused) == 2 and not ours  # the fast path is taken by torch's module
        b = converted(x, src_key_padding_mask=pad)
    assert len(fused) == 2 and len(ours) == 2
    # torch's nested path writes 0 at padded query positions; compare the real tokens
    torch.testing.assert_close(b[~pad], a[~pad], rtol=1e-5, atol=1e-5)


def _fast_attention_backend() -> str:
    """A backend that runs a fastattn attention kernel on CPU tensors here, or skip."""
    from fastattn.ops._backend import availability

    if availability("cpu", "cpu", "attention_fwd") is None:
        return "cpu"
    if (availability("triton", "cpu") is None
            and importlib.util.find_spec("fastattn.triton.attention") is not None):
        return "triton"
    pytest.skip("no fastattn attention kernel for CPU tensors in this build (not merged yet)")


@pytest.mark.parametrize("kind", ["encoder", "transformer"])
def test_profiler_shows_fastattn_kernels(kind):
    backend = _fast_attention_backend()
    model = fastattn.convert(_make(kind, True, False, dtype=torch.float32)).eval()
    mhas = [m for m in model.modules() if isinstance(m, fastattn.nn.MultiheadAttention)]
    for m in mhas:
        m.backend = backend
    tensors, masks = _call_args(kind, True)
    tensors = [t.float() for t in tensors]
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(*tensors, **masks)
    counts = {e.key: e.count for e in prof.key_averages() if e.key.startswith("fastattn::")}
    op = "fastattn::attention_fwd" if backend == "cpu" else "fastattn::triton_attention_fwd"
    assert counts.get(op) == len(mhas), counts


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_fuses_residual_adds_into_the_norms(norm_first):
    """Each residual add of a converted encoder layer runs inside the LayerNorm kernel (no eager
    add is left) and the ReLU is in place; with a hook on the norm, the layer falls back to the
    eager add so that the hook sees the norm's real input. Outputs equal in all cases."""
    _fast_attention_backend()
    model = fastattn.convert(_make("encoder", True, norm_first, dtype=torch.float32)).eval()
    x = _seq(S, True, torch.float32)

    def ops():
        with torch.no_grad(), torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = model(x)
        return out, {e.key: e.count for e in prof.key_averages()}

    fused, counts = ops()
    # pre-norm keeps the add after the feed-forward block (nothing normalises it in the layer)
    assert counts.get("aten::add", 0) == (2 if norm_first else 0), counts
    assert counts.get("aten::relu_") == 2 and "aten::relu" not in counts, counts
    seen = []
    norm = model.layers[0].norm2
    handle = norm.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        unfused, counts = ops()
    finally:
        handle.remove()
    assert counts.get("aten::add", 0) == (3 if norm_first else 1), counts
    assert len(seen) == 1 and seen[0].shape == x.shape
    torch.testing.assert_close(fused, unfused, rtol=0, atol=0)


def test_report_filter_and_log(caplog):
    model = _make("encoder", True, False, dtype=torch.float32)
    skip = "layers.1.self_attn"
    with caplog.at_level(logging.INFO, logger="fastattn"):
        converted = fastattn.convert(model, filter_fn=lambda m, fqn: fqn != skip)
    report = converted.fastattn_report
    assert isinstance(report, ConversionReport)
    assert report.replaced["nn.MultiheadAttention -> fastattn.nn.MultiheadAttention"] == [
        "layers.0.self_attn"]
    assert (skip, "filter_fn returned False") in report.kept
    assert type(converted.layers[1].self_attn) is nn.MultiheadAttention
    assert type(converted.layers[0].self_attn) is fastattn.nn.MultiheadAttention
    text = str(report)
    assert "layers.0.self_attn" in text and skip in text
    assert any("fastattn.convert: replaced" in r.getMessage() for r in caplog.records)
    # converting again finds nothing left to replace
    again = fastattn.convert(converted, filter_fn=lambda m, fqn: fqn != skip)
    assert again is converted and again.fastattn_report.num_replaced() == 0


def test_attention_false_and_nothing_to_do():
    model = _make("encoder", True, False, dtype=torch.float32)
    out = fastattn.convert(model, attention=False, layer_norm=False)
    assert out is model and out.fastattn_report.num_replaced() == 0
    assert all(type(layer) is nn.TransformerEncoderLayer for layer in out.layers)


def test_root_and_shared_modules_and_modes():
    mha = nn.MultiheadAttention(D_MODEL, NHEAD, dtype=torch.float64).eval()
    root = fastattn.convert(mha)
    assert type(root) is fastattn.nn.MultiheadAttention and not root.training
    assert root.in_proj_weight.dtype == torch.float64
    assert root.fastattn_report.replaced[
        "nn.MultiheadAttention -> fastattn.nn.MultiheadAttention"] == [""]

    shared = nn.MultiheadAttention(D_MODEL, NHEAD, batch_first=True)
    model = nn.ModuleDict({"a": shared, "b": shared, "c": nn.MultiheadAttention(D_MODEL, NHEAD)})
    model["c"].eval()
    model = fastattn.convert(model)
    assert model["a"] is model["b"] and type(model["a"]) is fastattn.nn.MultiheadAttention
    assert model["a"].training and not model["c"].training
    assert len(model.fastattn_report.replaced[
        "nn.MultiheadAttention -> fastattn.nn.MultiheadAttention"]) == 2


def test_subclasses_are_left_alone():
    class MyAttention(nn.MultiheadAttention):
        pass

    model = nn.Sequential(MyAttention(D_MODEL, NHEAD))
    assert type(fastattn.convert(model)[0]) is MyAttention


def test_converted_model_pickles_and_copies():
    model = fastattn.convert(_make("encoder", True, False, dtype=torch.float32)).eval()
    x = _seq(S, True, torch.float32)
    with torch.no_grad():
        want = model(x)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert type(clone.layers[0]) is ConvertedTransformerEncoderLayer
            torch.testing.assert_close(clone(x), want)


def test_fastattn_convert_is_callable_after_importing_the_module():
    import fastattn.convert as convert_module

    for fn in (fastattn.convert, convert_module):
        out = fn(nn.Sequential(nn.MultiheadAttention(D_MODEL, NHEAD)))
        assert type(out[0]) is fastattn.nn.MultiheadAttention


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        fastattn.convert("not a module")
    with pytest.raises(TypeError, match="filter_fn"):
        fastattn.convert(nn.Linear(2, 2), filter_fn=3)


class LlamaLikeRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm (weight * normalised x)."""

    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n) + 0.5)
        self.variance_epsilon = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(x.dtype)


class GemmaLikeRMSNorm(LlamaLikeRMSNorm):
    """(1 + weight) scaling: replaced by an RMSNorm with offset=1.0, not a plain one."""

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class OtherRMSNorm(LlamaLikeRMSNorm):
    """(2 + weight) scaling: neither a plain nor a Gemma norm, left alone."""

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (xf * (2.0 + self.weight.float())).to(x.dtype)


def test_norms_replaced():
    norm = pytest.importorskip("fastattn.nn.norm", reason="fastattn.nn.norm not merged yet")
    model = nn.Sequential(nn.LayerNorm(16), nn.RMSNorm(16, eps=1e-6), LlamaLikeRMSNorm(16),
                          GemmaLikeRMSNorm(16), OtherRMSNorm(16)).eval()
    x = torch.randn(5, 16)
    with torch.no_grad():
        want = model(x)
    converted = fastattn.convert(copy.deepcopy(model))
    assert isinstance(converted[0], norm.LayerNorm) and isinstance(converted[1], norm.RMSNorm)
    assert isinstance(converted[2], norm.RMSNorm) and converted[2].offset == 0.0
    assert isinstance(converted[3], norm.RMSNorm) and converted[3].offset == 1.0
    assert type(converted[4]) is OtherRMSNorm
    assert converted[2].weight is not None and not converted[0].training
    assert [fqn for fqn, _ in converted.fastattn_report.kept] == ["4"]
    with torch.no_grad():
        torch.testing.assert_close(converted(x), want, rtol=1e-5, atol=1e-5)
    assert list(converted.state_dict()) == list(model.state_dict())


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_transformers_gemma_rms_norms(dtype):
    """GemmaRMSNorm / Gemma2RMSNorm (x_hat * (1 + w) in float32) -> RMSNorm(offset=1.0), the
    same weight tensor, no rewrite; outputs by the correctness rule against float64."""
    gemma = pytest.importorskip("transformers.models.gemma.modeling_gemma")
    gemma2 = pytest.importorskip("transformers.models.gemma2.modeling_gemma2")
    from fastattn.nn.norm import RMSNorm

    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(gemma.GemmaRMSNorm(64, eps=1e-6), gemma2.Gemma2RMSNorm(64)).to(dtype)
    with torch.no_grad():
        for m in model:
            m.weight.copy_(torch.randn(64, generator=g) * 0.2)
    weights = [m.weight for m in model]
    x = torch.randn(3, 5, 64, generator=g).to(dtype)
    with torch.no_grad():
        want = model(x)
        want64 = x.double()
        for m in model:
            want64 = fastattn.reference.rms_norm(want64, 64, m.weight.double(), m.eps, offset=1.0)
    converted = fastattn.convert(copy.deepcopy(model))
    for m, w in zip(converted, weights, strict=True):
        assert type(m) is RMSNorm and m.offset == 1.0 and torch.equal(m.weight, w)
    with torch.no_grad():
        got = converted(x)
    assert_close_rule(got, want64, want)


def test_int8_linears():
    linear_mod = pytest.importorskip("fastattn.nn.linear", reason="fastattn.nn.linear not merged yet")
    emb = nn.Embedding(50, D_MODEL)
    head = nn.Linear(D_MODEL, 50, bias=False)
    head.weight = emb.weight  # tied to the embedding: quantized as a copy
    a, b = nn.Linear(D_MODEL, D_MODEL), nn.Linear(D_MODEL, D_MODEL)
    b.weight = a.weight  # tied between linears: left alone
    model = nn.ModuleDict({"emb": emb, "mha": nn.MultiheadAttention(D_MODEL, NHEAD),
                           "ff": nn.Linear(D_MODEL, 64), "head": head, "a": a, "b": b})
    x = torch.randn(3, D_MODEL)
    with torch.no_grad():
        want = head(x)
    converted = fastattn.convert(model, int8=True)
    assert isinstance(converted["ff"], linear_mod.Int8Linear)
    assert isinstance(converted["head"], linear_mod.Int8Linear)
    assert converted["emb"].weight.dtype == torch.float32  # the lookup keeps its float weight
    assert any(n.startswith("head: weight tied to an nn.Embedding")
               for n in converted.fastattn_report.notes)
    with torch.no_grad():
        torch.testing.assert_close(converted["head"](x), want, atol=0.05, rtol=0.05)
    assert type(converted["mha"].out_proj) is not linear_mod.Int8Linear
    assert type(converted["a"]) is nn.Linear and type(converted["b"]) is nn.Linear
    assert ("a", "weight is tied to another module") in converted.fastattn_report.kept


def test_compile_fullgraph_converted_encoder():
    """torch.compile of a converted encoder, training and inference, without graph breaks in
    fastattn's module code (attention pinned to the reference: the kernels' own compile tests
    live with the ops)."""
    model = fastattn.convert(_make("encoder", True, False, dtype=torch.float32), layer_norm=False)
    for m in model.modules():
        if isinstance(m, fastattn.nn.MultiheadAttention):
            m.backend = "reference"
    x, pad = _seq(S, True, torch.float32).requires_grad_(), _padding(S)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, src_key_padding_mask=pad)
    torch.testing.assert_close(out, model(x, src_key_padding_mask=pad))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, src_key_padding_mask=pad),
                                   model(x, src_key_padding_mask=pad))


def test_compile_fullgraph_with_kernels():
    """Same with the fastattn kernel that ``auto`` picks (skips where none runs here)."""
    backend = _fast_attention_backend()
    model = fastattn.convert(_make("encoder", True, False, dtype=torch.float32)).eval()
    for m in model.modules():
        if isinstance(m, fastattn.nn.MultiheadAttention):
            m.backend = backend
    x, pad = _seq(S, True, torch.float32), _padding(S)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, src_key_padding_mask=pad),
                                   model(x, src_key_padding_mask=pad), rtol=1e-5, atol=1e-5)
