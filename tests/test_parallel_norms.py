"""Parallel-residual blocks after fastattn.convert: the attention's and the MLP's LayerNorms of
the same input computed by one kernel call (weight1 / bias1), the second norm handed its output
(fastattn/integrations/parallel.py). Tiny random GPT-NeoX and Falcon models."""

import copy
import pickle

import pytest
import torch
from helpers import assert_close_rule, skip_unless_backend

import fastattn

transformers = pytest.importorskip("transformers")


def _model(family: str, dtype=torch.float32, parallel: bool = True):
    torch.manual_seed(0)
    if family == "gpt_neox":
        config = transformers.GPTNeoXConfig(
            vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, use_parallel_residual=parallel, attn_implementation="eager")
        cls = transformers.GPTNeoXForCausalLM
    else:
        config = transformers.FalconConfig(
            vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_kv_heads=2, new_decoder_architecture=True, attn_implementation="eager")
        cls = transformers.FalconForCausalLM
    model = cls(config).eval()
    with torch.no_grad():  # the two norms of a block made different
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model.to(dtype)


def _ids():
    return torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["gpt_neox", "falcon"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_kernel_call_per_block_and_logits_by_the_rule(family, dtype, monkeypatch):
    skip_unless_backend("cpu")
    low = _model(family, dtype)
    ref = copy.deepcopy(low).double()
    ours = fastattn.convert(copy.deepcopy(low))
    assert sum("two LayerNorms" in k for k in ours.fastattn_report.replaced) == 1
    calls = []
    import fastattn.nn.norm as norm_mod

    real = norm_mod.layer_norm
    monkeypatch.setattr(norm_mod, "layer_norm",
                        lambda *a, **k: calls.append(k.get("weight1") is not None)
                        or real(*a, **k))
    ids = _ids()
    with torch.no_grad():
        got = ours(ids).logits
    # per block one call with weight1, none for the second norm; then the final norm
    assert calls == [True, True, False], calls
    with torch.no_grad():
        assert_close_rule(got, ref(ids).logits, low(ids).logits, name=f"{family} {dtype}")


def test_gradients_copies_and_sequential_blocks():
    """Gradients reach both norms' parameters through the fused call (by the rule against
    float64); deepcopy and pickle keep the link; GPT-NeoX without the parallel residual is not
    linked."""
    skip_unless_backend("cpu")
    low = _model("gpt_neox")
    ours = fastattn.convert(copy.deepcopy(low))
    ref = copy.deepcopy(low).double()
    ids = _ids()
    for m in (ours, ref, low):
        m(ids).logits.float().square().mean().backward()
    names = [n for n, _ in low.named_parameters() if "layernorm" in n]
    assert names
    for n in names:
        g = dict(ours.named_parameters())[n].grad
        assert_close_rule(g, dict(ref.named_parameters())[n].grad,
                          dict(low.named_parameters())[n].grad, factor=3.0, name=n)
    with torch.no_grad():
        want = ours(ids).logits
        for other in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
            layer = other.gpt_neox.layers[0]
            assert layer.input_layernorm.__dict__["_fastattn_partner"] is \
                layer.post_attention_layernorm
            assert torch.equal(other(ids).logits, want)
    plain = fastattn.convert(_model("gpt_neox", parallel=False))
    assert not any("two LayerNorms" in k for k in plain.fastattn_report.replaced)
