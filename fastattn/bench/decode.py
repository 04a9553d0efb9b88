"""Decoding benchmark: one query token against a KV cache of 4k-32k tokens,
``fastattn.attention_with_kvcache`` per fast backend against SDPA on the cache (each SDPA backend
on CUDA). Memory-bound: the figure is GB/s of K and V read, against the measured copy bandwidth.

Rotary cases (param rope="fused"): the decoding step of a Llama layer, q / k_new / v_new views of
one fused qkv projection, the rotary embedding fused into the call (rotary_cos / rotary_sin,
float32 tables (max_pos, d/2)) against transformers' ``apply_rotary_pos_emb`` in PyTorch ops
(``q * cos + rotate_half(q) * sin``, cos/sin gathered once per step as the model does) followed by
the same attention_with_kvcache call without rotary. The figure to read is the ratio of the two,
measured side by side in one run.

Paged cases (param cache="paged"): the same decoding call on a paged cache (block_table, blocks
of 16 or 64 tokens shuffled in a pool shared by the batch, as a continuous-batching server holds
them) against the call on the contiguous cache holding the same tokens
(``fastattn[contiguous]``, backend "auto"). Target: paged >= 0.9x contiguous."""

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
    resolve,
)

OP = "decode"
FUNCTIONS = ("attention_with_kvcache",)
DEFAULT_DTYPES = {"cpu": ("bf16", "fp32"), "cuda": ("bf16",)}


# --sweep on CPU: cached tokens
SWEEP_LENGTHS = (256, 1024, 2048, 4096, 8192, 16384)


def _shapes(cfg: RunConfig) -> list[dict]:
    if cfg.smoke:
        return [dict(B=1, H=4, Hkv=4, S=256, d=32), dict(B=2, H=4, Hkv=2, S=256, d=32)]
    if not cfg.cuda:
        if cfg.sweep:  # Llama-3-8B's attention (GQA 32/8), one sequence
            return [dict(B=1, H=32, Hkv=8, S=S, d=128) for S in SWEEP_LENGTHS]
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
    return out + rotary_cases(cfg) + paged_cases(cfg)


# ---- rotary embedding fused into the call vs applied in PyTorch first ------------------------
def _rotary_shapes(cfg: RunConfig) -> list[dict]:
    if cfg.smoke:
        return [dict(B=1, H=4, Hkv=2, S=256, d=32)]
    # Llama-3-8B attention (32 query heads over 8 KV heads, d = 128); short caches are where the
    # per-call cost of the extra ops shows
    if not cfg.cuda:
        if cfg.sweep:
            return [dict(B=1, H=32, Hkv=8, S=S, d=128) for S in SWEEP_LENGTHS[:5]]
        lengths = (256, 4096) if cfg.quick else (256, 1024, 4096)
        return [dict(B=1, H=32, Hkv=8, S=S, d=128) for S in lengths]
    lengths = (1024, 8192) if cfg.quick else (256, 1024, 8192)
    return [dict(B=B, H=32, Hkv=8, S=S, d=128) for B in (1, 8) for S in lengths]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half (Llama)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb: cos/sin (B, 1, Lq, d) in the model's dtype."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _rotary_builder(cfg: RunConfig, shape: dict, dtype: torch.dtype):
    B, H, Hkv, S, d = (shape[k] for k in ("B", "H", "Hkv", "S", "d"))
    dev = cfg.device

    def build() -> list[Impl]:
        # what a Llama layer has at a decoding step: the fused projection's output viewed as
        # heads, a preallocated cache holding S - 1 tokens, the model's float32 tables
        qkv = torch.randn(B, 1, (H + 2 * Hkv) * d, dtype=dtype, device=dev)
        heads = qkv.view(B, 1, H + 2 * Hkv, d).transpose(1, 2)
        q, k_new, v_new = heads[:, :H], heads[:, H:H + Hkv], heads[:, H + Hkv:]
        k_cache = torch.randn(B, Hkv, S, d, dtype=dtype, device=dev)
        v_cache = torch.randn(B, Hkv, S, d, dtype=dtype, device=dev)
        seqlens = torch.full((B,), S - 1, dtype=torch.int32, device=dev)
        inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=dev).float() / d))
        freqs = torch.outer(torch.arange(8192, device=dev).float(), inv_freq)
        cos, sin = freqs.cos(), freqs.sin()  # (max_pos, d / 2) float32
        # transformers computes these once per step for every layer: not part of the timed call
        emb = torch.cat((freqs, freqs), dim=-1)[seqlens.long()][:, None, None, :]
        cos_h, sin_h = emb.cos().to(dtype), emb.sin().to(dtype)
        impls = fastattn_impls(
            cfg, "attention_with_kvcache",
            lambda f, be: lambda: f(q, k_cache, v_cache, seqlens, k_new, v_new, rotary_cos=cos,
                                    rotary_sin=sin, backend=be))
        func, why = resolve("attention_with_kvcache")
        if func is None:
            impls.append(Impl("torch.rope+fastattn", "baseline", unavailable=why))
            return impls
        def unfused():  # backend "auto": the one a converted model's call takes
            qr, kr = apply_rotary_pos_emb(q, k_new, cos_h, sin_h)
            return func(qr, k_cache, v_cache, seqlens, kr, v_new)

        impls.append(Impl("torch.rope+fastattn", "baseline", fn=unfused))
        return impls

    return build


