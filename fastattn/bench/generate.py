"""End-to-end decoding benchmark: generating tokens, prefill included, timed with the host clock.

* ``hf_llama``: a Llama-style ``transformers`` model (random weights, GQA) generating greedily
  from a left-padded batch: ``fastattn.convert`` of a copy (attn_implementation "fastattn": the
  decoding steps run ``attention_with_kvcache`` with ``cache_leftpad``; RMSNorm on fastattn)
  against the model with transformers' ``sdpa`` attention.
* ``nn_decoder``: an ``nn.TransformerDecoder`` stack decoding token by token against an encoder
  memory. ``fastattn.convert`` + ``fastattn.nn.KVCache`` (prefill once, then one token per call)
  against what torch offers for this module, which has no cache: the decoder re-run over the
  whole prefix with a causal mask for every new token. Fed the same embeddings (no sampling), so
  both do the same decoding work per step, except that torch recomputes the prefix.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastattn.bench.cases import DTYPES, Case, Impl, RunConfig, resolve

OP = "generate"
FUNCTIONS = ("convert", "attention_with_kvcache")
DEFAULT_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("bf16",)}


def _configs(cfg: RunConfig) -> list[dict]:
    if cfg.smoke:
        return [dict(model="hf_llama", layers=1, d=64, heads=4, kv_heads=2, B=2, L=16, new=3),
                dict(model="nn_decoder", layers=1, d=64, heads=4, kv_heads=4, B=2, L=8, new=3)]
    big = not cfg.quick or cfg.cuda
    return [
        dict(model="hf_llama", layers=4, d=512, heads=8, kv_heads=2, B=4, L=1024 if big else 512,
             new=32),
        dict(model="nn_decoder", layers=6, d=512, heads=8, kv_heads=8, B=4, L=128 if big else 64,
             new=32),
    ]


def _hf_llama(conf: dict, dtype: torch.dtype, dev: str):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=conf["d"], num_hidden_layers=conf["layers"],
        num_attention_heads=conf["heads"], num_key_value_heads=conf["kv_heads"],
        intermediate_size=conf["d"] * 11 // 4, max_position_embeddings=4096,
        attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).to(dev, dtype).eval()
    B, L = conf["B"], conf["L"]
    ids = torch.randint(3, 1000, (B, L), generator=torch.Generator().manual_seed(1)).to(dev)
    mask = torch.ones(B, L, dtype=torch.long, device=dev)
    for b in range(1, B):  # prompts of different lengths, left-padded as generate() wants them
        mask[b, : b * L // (2 * B)] = 0
    ids = ids.masked_fill(mask == 0, 0)
    gen = dict(max_new_tokens=conf["new"], min_new_tokens=conf["new"], do_sample=False,
               pad_token_id=0)

    def run(m):
        def call():
            with torch.no_grad():
                return m.generate(input_ids=ids, attention_mask=mask, **gen)

        return call

    return model, run


def _nn_decoder(conf: dict, dtype: torch.dtype, dev: str):
    torch.manual_seed(0)
    d, B, L, new = conf["d"], conf["B"], conf["L"], conf["new"]
    layer = nn.TransformerDecoderLayer(d, conf["heads"], 4 * d, dropout=0.0, batch_first=True)
    model = nn.TransformerDecoder(layer, conf["layers"]).to(dev, dtype).eval()
    tgt = torch.randn(B, L + new, d, dtype=dtype, device=dev)
    memory = torch.randn(B, 2 * L, d, dtype=dtype, device=dev)

    def full_prefix(m):
        def call():
            with torch.no_grad():
                out = m(tgt[:, :L], memory, tgt_is_causal=True,
                        tgt_mask=nn.Transformer.generate_square_subsequent_mask(
                            L, device=dev, dtype=dtype))
                for t in range(L, L + new):
                    mask = nn.Transformer.generate_square_subsequent_mask(t + 1, device=dev,
                                                                          dtype=dtype)
                    out = m(tgt[:, : t + 1], memory, tgt_mask=mask, tgt_is_causal=True)[:, -1:]
                return out

        return call

    def cached(m):
        from fastattn.nn import KVCache

        def call():
            with torch.no_grad(), KVCache(m, capacity=L + new):
                out = m(tgt[:, :L], memory, tgt_is_causal=True)
                for t in range(L, L + new):
                    out = m(tgt[:, t: t + 1], memory)
                return out

        return call

    return model, full_prefix, cached


def _builder(cfg: RunConfig, conf: dict, dtype: torch.dtype):
    dev = cfg.device

    def build() -> list[Impl]:
        convert, why = resolve("convert")
        if conf["model"] == "hf_llama":
            try:
                model, run = _hf_llama(conf, dtype, dev)
            except ImportError as e:
                return [Impl("fastattn.convert", "fastattn", unavailable=f"transformers: {e}"),
                        Impl("transformers sdpa", "baseline",
                             unavailable=f"transformers: {e}")]
            fast = (Impl("fastattn.convert", "fastattn", unavailable=why) if convert is None else
                    Impl("fastattn.convert", "fastattn",
                         prepare=lambda: run(convert(copy.deepcopy(model)))))
            return [fast, Impl("transformers sdpa", "baseline", fn=run(model))]
        model, full_prefix, cached = _nn_decoder(conf, dtype, dev)
        kv, why_kv = resolve("nn.KVCache")
        name = "fastattn.convert + nn.KVCache"
        if convert is None or kv is None:
            fast = Impl(name, "fastattn", unavailable=why or why_kv)
        else:
            fast = Impl(name, "fastattn", prepare=lambda: cached(convert(copy.deepcopy(model))))
        return [fast, Impl("nn.TransformerDecoder (no cache: re-run per token)", "baseline",
                           fn=full_prefix(model))]

    return build


def cases(cfg: RunConfig) -> list[Case]:
    out = []
    for dtype in cfg.dtypes_for(DEFAULT_DTYPES[cfg.device]):
        for conf in _configs(cfg):
            check = ("transformers sdpa" if conf["model"] == "hf_llama"
                     else "nn.TransformerDecoder (no cache: re-run per token)")
            out.append(Case(op=OP, params=dict(conf), dtype=dtype,
                            build=_builder(cfg, conf, DTYPES[dtype]),
                            bound="compute", x="L", series=("model",), timing="wall",
                            check=check))
    return out
