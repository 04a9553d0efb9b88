"""Attention benchmark: ``fastattn.scaled_dot_product_attention`` per fast backend against
``F.scaled_dot_product_attention`` (on CUDA each SDPA backend separately, forced with
``torch.nn.attention.sdpa_kernel``, and ``torch.compile`` of the reference), forward and
forward+backward, causal and not."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastattn.bench.cases import (
    DTYPES,
    Case,
    Impl,
    RunConfig,
    attention_flops,
    compile_fn,
    fastattn_impls,
)

OP = "attention"
FUNCTIONS = ("scaled_dot_product_attention",)
DEFAULT_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("bf16",)}
# the MATH backend and the reference materialise (B, H, L, S) float32 scores (and more for the
# backward); past this they only measure the allocator
MATERIALISE_LIMIT_BYTES = 8 << 30


# --sweep on CPU: sequence lengths of the forward, d = 64, causal and not
SWEEP_LENGTHS = (128, 256, 512, 1024, 2048)


def sdpa_backends() -> list[tuple[str, object]]:
    from torch.nn.attention import SDPBackend

    names = [("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
             ("cudnn", "CUDNN_ATTENTION"), ("math", "MATH")]
    return [(short, getattr(SDPBackend, attr)) for short, attr in names if hasattr(SDPBackend, attr)]


def _shapes(cfg: RunConfig) -> list[dict]:
    """Each: B, H, L, S, d, causal, mode (+ compile: whether to time torch.compile there)."""
    out = []
    if cfg.smoke:
        for causal in (False, True):
            out.append(dict(B=1, H=2, L=64, S=64, d=32, causal=causal, mode="fwd"))
        out.append(dict(B=1, H=2, L=64, S=64, d=32, causal=True, mode="fwd+bwd"))
        return out
    if not cfg.cuda:
        if cfg.sweep:
            return [dict(B=1, H=12, L=L, S=L, d=64, causal=causal, mode="fwd")
                    for causal in (False, True) for L in SWEEP_LENGTHS]
        if cfg.quick:
            for d in (64, 128):
                for causal in (False, True):
                    out.append(dict(B=1, H=12, L=1024, S=1024, d=d, causal=causal, mode="fwd"))
            out.append(dict(B=1, H=12, L=4096, S=4096, d=128, causal=True, mode="fwd"))
            return out
        for L in (1024, 4096):
            for d in (64, 128):
                for causal in (False, True):
                    out.append(dict(B=1, H=12, L=L, S=L, d=d, causal=causal, mode="fwd"))
        for d in (64, 128):
            for causal in (False, True):
                out.append(dict(B=1, H=12, L=1024, S=1024, d=d, causal=causal, mode="fwd+bwd"))
        return out
    # CUDA: 16k tokens per batch (B * L), model width 2048 (H = 2048 / d)
    lengths = (1024, 4096, 16384) if cfg.quick else (1024, 2048, 4096, 8192, 16384)
    for mode in ("fwd", "fwd+bwd"):
        for d in (64, 128):
            for causal in (False, True):
                for L in lengths:
                    # torch.compile costs ~10 s per shape: quick runs compile one shape per mask
                    compile_here = cfg.compile and (
                        not cfg.quick or (L == 4096 and d == 128 and mode == "fwd"))
                    out.append(dict(B=16384 // L, H=2048 // d, L=L, S=L, d=d, causal=causal,
                                    mode=mode, compile=compile_here))
    return out


def _builder(cfg: RunConfig, shape: dict, dtype: torch.dtype):
    B, H, L, S, d = shape["B"], shape["H"], shape["L"], shape["S"], shape["d"]
    causal, mode = shape["causal"], shape["mode"]
    dev = cfg.device
    backward = mode == "fwd+bwd"

    def build() -> list[Impl]:
        q = torch.randn(B, H, L, d, dtype=dtype, device=dev, requires_grad=backward)
        k = torch.randn(B, H, S, d, dtype=dtype, device=dev, requires_grad=backward)
        v = torch.randn(B, H, S, d, dtype=dtype, device=dev, requires_grad=backward)
        grad = torch.randn(B, H, L, d, dtype=dtype, device=dev) if backward else None

        def timed(fwd):
            if not backward:
                return fwd
            # autograd.grad instead of .backward(): no accumulation into .grad between calls
            return lambda: torch.autograd.grad(fwd(), (q, k, v), grad)

        impls = fastattn_impls(
            cfg, "scaled_dot_product_attention",
            lambda f, be: timed(lambda: f(q, k, v, is_causal=causal, backend=be)))
        scores_bytes = B * H * L * S * 4
        if not cfg.cuda:
            impls.append(Impl("torch.sdpa", "baseline", fn=timed(
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))))
            return impls
        from torch.nn.attention import sdpa_kernel

        for short, backend in sdpa_backends():
            name = f"torch.sdpa[{short}]"
            if short == "math" and scores_bytes > MATERIALISE_LIMIT_BYTES:
                impls.append(Impl(name, "baseline", unavailable=(
                    f"skipped: materialises {scores_bytes / 2**30:.0f} GiB of scores")))
                continue

            def run(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            impls.append(Impl(name, "baseline", fn=timed(run)))
        if shape.get("compile"):
            name = "torch.compile(reference)"
            if scores_bytes > MATERIALISE_LIMIT_BYTES:
                impls.append(Impl(name, "baseline", unavailable=(
                    f"skipped: materialises {scores_bytes / 2**30:.0f} GiB of scores")))
            else:
                def prepare():
                    from fastattn import reference

                    compiled = compile_fn(reference.scaled_dot_product_attention)
                    return timed(lambda: compiled(q, k, v, is_causal=causal))

                impls.append(Impl(name, "baseline", prepare=prepare))
        return impls

    return build


def cases(cfg: RunConfig) -> list[Case]:
    out = []
    for dtype in cfg.dtypes_for(DEFAULT_DTYPES[cfg.device]):
        for shape in _shapes(cfg):
            params = {k: v for k, v in shape.items() if k != "compile"}
            B, H, L, S, d = (shape[k] for k in ("B", "H", "L", "S", "d"))
            out.append(Case(
                op=OP, params=params, dtype=dtype,
                build=_builder(cfg, shape, DTYPES[dtype]),
                flops=attention_flops(B, H, L, S, d, causal=shape["causal"],
                                      mode=shape["mode"]),
                bound="compute", x="L", series=("d", "causal", "mode"),
                # CUDA: math is skipped at long L; flash has the same bf16 rounding class
                check=("torch.sdpa[flash]", "torch.sdpa[efficient]", "torch.sdpa[cudnn]",
                       "torch.sdpa[math]") if cfg.cuda else "torch.sdpa"))
    return out