def rotary_cases(cfg: RunConfig) -> list[Case]:
    out = []
    for dtype in cfg.dtypes_for(DEFAULT_DTYPES[cfg.device]):
        elem = DTYPES[dtype].itemsize
        for shape in _rotary_shapes(cfg):
            B, H, Hkv, S, d = (shape[k] for k in ("B", "H", "Hkv", "S", "d"))
            out.append(Case(
                op=OP, params=dict(shape, rope="fused"), dtype=dtype,
                build=_rotary_builder(cfg, shape, DTYPES[dtype]),
                flops=attention_flops(B, H, 1, S, d),
                bytes=decode_bytes(B, Hkv, S, d, elem),
                bound="memory", x="S", series=("B", "H", "Hkv", "d", "rope"),
                check="torch.rope+fastattn"))
    return out


# ---- paged cache (block_table) vs the contiguous cache at the same lengths ---------------------
def _paged_shapes(cfg: RunConfig) -> list[dict]:
    if cfg.smoke:
        return [dict(B=2, H=4, Hkv=2, S=256, d=32, block_size=16)]
    if cfg.sweep and not cfg.cuda:  # a ratio at a few lengths, not a curve: no sweep lines
        return []
    if not cfg.cuda:  # Llama-3-8B's attention (GQA 32/8), a batch of 4 sequences
        lengths = (1024, 8192) if cfg.quick else (1024, 4096, 16384)
        return [dict(B=4, H=32, Hkv=8, S=S, d=128, block_size=bs)
                for S in lengths for bs in (16, 64)]
    lengths = (4096, 32768) if cfg.quick else (4096, 16384, 32768)
    return [dict(B=B, H=32, Hkv=8, S=S, d=128, block_size=bs)
            for B in (1, 8) for S in lengths for bs in (16, 64)]


def _paged_builder(cfg: RunConfig, shape: dict, dtype: torch.dtype):
    B, H, Hkv, S, d, bs = (shape[k] for k in ("B", "H", "Hkv", "S", "d", "block_size"))
    dev = cfg.device

    def build() -> list[Impl]:
        q = torch.randn(B, H, 1, d, dtype=dtype, device=dev)
        k_cache = torch.randn(B, Hkv, S, d, dtype=dtype, device=dev)
        v_cache = torch.randn(B, Hkv, S, d, dtype=dtype, device=dev)
        seqlens = torch.full((B,), S, dtype=torch.int32, device=dev)
        # the same tokens in shuffled blocks of one pool: (B * S / bs, Hkv, bs, d)
        nb = S // bs
        table = torch.randperm(B * nb, device=dev).reshape(B, nb).to(torch.int32)
        k_pool = torch.empty(B * nb, Hkv, bs, d, dtype=dtype, device=dev)
        v_pool = torch.empty_like(k_pool)
        # (B, Hkv, nb, bs, d) -> (B, nb, Hkv, bs, d): block x of sequence b is pool[table[b, x]]
        slots = table.flatten().long()
        k_pool[slots] = k_cache.view(B, Hkv, nb, bs, d).transpose(1, 2).flatten(0, 1)
        v_pool[slots] = v_cache.view(B, Hkv, nb, bs, d).transpose(1, 2).flatten(0, 1)
        impls = fastattn_impls(
            cfg, "attention_with_kvcache",
            lambda f, be: lambda: f(q, k_pool, v_pool, seqlens, block_table=table, backend=be))
        func, why = resolve("attention_with_kvcache")
        if func is None:
            impls.append(Impl("fastattn[contiguous]", "baseline", unavailable=why))
        else:
            impls.append(Impl("fastattn[contiguous]", "baseline",
                              fn=lambda: func(q, k_cache, v_cache, seqlens)))
        return impls

    return build


def paged_cases(cfg: RunConfig) -> list[Case]:
    out = []
    for dtype in cfg.dtypes_for(DEFAULT_DTYPES[cfg.device]):
        elem = DTYPES[dtype].itemsize
        for shape in _paged_shapes(cfg):
            B, H, Hkv, S, d = (shape[k] for k in ("B", "H", "Hkv", "S", "d"))
            out.append(Case(
                op=OP, params=dict(shape, cache="paged"), dtype=dtype,
                build=_paged_builder(cfg, shape, DTYPES[dtype]),
                flops=attention_flops(B, H, 1, S, d),
                bytes=decode_bytes(B, Hkv, S, d, elem),
                bound="memory", x="S", series=("B", "H", "Hkv", "d", "block_size", "cache"),
                check="fastattn[contiguous]"))
    return out
