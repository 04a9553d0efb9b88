"""Decoding linear benchmark: ``fastattn.linear`` per fast backend against ``F.linear`` at a
decoding step's sizes (M = 1 and 4 rows, 16 for the full run) on SmolLM2-135M's projection
shapes (q/k/v fused 576 -> 960, gate/up fused 576 -> 3072, down 1536 -> 576, lm_head 576 ->
49152). The weight is the traffic: each call reads the next of a pool of copies larger than the
last-level cache, as a model's layers do once per token, so the figures are DRAM speeds. A sum of
the same weights is timed alongside as the read bound. Memory-bound: GB/s of weight read."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from fastattn.bench.cases import DTYPES, Case, Impl, RunConfig, fastattn_impls

OP = "linear"
FUNCTIONS = ("linear",)
DEFAULT_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("bf16",)}
SHAPES = ((576, 960), (576, 3072), (1536, 576), (576, 49152))  # (K, N)
POOL_BYTES = 256 << 20  # the weight copies cycled through: past any last-level cache


def _shapes(cfg: RunConfig) -> list[dict]:
    if cfg.smoke:
        return [dict(M=M, K=64, N=48) for M in (1, 4)]
    Ms = (1, 4) if cfg.quick else (1, 4, 16)
    return [dict(M=M, K=K, N=N) for K, N in SHAPES for M in Ms]


def _builder(cfg: RunConfig, shape: dict, dtype: torch.dtype):
    M, K, N = shape["M"], shape["K"], shape["N"]
    dev = cfg.device

    def build() -> list[Impl]:
        copies = 1 if cfg.smoke else max(2, POOL_BYTES // (N * K * dtype.itemsize))
        w = torch.randn(N, K, device=dev).div_(K ** 0.5).to(dtype)
        pool = [w.clone() for _ in range(copies)]  # equal values, distinct memory
        x = torch.randn(M, K, device=dev).to(dtype)

        def cycling(call):
            nxt = itertools.cycle(pool).__next__
            return lambda: call(nxt())

        impls = fastattn_impls(cfg, "linear",
                               lambda f, be: cycling(lambda w: f(x, w, backend=be)))
        impls.append(Impl("F.linear", "baseline", fn=cycling(lambda w: F.linear(x, w))))
        impls.append(Impl("sum of the weight (read bound)", "bound",
                          fn=cycling(lambda w: w.sum(dtype=torch.float32))))
        return impls, lambda: F.linear(x, w)

    return build


def cases(cfg: RunConfig) -> list[Case]:
    out = []
    for dtype in cfg.dtypes_for(DEFAULT_DTYPES[cfg.device]):
        for shape in _shapes(cfg):
            out.append(Case(
                op=OP, params=dict(shape), dtype=dtype, build=_builder(cfg, shape, DTYPES[dtype]),
                bytes=shape["N"] * shape["K"] * DTYPES[dtype].itemsize, bound="memory", x="M",
                series=("K", "N")))
    return out
