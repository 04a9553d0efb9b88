"""fastattn.convert on BERT-style transformers encoders: fused encoder layers.

Small random BERT and RoBERTa configs with padded batches. The fused layers must give the hidden
states of transformers' own layers by the correctness rule (the float64 model as reference, the
original model in the same dtype setting the tolerance), on every row (padding rows included: they
are computed as transformers computes them), keep the state_dict and the modules' parameters,
survive load_state_dict / deepcopy / pickle / .to(dtype), and hand every case they do not cover
back to transformers' forward (gradients, head masks, attention weights).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import fastattn  # noqa: E402
from tests.helpers import assert_close_rule  # noqa: E402

VOCAB = 97


def _model(family: str = "bert", dtype=torch.float32, **over):
    torch.manual_seed(0)
    small = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=96, max_position_embeddings=64, attn_implementation="sdpa")
    small.update(over)
    if family == "bert":
        model = transformers.BertModel(transformers.BertConfig(**small))
    else:
        model = transformers.RobertaModel(transformers.RobertaConfig(pad_token_id=1, **small))
    return model.to(dtype).eval()


def _batch(B=3, L=13):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 9:] = 0  # right padding, as a tokenizer pads
    mask[2, 4:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def _fused_layers(model):
    return [m for m in model.modules() if type(m).__name__.endswith("FastattnLayer")]


def _hidden(model, kw):
    with torch.inference_mode():
        return model(**kw).last_hidden_state


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_states_match_by_the_rule(family, dtype):
    low = _model(family, dtype)
    ref = copy.deepcopy(low).double()
    ours = fastattn.convert(copy.deepcopy(low))
    assert len(_fused_layers(ours)) == 2
    assert sum("fused encoder layer" in k for k in ours.fastattn_report.replaced) == 1
    kw = _batch()
    assert_close_rule(_hidden(ours, kw), _hidden(ref, kw), _hidden(low, kw),
                      name=f"{family} {dtype} hidden states")


def test_fused_layer_runs_the_kernels(monkeypatch):
    """One q/k/v GEMM, the attention kernel on its strided views, the residual adds inside the
    LayerNorm kernel: per layer 4 fastattn.linear calls (q/k/v, attention output, intermediate,
    output), 1 attention call, 2 LayerNorm calls with a residual."""
    calls = {"linear": 0, "sdpa": 0, "norm_residual": 0}
    real_linear, real_sdpa = fastattn.linear, fastattn.scaled_dot_product_attention
    real_norm = fastattn.nn.LayerNorm.forward

    def linear(*a, **k):
        calls["linear"] += 1
        return real_linear(*a, **k)

    def sdpa(q, k, v, **kw):
        calls["sdpa"] += 1
        assert q.dim() == 4 and not q.is_contiguous()  # views of the q/k/v GEMM's output
        return real_sdpa(q, k, v, **kw)

    def norm(self, x, residual=None):
        calls["norm_residual"] += residual is not None
        return real_norm(self, x, residual)

    monkeypatch.setattr(fastattn, "linear", linear)
    monkeypatch.setattr(fastattn, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(fastattn.nn.LayerNorm, "forward", norm)
    ours = fastattn.convert(_model())
    _hidden(ours, _batch())
    assert calls == {"linear": 4 * 2, "sdpa": 2, "norm_residual": 2 * 2}, calls


def test_state_dict_and_parameters_are_kept():
    low = _model()
    ours = fastattn.convert(copy.deepcopy(low))
    sd_low, sd_ours = low.state_dict(), ours.state_dict()
    assert list(sd_low) == list(sd_ours)
    for k in sd_low:
        torch.testing.assert_close(sd_ours[k], sd_low[k], atol=0, rtol=0)
    attn = ours.encoder.layer[0].attention.self
    # the projections' parameters are views of the concatenated q/k/v weight
    assert attn.query.weight.untyped_storage().data_ptr() == \
        attn.value.weight.untyped_storage().data_ptr()
    assert isinstance(attn.query.weight, torch.nn.Parameter)


def test_int8_projections_are_fused():
    """int8=True: the q/k/v Int8Linears become one int8 GEMM; the outputs stay close to fp32."""
    low = _model()
    fused = fastattn.convert(copy.deepcopy(low), int8=True)
    separate = fastattn.convert(copy.deepcopy(low), int8=True, attention=False)
    assert len(_fused_layers(fused)) == 2 and not _fused_layers(separate)
    assert isinstance(fused.encoder.layer[0].attention.self.query, fastattn.nn.Int8Linear)
    kw = _batch()
    a, b = _hidden(fused, kw), _hidden(separate, kw)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    cos = torch.nn.functional.cosine_similarity(a, _hidden(low, kw), dim=-1)
    assert cos.min() > 0.99, cos.min()


def test_gradients_and_uncovered_calls_run_transformers_forward():
    """With gradient recording, a head mask or attention weights asked for, the layer runs
    transformers' own forward: gradients land on the projections' own parameters."""
    low = _model()
    ours = fastattn.convert(copy.deepcopy(low))
    kw = _batch()
    for m in (low, ours):
        m(**kw).last_hidden_state.pow(2).mean().backward()
    for name in ("encoder.layer.0.attention.self.key.weight", "encoder.layer.1.output.dense.weight"):
        torch.testing.assert_close(ours.get_parameter(name).grad, low.get_parameter(name).grad,
                                   atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        out = ours(**kw, output_attentions=True)
        assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 4, 13, 13)
        head_mask = torch.ones(2, 4)
        head_mask[0, 1] = 0
        torch.testing.assert_close(ours(**kw, head_mask=head_mask).last_hidden_state,
                                   low(**kw, head_mask=head_mask).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


def test_load_state_dict_copy_pickle_and_dtype_refuse_stale_weights():
    low, other = _model(), _model()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    kw = _batch()
    want = _hidden(other, kw)
    for assign in (False, True):
        ours = fastattn.convert(copy.deepcopy(low))
        ours.load_state_dict(other.state_dict(), assign=assign)
        torch.testing.assert_close(_hidden(ours, kw), want, atol=2e-5, rtol=2e-5)
    ours = fastattn.convert(copy.deepcopy(low))
    twin = copy.deepcopy(ours)
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    unpickled = pickle.loads(pickle.dumps(ours))
    ours.load_state_dict(other.state_dict())  # the copies keep their own weights
    base = _hidden(low, kw)
    for m in (twin, loaded, unpickled):
        assert len(_fused_layers(m)) == 2
        torch.testing.assert_close(_hidden(m, kw), base, atol=2e-5, rtol=2e-5)
    half = copy.deepcopy(twin).to(torch.bfloat16)
    assert_close_rule(_hidden(half, kw), _hidden(copy.deepcopy(low).double(), kw),
                      _hidden(copy.deepcopy(low).to(torch.bfloat16), kw), name="bf16 after .to")


def test_unsupported_layers_are_reported():
    model = _model(position_embedding_type="relative_key", attn_implementation="eager")
    ours = fastattn.convert(model)
    assert not _fused_layers(ours)
    assert any("relative" in why for _, why in ours.fastattn_report.kept), \
        ours.fastattn_report.kept
    low = _model()
    low.encoder.layer[1].attention.self.key = torch.nn.Linear(64, 64, bias=False)
    ours = fastattn.convert(low)
    assert len(_fused_layers(ours)) == 1
    assert any(fqn == "encoder.layer.1" and "query/key/value" in why
               for fqn, why in ours.fastattn_report.kept)


def test_torch_compile_fullgraph():
    """The fused forward traces without a graph break (fastattn's ops are custom ops)."""
    ours = fastattn.convert(_model())
    kw = _batch()
    with torch.no_grad():
        want = ours(**kw).last_hidden_state
        got = torch.compile(ours, fullgraph=True, backend="eager")(**kw).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
