"""fastattn.nn.LayerNorm / RMSNorm: drop-in for torch.nn.LayerNorm / RMSNorm (constructor,
parameters, state_dict both ways, outputs), from_module, the fused residual."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastattn
from fastattn import reference
from fastattn.nn import LayerNorm, RMSNorm
from tests.helpers import BACKENDS_UNDER_TEST, assert_close_rule, skip_unless_backend

LN_CONFIGS = [dict(), dict(eps=1e-6), dict(elementwise_affine=False), dict(bias=False),
              dict(dtype=torch.bfloat16)]
RMS_CONFIGS = [dict(), dict(eps=1e-6), dict(elementwise_affine=False), dict(dtype=torch.bfloat16)]


def _same_params(a: nn.Module, b: nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].shape == pb[k].shape and pa[k].dtype == pb[k].dtype, k
        assert pa[k].device == pb[k].device, k
        assert torch.equal(pa[k], pb[k]), k
    assert a.state_dict().keys() == b.state_dict().keys()


def _randomize(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p.float()) * 0.5 + 1)
    return m


@pytest.mark.parametrize("kw", LN_CONFIGS, ids=str)
def test_layer_norm_constructor_matches_torch(kw):
    for shape in (64, (4, 16)):
        ours, theirs = LayerNorm(shape, **kw), nn.LayerNorm(shape, **kw)
        _same_params(ours, theirs)  # reset_parameters: ones / zeros, as torch
        assert (ours.normalized_shape, ours.eps, ours.elementwise_affine) == (
            theirs.normalized_shape, theirs.eps, theirs.elementwise_affine)
        assert isinstance(ours, nn.LayerNorm)


@pytest.mark.parametrize("kw", RMS_CONFIGS, ids=str)
def test_rms_norm_constructor_matches_torch(kw):
    ours, theirs = RMSNorm((4, 16), **kw), nn.RMSNorm((4, 16), **kw)
    _same_params(ours, theirs)
    assert (ours.normalized_shape, ours.eps) == (theirs.normalized_shape, theirs.eps)
    assert isinstance(ours, nn.RMSNorm)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_state_dict_both_ways_and_same_output(kind, backend):
    skip_unless_backend(backend)
    ours_cls, torch_cls = (LayerNorm, nn.LayerNorm) if kind == "layer_norm" else (RMSNorm,
                                                                                   nn.RMSNorm)
    kw = dict(eps=1e-5)
    theirs = _randomize(torch_cls(48, **kw))
    ours = ours_cls(48, **kw, backend=backend)
    ours.load_state_dict(theirs.state_dict())  # torch -> ours, strict
    back = torch_cls(48, **kw)
    back.load_state_dict(_randomize(ours_cls(48, **kw)).state_dict())  # ours -> torch, strict
    x = torch.randn(2, 5, 48)
    out = ours(x)
    # the same module in float64 is the reference; torch's own module in float32 the baseline
    ref = copy.deepcopy(theirs).double()(x.double())
    assert_close_rule(out, ref, theirs(x))
    ref_fn = reference.layer_norm if kind == "layer_norm" else reference.rms_norm
    args = (theirs.weight.double(),) + ((theirs.bias.double(),) if kind == "layer_norm" else ())
    assert_close_rule(out, ref_fn(x.double(), 48, *args, 1e-5), theirs(x))


@pytest.mark.parametrize("backend", ("reference", "cpu"))
def test_backward_reaches_parameters(backend):
    skip_unless_backend(backend)
    ours = _randomize(LayerNorm(32, backend=backend))
    theirs = copy.deepcopy(ours)
    theirs.__class__ = nn.LayerNorm
    x = torch.randn(3, 32)
    dy = torch.randn(3, 32)
    ours(x).backward(dy)
    theirs(x).backward(dy)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(ours, name).grad, getattr(theirs, name).grad)


def test_residual_kwarg():
    skip_unless_backend("cpu")
    m = _randomize(RMSNorm(40, eps=1e-6, backend="cpu"))
    x, r = torch.randn(2, 3, 40), torch.randn(2, 3, 40)
    out, s = m(x, residual=r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(out, m(x + r))
    torch.testing.assert_close(out, fastattn.rms_norm(x + r, 40, m.weight, 1e-6), rtol=0, atol=0)


def test_offset_and_residual_in_fp32():
    """offset=1.0: x_hat * (1 + weight) (Gemma); residual_in_fp32: forward returns the running
    residual in float32, also for the first block (no residual yet)."""
    skip_unless_backend("cpu")
    m = RMSNorm(40, eps=1e-6, offset=1.0, residual_in_fp32=True, backend="cpu").to(torch.bfloat16)
    with torch.no_grad():
        m.weight.normal_(0, 0.1)
    assert "offset=1.0" in repr(m) and "residual_in_fp32=True" in repr(m)
    x = torch.randn(2, 3, 40).to(torch.bfloat16)
    out, res = m(x)
    assert res.dtype == torch.float32 and torch.equal(res, x.float())
    want = fastattn.reference.rms_norm(x.double(), 40, m.weight.double(), 1e-6, offset=1.0)
    assert (out.double() - want).abs().max().item() < 0.05
    out2, res2 = m(x, residual=res)
    assert res2.dtype == torch.float32 and torch.equal(res2, x.float() + res)
    ln = LayerNorm(40, residual_in_fp32=True, backend="cpu").to(torch.float16)
    o, r = ln(x.half())
    assert o.dtype == torch.float16 and r.dtype == torch.float32
    assert LayerNorm.from_module(torch.nn.LayerNorm(8)).offset == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_module_shares_state(dtype):
    for theirs, cls in ((_randomize(nn.LayerNorm(24, eps=1e-4, dtype=dtype)), LayerNorm),
                        (_randomize(nn.RMSNorm(24, eps=1e-4, dtype=dtype)), RMSNorm)):
        theirs.eval()
        ours = cls.from_module(theirs, backend="reference")
        assert type(ours) is cls and ours.backend == "reference"
        assert ours.weight is theirs.weight and ours.weight.dtype == dtype  # shared, not copied
        assert not ours.training and ours.eps == theirs.eps
        x = torch.randn(4, 24, dtype=dtype)
        torch.testing.assert_close(ours(x), theirs(x), atol=2e-2 if dtype != torch.float32
                                   else 1e-5, rtol=0)
        # registering on the new module leaves the old one alone
        ours.register_buffer("extra", torch.zeros(1))
        assert "extra" not in theirs.state_dict()


def test_from_module_rejects_other_modules():
    with pytest.raises(TypeError, match="torch.nn.LayerNorm"):
        LayerNorm.from_module(nn.RMSNorm(4))
    with pytest.raises(TypeError, match="torch.nn.RMSNorm"):
        RMSNorm.from_module(nn.Linear(4, 4))


def test_repr_and_no_affine():
    m = LayerNorm(8, elementwise_affine=False, backend="reference")
    assert "backend='reference'" in repr(m) and m.weight is None and m.bias is None
    x = torch.randn(2, 8)
    torch.testing.assert_close(m(x), nn.functional.layer_norm(x, (8,)))
