"""LayerNorm / RMSNorm benchmark: ``fastattn.layer_norm`` / ``fastattn.rms_norm`` per fast
backend against ``F.layer_norm`` / ``F.rms_norm``, and the fused residual form against eager
``F.layer_norm(x + r)``; a plain copy of the same rows is timed alongside as the bound. On CUDA
also a sweep of the row length N (256..65536) at a fixed 64M elements, and ``torch.compile`` of
the reference. FlashAttention's fused forms: dropout + residual add + LayerNorm against the same
ops unfused in eager PyTorch, and RMSNorm -> int8 rows (quantize="int8") against the norm then
``fastattn.quantize_per_token``. Memory-bound: GB/s of bytes read + written."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastattn.bench.cases import (
    DTYPES,
    Case,
    Impl,
    RunConfig,
    compile_fn,
    fastattn_impls,
    layer_norm_bytes,
)

OP = "layer_norm"
FUNCTIONS = ("layer_norm", "rms_norm")
DEFAULT_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("bf16", "fp32")}
VARIANTS = ("layer_norm", "layer_norm+residual", "rms_norm", "rms_norm+residual",
            "layer_norm+dropout+residual", "rms_norm+int8")
DROPOUT_P = 0.1
SWEEP_ELEMS = 1 << 26  # 128 MiB of bf16 per tensor: beyond every GPU's L2
# --sweep on CPU: 16 MiB of fp32 per tensor (beyond the L2 of the cores), rows of N elements
CPU_SWEEP_ELEMS = 1 << 22
CPU_SWEEP_NS = (256, 768, 1024, 2048, 4096, 8192)


def _shapes(cfg: RunConfig, dtype: str) -> list[dict]:
    """Each: M, N, variant (+ compile)."""
    if cfg.smoke:
        return [dict(M=64, N=256, variant=v) for v in VARIANTS]
    if cfg.sweep and not cfg.cuda:  # 4M elements per tensor, row length swept
        return [dict(M=CPU_SWEEP_ELEMS // N, N=N, variant=v) for v in VARIANTS
                for N in CPU_SWEEP_NS]
    out = [dict(M=M, N=N, variant=v) for v in VARIANTS for M, N in ((8192, 768), (4096, 4096))]
    if cfg.cuda:
        for s in out:
            # torch.compile: ~5 s per shape; quick runs compile bf16 LayerNorm at 4096 only
            s["compile"] = cfg.compile and (not cfg.quick or (
                dtype == "bf16" and s["variant"].startswith("layer") and s["N"] == 4096))
        if dtype == "bf16":
            Ns = (256, 1024, 4096, 16384, 65536) if cfg.quick else tuple(2**i for i in range(8, 17))
            out += [dict(M=SWEEP_ELEMS // N, N=N, variant="layer_norm sweep") for N in Ns]
    return out


def _builder(cfg: RunConfig, shape: dict, dtype: torch.dtype):
    M, N, variant = shape["M"], shape["N"], shape["variant"]
    dev = cfg.device
    rms = variant.startswith("rms")
    residual = "+residual" in variant
    if variant == "layer_norm+dropout+residual":
        return _dropout_builder(cfg, M, N, dtype)
    if variant == "rms_norm+int8":
        return _int8_builder(cfg, M, N, dtype)

    def build() -> list[Impl]:
        x = torch.randn(M, N, dtype=dtype, device=dev)
        r = torch.randn(M, N, dtype=dtype, device=dev) if residual else None
        w = torch.randn(N, dtype=dtype, device=dev)
        b = None if rms else torch.randn(N, dtype=dtype, device=dev)
        if rms:
            impls = fastattn_impls(
                cfg, "rms_norm", lambda f, be: lambda: f(x, (N,), w, residual=r, backend=be))
        else:
            impls = fastattn_impls(
                cfg, "layer_norm", lambda f, be: lambda: f(x, (N,), w, b, residual=r, backend=be))

        def eager_norm(h):
            return F.rms_norm(h, (N,), w) if rms else F.layer_norm(h, (N,), w, b)

        if residual:
            def eager():
                h = x + r  # materialised, as an unfused residual branch does
                return eager_norm(h), h

            name = "F.rms_norm(x + r)" if rms else "F.layer_norm(x + r)"
        else:
            def eager():
                return eager_norm(x)

            name = "F.rms_norm" if rms else "F.layer_norm"
        impls.append(Impl(name, "baseline", fn=eager))
        if shape.get("compile"):
            def prepare():
                from fastattn import reference

                if rms:
                    compiled = compile_fn(reference.rms_norm)
                    return lambda: compiled(x, (N,), w, residual=r)
                compiled = compile_fn(reference.layer_norm)
                return lambda: compiled(x, (N,), w, b, residual=r)

            impls.append(Impl("torch.compile(reference)", "baseline", prepare=prepare))
        # the bound: one copy per output stream (out, and x + r when fused)
        dst = torch.empty_like(x)
        if residual:
            dst2 = torch.empty_like(x)
            impls.append(Impl("copy (bound)", "bound",
                              fn=lambda: (dst.copy_(x), dst2.copy_(r))))
        else:
            impls.append(Impl("copy (bound)", "bound", fn=lambda: dst.copy_(x)))
        return impls

    return build


def _dropout_builder(cfg: RunConfig, M: int, N: int, dtype: torch.dtype):
    """out, x' = layer_norm(dropout(x) + r), x' (FlashAttention's dropout_add_layer_norm)."""
    dev = cfg.device

    def build() -> list[Impl]:
        x = torch.randn(M, N, dtype=dtype, device=dev)
        r = torch.randn(M, N, dtype=dtype, device=dev)
        w = torch.randn(N, dtype=dtype, device=dev)
        b = torch.randn(N, dtype=dtype, device=dev)
        impls = fastattn_impls(cfg, "layer_norm", lambda f, be: lambda: f(
            x, (N,), w, b, residual=r, dropout_p=DROPOUT_P, backend=be))

        def eager():
            h = F.dropout(x, DROPOUT_P, training=True) + r
            return F.layer_norm(h, (N,), w, b), h

        impls.append(Impl("F.layer_norm(F.dropout(x) + r)", "baseline", fn=eager))
        return impls

    return build


def _int8_builder(cfg: RunConfig, M: int, N: int, dtype: torch.dtype):
    """(q, scale) = quantize_per_token(rms_norm(x)), the input of a W8A8 linear."""
    dev = cfg.device

    def build() -> list[Impl]:
        import fastattn

        x = torch.randn(M, N, dtype=dtype, device=dev)
        w = torch.randn(N, dtype=dtype, device=dev)
        impls = fastattn_impls(cfg, "rms_norm", lambda f, be: lambda: f(
            x, (N,), w, quantize="int8", backend=be))
        impls.append(Impl("quantize_per_token(rms_norm(x))", "baseline",
                          fn=lambda: fastattn.quantize_per_token(fastattn.rms_norm(x, (N,), w))))
        return impls

    return build


def _bytes(M: int, N: int, elem: int, variant: str) -> int:
    if variant == "rms_norm+int8":  # read x, write int8 rows and a float32 scale per row
        return M * N * (elem + 1) + M * 4 + N * elem
    if variant == "layer_norm+dropout+residual":  # + the dropout mask, one byte per element
        return layer_norm_bytes(M, N, elem, residual=True) + M * N
    return layer_norm_bytes(M, N, elem, residual="+residual" in variant,
                            n_params=1 if variant.startswith("rms") else 2)


_CHECKS = {"rms_norm+residual": "F.rms_norm(x + r)", "layer_norm+residual": "F.layer_norm(x + r)",
           "rms_norm": "F.rms_norm", "layer_norm": "F.layer_norm",
           "rms_norm+int8": "quantize_per_token(rms_norm(x))",
           # dropout draws differ between implementations: checked by the tests instead
           "layer_norm+dropout+residual": ()}


def cases(cfg: RunConfig) -> list[Case]:
    out = []
    for dtype in cfg.dtypes_for(DEFAULT_DTYPES[cfg.device]):
        elem = DTYPES[dtype].itemsize
        for shape in _shapes(cfg, dtype):
            M, N, variant = shape["M"], shape["N"], shape["variant"]
            params = {k: v for k, v in shape.items() if k != "compile"}
            out.append(Case(
                op=OP, params=params, dtype=dtype, build=_builder(cfg, shape, DTYPES[dtype]),
                bytes=_bytes(M, N, elem, variant.split(" ")[0]),
                bound="memory", x="N", series=("variant",),
                check=_CHECKS[variant.split(" ")[0]]))
    return out
