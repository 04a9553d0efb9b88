"""The package foundation: import without optional parts, backend reporting and choice, and the
reference oracle against PyTorch's own implementations."""

import math
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference
from fastattn.ops import _backend


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


def test_import_without_extension_and_triton():
    # Block fastattn._C and triton at import: the package must import and say why they're missing.
    r = _run_isolated("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "fastattn._C" or name == "triton" or name.startswith("triton."):
                    raise ImportError(f"blocked {name}")
        sys.meta_path.insert(0, Block())
        import torch, fastattn
        b = fastattn.backends()
        assert not b["available"]["cpu"]["cpu"], b
        assert not b["available"]["triton"]["cpu"], b
        assert b["available"]["reference"]["cpu"], b
        assert "fastattn._C is not built" in b["unavailable_reasons"]["cpu/cpu"], b
        q = torch.randn(1, 2, 5, 8)
        import warnings
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out = fastattn.scaled_dot_product_attention(q, q, q)
        assert any("reference" in str(x.message) for x in w), [str(x.message) for x in w]
        try:
            fastattn.scaled_dot_product_attention(q, q, q, backend="cpu")
        except RuntimeError as e:
            assert "backend='cpu'" in str(e), e
        else:
            raise AssertionError("explicit unavailable backend must raise")
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_backends_report_shape():
    b = fastattn.backends()
    assert set(b["available"]) == set(_backend.BACKENDS)
    assert "scaled_dot_product_attention" in b["auto"]
    for op, picks in b["auto"].items():
        for dev, pick in picks.items():
            assert pick in _backend.BACKENDS, (op, dev, pick)
            assert b["available"][pick][dev], (op, dev, pick)


def test_unknown_backend_raises():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="backend"):
        fastattn.scaled_dot_product_attention(q, q, q, backend="fast")


def test_auto_fallback_warns_once_per_reason():
    calls = []

    def never(b):
        calls.append(b)
        return "unsupported for this test"

    _backend._warn_fallback.cache_clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            assert _backend.choose("demo_op", torch.device("cpu"), "auto", never) == "reference"
    assert len([x for x in w if "demo_op" in str(x.message)]) == 1



def test_explicit_backend_unavailable_or_unsupported_raises(monkeypatch):
    pytest.importorskip("triton", reason="needs triton installed")
    from fastattn.triton import _interpret

    # the variable is read once and cached: refresh after each change, and have monkeypatch
    # put the cached value back with the variable
    monkeypatch.setattr(_interpret, "_interpreting", _interpret.interpret())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _interpret.refresh()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _backend.choose("demo_op", torch.device("cpu"), "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _interpret.refresh()
    assert _backend.choose("demo_op", torch.device("cpu"), "triton") == "triton"
    with pytest.raises(RuntimeError, match="cannot run this call: nope"):
        _backend.choose("demo_op", torch.device("cpu"), "triton", lambda b: "nope")


# ---- the reference oracle agrees with PyTorch -------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L,S", [(1, 1), (7, 13), (13, 7)])
def test_reference_attention_matches_sdpa(causal, L, S):
    q = torch.randn(2, 4, L, 24, dtype=torch.float64)
    k = torch.randn(2, 2, S, 24, dtype=torch.float64)
    v = torch.randn(2, 2, S, 16, dtype=torch.float64)
    mask = torch.randn(L, S, dtype=torch.float64)
    out = reference.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=True)
    if causal:  # torch rejects mask + is_causal together: fold the causal rule into the mask
        mask = mask.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    exp = F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)
    torch.testing.assert_close(out, exp)


def test_reference_attention_lse_and_empty_rows():
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 6, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2] = False  # row 2 sees nothing
    out, lse = reference.scaled_dot_product_attention(q, k, k, mask, return_lse=True)
    assert torch.all(out[0, 0, 2] == 0) and lse[0, 0, 2] == -math.inf
    s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    torch.testing.assert_close(lse[0, 0, 0], torch.logsumexp(s[0, 0, 0], -1))
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert torch.isfinite(q.grad).all() and torch.all(q.grad[0, 0, 2] == 0)


