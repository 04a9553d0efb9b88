"""Mamba, Mamba2 and FalconMamba blocks after fastattn.convert: the residual add of each block
inside the next block's RMSNorm kernel, the residual stream kept in float32 by the kernel
(fastattn/integrations/mamba.py). Tiny random models, run on transformers' PyTorch path."""

import copy
import pickle

import pytest
import torch
from helpers import assert_close_rule, skip_unless_backend

import fastattn

transformers = pytest.importorskip("transformers")

FAMILIES = ["mamba", "mamba2", "falcon_mamba"]


def _model(family: str, dtype=torch.float32, residual_in_fp32: bool = True):
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, state_size=8,
                  residual_in_fp32=residual_in_fp32, use_cache=False)
    if family == "mamba2":
        config = transformers.Mamba2Config(num_heads=8, head_dim=16, n_groups=1, chunk_size=8,
                                           expand=2, **common)
        cls = transformers.Mamba2ForCausalLM
    elif family == "mamba":
        config, cls = transformers.MambaConfig(**common), transformers.MambaForCausalLM
    else:
        config = transformers.FalconMambaConfig(**common)
        cls = transformers.FalconMambaForCausalLM
    model = cls(config).eval()
    with torch.no_grad():  # norms away from their initial ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    return model.to(dtype)


def _ids():
    return torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logits_match_by_the_rule(family, dtype):
    skip_unless_backend("cpu")
    low = _model(family, dtype)
    ref = copy.deepcopy(low).double()
    ours = fastattn.convert(copy.deepcopy(low))
    fused = [m for m in ours.modules() if "FastattnBlock" in type(m).__name__]
    assert len(fused) == 3
    assert sum("fused Mamba block" in k for k in ours.fastattn_report.replaced) == 1
    ids = _ids()
    assert_close_rule(_logits(ours, ids), _logits(ref, ids), _logits(low, ids),
                      name=f"{family} {dtype} logits")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_stream_is_the_sum_transformers_computes(family, monkeypatch):
    """Each block but the last ends with one rms_norm call holding the residual (the next block
    takes its input from it). The block outputs (output_hidden_states) stay float32 in a bf16
    model, and block 0's is bit for bit the sum the same blocks compute unlinked (their own add,
    transformers' way)."""
    skip_unless_backend("cpu")
    from fastattn.integrations import mamba

    low = _model(family, torch.bfloat16)
    ours = fastattn.convert(copy.deepcopy(low))
    unlinked = copy.deepcopy(ours)
    for m in unlinked.modules():
        if mamba._NEXT in m.__dict__:
            m.__dict__[mamba._NEXT] = None
    calls = []
    real = fastattn.rms_norm
    monkeypatch.setattr(fastattn, "rms_norm",
                        lambda *a, **k: calls.append(k.get("residual") is not None)
                        or real(*a, **k))
    ids = _ids()
    with torch.no_grad():
        got = ours(ids, output_hidden_states=True).hidden_states
        assert calls.count(True) == 2, calls
        calls.clear()
        want = unlinked(ids, output_hidden_states=True).hidden_states
        assert True not in calls
        plain = low(ids, output_hidden_states=True).hidden_states
    # (the blocks' outputs, then norm_f's)
    for g, w, p in zip(got[:-1], want[:-1], plain[:-1], strict=True):
        assert g.dtype == w.dtype == p.dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)


def test_mamba2_gated_norm_is_kept():
    """Mamba2's MambaRMSNormGated(x, gate) is not swapped for a plain RMSNorm (which would take
    the gate for a residual)."""
    ours = fastattn.convert(_model("mamba2"))
    gated = [m for m in ours.modules() if type(m).__name__ == "MambaRMSNormGated"]
    assert len(gated) == 3


@pytest.mark.parametrize("family", ["mamba2"])
def test_generate_copies_and_gradients(family):
    """greedy generate() (the cache path) gives transformers' tokens in fp32; deepcopy and pickle
    keep the fusion; with gradient recording the blocks run transformers' forward."""
    skip_unless_backend("cpu")
    low = _model(family, residual_in_fp32=False)
    ours = fastattn.convert(copy.deepcopy(low))
    ids = _ids()
    gen = dict(max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **gen), low.generate(ids, **gen))
    want = _logits(ours, ids)
    for other in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert sum("FastattnBlock" in type(m).__name__ for m in other.modules()) == 3
        assert torch.equal(_logits(other, ids), want)
    out = ours(ids).logits.float().square().mean()
    out.backward()
    grads = [p.grad for n, p in ours.named_parameters() if "norm" in n]
    assert grads and all(g is not None for g in grads)
