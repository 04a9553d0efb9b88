"""End-to-end benchmark: a BERT-base-sized ``nn.TransformerEncoder`` (12 layers, width 768, 12
heads, feed-forward 3072, batch_first, random weights, eval, no_grad) as is, against
``fastattn.convert`` of a copy (attention + LayerNorm, and with int8 Linear), and on CUDA
``torch.compile`` of the original. Timed with the host clock (synchronised): launch overhead is
part of what a user of the model sees."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastattn.bench.cases import DTYPES, Case, Impl, RunConfig, compile_fn, encoder_flops, resolve

OP = "model"
FUNCTIONS = ("convert",)
DEFAULT_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("bf16", "fp32")}
BERT_BASE = dict(layers=12, d=768, heads=12, ff=3072)


def _configs(cfg: RunConfig) -> list[dict]:
    if cfg.smoke:
        return [dict(layers=2, d=64, heads=4, ff=128, B=2, L=16)]
    if not cfg.cuda:
        sizes = ((8, 128),) if cfg.quick else ((8, 128), (8, 512))
    else:
        sizes = ((32, 512),) if cfg.quick else ((32, 512), (8, 2048))
    return [dict(BERT_BASE, B=B, L=L) for B, L in sizes]


def encoder(layers: int, d: int, heads: int, ff: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def _builder(cfg: RunConfig, conf: dict, dtype: torch.dtype, compile_here: bool):
    dev = cfg.device

    def build() -> list[Impl]:
        torch.manual_seed(0)
        model = encoder(conf["layers"], conf["d"], conf["heads"], conf["ff"]).to(dev, dtype).eval()
        x = torch.randn(conf["B"], conf["L"], conf["d"], dtype=dtype, device=dev)

        def forward(m):
            def run():
                with torch.no_grad():
                    return m(x)

            return run

        convert, why = resolve("convert")
        impls = []
        for name, kwargs in (("fastattn.convert", {}), ("fastattn.convert(int8=True)",
                                                         {"int8": True})):
            if convert is None:
                impls.append(Impl(name, "fastattn", unavailable=why))
                continue
            impls.append(Impl(name, "fastattn", prepare=lambda kwargs=kwargs: forward(
                convert(copy.deepcopy(model), **kwargs).eval())))
        impls.append(Impl("nn.TransformerEncoder", "baseline", fn=forward(model)))
        if compile_here:
            impls.append(Impl("torch.compile(nn.TransformerEncoder)", "baseline",
                              prepare=lambda: forward(compile_fn(model))))
        return impls

    return build


def cases(cfg: RunConfig) -> list[Case]:
    out = []
    for dtype in cfg.dtypes_for(DEFAULT_DTYPES[cfg.device]):
        for conf in _configs(cfg):
            # compiling the 12-layer stack takes ~1 min: quick runs compile the bf16 model only
            compile_here = cfg.cuda and cfg.compile and (not cfg.quick or dtype == "bf16")
            out.append(Case(
                op=OP, params=dict(conf), dtype=dtype,
                build=_builder(cfg, conf, DTYPES[dtype], compile_here),
                flops=encoder_flops(conf["B"], conf["L"], conf["d"], conf["ff"],
                                    conf["layers"]),
                bound="compute", x="L", series=("B",), timing="wall",
                check="nn.TransformerEncoder"))
    return out