def test_reference_window_bottom_right():
    vis = reference.visible_keys(2, 5, is_causal=True, window=(1, -1),
                                 causal_alignment="bottom_right")
    exp = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(vis, exp)


def test_reference_norms_match_torch():
    x = torch.randn(3, 5, 40, dtype=torch.float64)
    w, b = torch.randn(40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    torch.testing.assert_close(reference.layer_norm(x, (40,), w, b), F.layer_norm(x, (40,), w, b))
    torch.testing.assert_close(reference.rms_norm(x, 40, w), F.rms_norm(x, (40,), w))
    r = torch.randn_like(x)
    out, s = reference.layer_norm(x, 40, w, b, residual=r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(out, F.layer_norm(x + r, (40,), w, b))


def test_reference_quantize_contract():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [127.0, 0.5, -1.5]])
    q, s = reference.quantize_per_token(x)
    assert torch.equal(q[0], torch.zeros(3, dtype=torch.int8)) and s[0] == 0
    assert torch.equal(q[1], torch.tensor([64, -127, 32], dtype=torch.int8))  # 63.5 -> 64 (even)
    assert torch.equal(q[2], torch.tensor([127, 0, -2], dtype=torch.int8))  # 0.5, -1.5 half-even
    a = torch.randint(-127, 128, (17, 33), dtype=torch.int8)
    b = torch.randint(-127, 128, (9, 33), dtype=torch.int8)
    acc = reference.int8_gemm(a, b)
    assert acc.dtype == torch.int32
    assert torch.equal(acc, (a.double() @ b.double().t()).to(torch.int32))


def test_reference_silu_mul_contract():
    x = torch.randn(2, 3, 2 * 7, dtype=torch.float64)
    torch.testing.assert_close(reference.silu_mul(x), F.silu(x[..., :7]) * x[..., 7:])
    g = x[..., :7]
    torch.testing.assert_close(reference.silu_mul(x), g * torch.sigmoid(g) * x[..., 7:])
    for bad in (torch.randn(3, 7), torch.randn(3, 0)):
        with pytest.raises(ValueError, match="even"):
            reference.silu_mul(bad)
    assert "silu_mul" in fastattn.backends()["auto"]


# ---------------------------------------------------------------------------------------------
# warnings point at the user's line, whichever entry point led to them
# ---------------------------------------------------------------------------------------------
def _fallback_warnings(fn):
    _backend._warn_fallback.cache_clear()
    _backend._CHOICES.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fn()
    return [x for x in w if "no fast backend supports this call" in str(x.message)]


def test_fallback_warning_points_at_the_caller_of_a_public_function():
    x = torch.randn(4, 16, dtype=torch.float64)  # float64 runs on the reference only
    w = _fallback_warnings(lambda: fastattn.layer_norm(x, (16,)))
    assert len(w) == 1 and w[0].filename == __file__


def test_fallback_warning_points_at_the_call_of_a_module():
    norm = fastattn.nn.RMSNorm(16, dtype=torch.float64)
    x = torch.randn(4, 16, dtype=torch.float64)
    w = _fallback_warnings(lambda: norm(x))
    assert len(w) == 1 and w[0].filename == __file__


def test_fallback_warning_points_at_the_call_of_convert():
    class MyRMSNorm(torch.nn.Module):  # transformers-style: convert checks it on a random input
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(16, dtype=torch.float64))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            var = x.pow(2).mean(-1, keepdim=True)
            return self.weight * x * torch.rsqrt(var + self.variance_epsilon)

    model = torch.nn.Sequential(MyRMSNorm())
    w = _fallback_warnings(lambda: fastattn.convert(model))
    assert len(w) == 1 and w[0].filename == __file__
    assert type(model[0]) is fastattn.nn.RMSNorm
