"""Decoding benchmark: one query token against a KV cache of 4k-32k tokens,
``fastattn.attention_with_kvcache`` per fast backend against SDPA on the cache (each SDPA backend
on CUDA). Memory-bound: the figure is GB/s of K and V read, against the measured copy bandwidth."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastattn.bench.attention import sdpa_backends
from fastattn.bench.cases import (
    DTYPES,
    Case,
    Impl,
    RunConfig,
    attention_flops,
    decode_bytes,
    fastattn_impls,
)

OP = "decode"
FUNCTIONS = ("attention_with_kvcache",)
DEFAULT_DTYPES = {"cpu": ("bf16", "fp32"), "cuda": ("bf16",)}


def _shapes(cfg: RunConfig) -> list[dict]:
    if cfg.smoke:
        return [dict(B=1, H=4, Hkv=4, S=256, d=32), dict(B=2, H=4, Hkv=2, S=256, d=32)]
    if not cfg.cuda:
        lengths = (4096, 16384) if cfg.quick else (4096, 8192, 16384, 32768)
        return [dict(B=1, H=32, Hkv=32, S=S, d=128) for S in lengths]
    lengths = (4096, 16384, 32768) if cfg.quick else (4096, 8192, 16384, 32768)
    # MHA (Hkv = H) and Llama-style GQA (4 query heads per KV head); batch 1 and 8
    return [dict(B=B, H=32, Hkv=Hkv, S=S, d=128)
            for B in (1, 8) for Hkv in (32, 8) for S in lengths]


def _builder(cfg: RunConfig, shape: dict, dtype: torch.dtype):
    B, H, Hkv, S, d = (shape[k] for k in ("B", "H", "Hkv", "S", "d"))
    dev = cfg.device
    gqa = Hkv != H

    def build() -> list[Impl]:
        q = torch.randn(B, H, 1, d, dtype=dtype, device=dev)
        # capacity == S: every cached token is read, and SDPA gets the very same tensors
        k_cache = torch.randn(B, Hkv, S, d, dtype=dtype, device=dev)
        v_cache = torch.randn(B, Hkv, S, d, dtype=dtype, device=dev)
        seqlens = torch.full((B,), S, dtype=torch.int32, device=dev)
        impls = fastattn_impls(
            cfg, "attention_with_kvcache",
            lambda f, be: lambda: f(q, k_cache, v_cache, seqlens, backend=be))
        if not cfg.cuda:
            impls.append(Impl("torch.sdpa", "baseline", fn=lambda: F.scaled_dot_product_attention(
                q, k_cache, v_cache, enable_gqa=gqa)))
            return impls
        from torch.nn.attention import sdpa_kernel

        for short, backend in sdpa_backends():
            def run(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=gqa)

            impls.append(Impl(f"torch.sdpa[{short}]", "baseline", fn=run))
        return impls

    return build


def cases(cfg: RunConfig) -> list[Case]:
    out = []
    for dtype in cfg.dtypes_for(DEFAULT_DTYPES[cfg.device]):
        elem = DTYPES[dtype].itemsize
        for shape in _shapes(cfg):
            B, H, Hkv, S, d = (shape[k] for k in ("B", "H", "Hkv", "S", "d"))
            out.append(Case(
                op=OP, params=dict(shape), dtype=dtype, build=_builder(cfg, shape, DTYPES[dtype]),
                flops=attention_flops(B, H, 1, S, d),
                bytes=decode_bytes(B, Hkv, S, d, elem),
                bound="memory", x="S", series=("B", "H", "Hkv", "d"),
                check=("torch.sdpa[math]", "torch.sdpa[flash]", "torch.sdpa[efficient]")
                if cfg.cuda else "torch.sdpa"))
    return out
