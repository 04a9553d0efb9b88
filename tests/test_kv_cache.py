"""KV-cache decoding of converted nn.TransformerDecoder stacks (fastattn.nn.KVCache).

Feeding a prompt and then a few tokens at a time through a converted decoder under a cache must
give, for each call, the last positions of the original decoder run over the whole prefix with a
causal mask: the correctness rule (docs/design.md) with the original in float64 as the reference and the original in the
test dtype as the low-precision result. The profiler proves the KV-cache kernel ran.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastattn
from fastattn.nn import KVCache
from tests.helpers import assert_close_rule, skip_unless_backend

E, NHEAD, B, S = 32, 4, 3, 7


def _decoder(batch_first=True, norm_first=False, layers=2):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(E, NHEAD, 48, dropout=0.0, batch_first=batch_first,
                                       norm_first=norm_first, dtype=torch.float64)
    model = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(E, dtype=torch.float64)).eval()
    with torch.no_grad():  # non-trivial biases and norm parameters
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.3)
    return model


def _seq(n, batch_first, dtype=torch.float64, seed=1):
    shape = (B, n, E) if batch_first else (n, B, E)
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _cut(x, a, b, batch_first):
    return x[:, a:b] if batch_first else x[a:b]


def _full(model, tgt, memory, dtype):
    """The original decoder on the whole prefix, causal, in dtype."""
    n = tgt.shape[1] if model.layers[0].self_attn.batch_first else tgt.shape[0]
    mask = nn.Transformer.generate_square_subsequent_mask(n, dtype=dtype)
    m = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        return m(tgt.to(dtype), memory.to(dtype), tgt_mask=mask, tgt_is_causal=True)


# chunks fed one after another: a causal prompt, a 2-token chunk (causal mask given), then
# single tokens, past the initial capacity of 4 (the cache grows)
CHUNKS = [(0, 5), (5, 7), (7, 8), (8, 9), (9, 10)]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_cached_decoding_matches_full_prefix(batch_first, norm_first):
    model = _decoder(batch_first, norm_first)
    ours = fastattn.convert(copy.deepcopy(model).float())
    tgt, memory = _seq(10, batch_first), _seq(S, batch_first, seed=2)
    ref = _full(model, tgt, memory, torch.float64)
    low = _full(model, tgt, memory, torch.float32)
    with torch.no_grad(), KVCache(ours, capacity=4) as cache:
        for a, b in CHUNKS:
            kw = {}
            if b - a > 1:
                kw = ({"tgt_is_causal": True} if a == 0 else
                      {"tgt_mask": nn.Transformer.generate_square_subsequent_mask(b - a)})
            out = ours(_cut(tgt, a, b, batch_first).float(), memory.float(), **kw)
            assert cache.seqlen == b
            assert_close_rule(out, _cut(ref, a, b, batch_first), _cut(low, a, b, batch_first),
                              name=f"positions {a}:{b}")
    assert not any(hasattr(m, "_fastattn_kv") for m in ours.modules())  # detached on exit


def test_bfloat16_and_profiler_shows_the_kvcache_kernel():
    skip_unless_backend("cpu")
    model = _decoder()
    ours = fastattn.convert(copy.deepcopy(model).to(torch.bfloat16))
    tgt, memory = _seq(6, True), _seq(S, True, seed=2)
    ref = _full(model, tgt, memory, torch.float64)
    low = _full(model, tgt, memory, torch.bfloat16)
    with torch.no_grad(), KVCache(ours), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ours(tgt[:, :4].bfloat16(), memory.bfloat16(), tgt_is_causal=True)
        out4 = ours(tgt[:, 4:5].bfloat16(), memory.bfloat16())
        out5 = ours(tgt[:, 5:6].bfloat16(), memory.bfloat16())
    assert_close_rule(out4, ref[:, 4:5], low[:, 4:5])
    assert_close_rule(out5, ref[:, 5:6], low[:, 5:6])
    counts = {e.key: e.count for e in prof.key_averages() if e.key.startswith("fastattn::")}
    # one call per layer and step on the self-attention; the cross-attention runs the
    # attention kernel on the memory keys projected once
    assert counts.get("fastattn::attention_kvcache") == 2 * 3, counts
    assert counts.get("fastattn::attention_fwd") == 2 * 3, counts


def test_memory_projected_once_and_again_when_it_changes(monkeypatch):
    model = _decoder(layers=1)
    ours = fastattn.convert(copy.deepcopy(model).float())
    tgt, memory = _seq(4, True), _seq(S, True, seed=2).float()
    other = _seq(S, True, seed=3).float()
    calls = []
    cls = fastattn.nn.MultiheadAttention
    orig = cls._project

    def spy(self, query, key, value, self_attention, kv_shared):
        calls.append(self_attention)
        return orig(self, query, key, value, self_attention, kv_shared)

    monkeypatch.setattr(cls, "_project", spy)
    with torch.no_grad(), KVCache(ours):
        ours(tgt[:, :2].float(), memory, tgt_is_causal=True)
        ours(tgt[:, 2:3].float(), memory)
        assert calls.count(False) == 1  # cross-attention keys/values projected on the first call
        out_other = ours(tgt[:, 3:4].float(), other)  # a new memory is projected again
        assert calls.count(False) == 2
        memory.mul_(2.0)  # an in-place change of the same tensor too
        ours(tgt[:, 3:4].float(), memory)
        assert calls.count(False) == 3
    # the step against the other memory: positions 0..2 attended to `memory` in their own layers,
    # so compare against a decoder whose cross-attention memory is `other` at the last step only:
    # recompute with the cache over the same sequence of memories in float64
    ref_model = fastattn.convert(copy.deepcopy(model))
    with torch.no_grad(), KVCache(ref_model):
        ref_model(tgt[:, :2], memory.double() / 2, tgt_is_causal=True)
        ref_model(tgt[:, 2:3], memory.double() / 2)
        ref_other = ref_model(tgt[:, 3:4], other.double())
    torch.testing.assert_close(out_other.double(), ref_other, atol=1e-5, rtol=1e-5)


def test_reorder_for_beam_search():
    model = _decoder()
    ours = fastattn.convert(copy.deepcopy(model).float())
    tgt, memory = _seq(6, True), _seq(S, True, seed=2)
    index = torch.tensor([2, 0, 0])
    ref = _full(model, tgt[index], memory[index], torch.float64)
    low = _full(model, tgt[index], memory[index], torch.float32)
    with torch.no_grad(), KVCache(ours) as cache:
        ours(tgt[:, :5].float(), memory.float(), tgt_is_causal=True)
        cache.reorder(index)
        out = ours(tgt[index, 5:6].float(), memory[index].float())
    assert_close_rule(out, ref[:, 5:6], low[:, 5:6])


def test_reset_starts_a_new_sequence():
    model = _decoder(layers=1)
    ours = fastattn.convert(copy.deepcopy(model).float())
    tgt, memory = _seq(3, True), _seq(S, True, seed=2).float()
    with torch.no_grad(), KVCache(ours) as cache:
        first = ours(tgt[:, :3].float(), memory, tgt_is_causal=True)
        cache.reset()
        assert cache.seqlen == 0
        again = ours(tgt[:, :3].float(), memory, tgt_is_causal=True)
    torch.testing.assert_close(again, first, atol=0, rtol=0)


def test_standalone_multihead_attention():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, NHEAD, batch_first=True, dtype=torch.float64).eval()
    ours = fastattn.nn.MultiheadAttention.from_module(copy.deepcopy(mha).float())
    x = _seq(6, True)
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    ref = mha(x, x, x, attn_mask=causal, need_weights=False)[0]
    low = copy.deepcopy(mha).float()(x.float(), x.float(), x.float(), attn_mask=causal,
                                     need_weights=False)[0]
    with torch.no_grad(), KVCache(ours):
        xs = x[:, :4].float()
        ours(xs, xs, xs, is_causal=True, need_weights=False)
        xs = x[:, 4:6].float()
        out = ours(xs, xs, xs, is_causal=True, need_weights=False)[0]
    assert_close_rule(out, ref[:, 4:6], low[:, 4:6])


def test_refusals():
    model = _decoder(layers=1)
    with pytest.raises(TypeError, match="fastattn.convert"):
        KVCache(model)  # not converted
    with pytest.raises(ValueError, match="no nn.TransformerDecoderLayer"):
        KVCache(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="capacity"):
        KVCache(model, capacity=0)
    ours = fastattn.convert(copy.deepcopy(model).float())
    tgt, memory = _seq(3, True).float(), _seq(S, True, seed=2).float()
    pad = torch.zeros(B, 3, dtype=torch.bool)
    with KVCache(ours) as cache:
        with torch.no_grad(), pytest.raises(NotImplementedError, match="key_padding_mask"):
            ours(tgt, memory, tgt_key_padding_mask=pad, tgt_is_causal=True)
        with torch.no_grad(), pytest.raises(NotImplementedError, match="causal mask"):
            ours(tgt, memory, tgt_mask=torch.zeros(3, 3, dtype=torch.bool), tgt_is_causal=False)
        with pytest.raises(RuntimeError, match="inference only"):
            ours(tgt, memory, tgt_is_causal=True)  # gradients enabled and parameters need them
        with torch.no_grad():
            cache.reset()
            ours(tgt, memory, tgt_is_causal=True)
            with pytest.raises(ValueError, match="batch size changed"):
                ours(tgt[:2, :1], memory[:2])
        with pytest.raises(RuntimeError, match="already attached"):
            KVCache(ours).__enter__()
        sa = ours.layers[0].self_attn
        with torch.no_grad(), pytest.raises(NotImplementedError, match="need_weights"):
            sa(tgt, tgt, tgt)
        with torch.no_grad(), pytest.raises(ValueError, match="same tensor"):
            sa(tgt, memory, memory, need_weights=False)
    with pytest.raises(TypeError, match="int64"):
        KVCache(ours).reorder(torch.tensor([0.0]))
