"""SiLU-and-mul benchmark: ``fastattn.silu_mul`` per fast backend against the eager PyTorch it
replaces in a Llama-style MLP, ``F.silu(x[..., :I]) * x[..., I:]`` on the fused gate/up output,
at a decoding step's size (M = 1 token) and a prefill chunk's (M = 128), I = 1536 (SmolLM2's
intermediate size), forward alone and forward + backward under autograd. A plain copy of x is
timed alongside as the bound. Memory-bound: GB/s of the minimum bytes read + written."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastattn.bench.cases import DTYPES, Case, Impl, RunConfig, fastattn_impls, silu_mul_bytes

OP = "silu_mul"
FUNCTIONS = ("silu_mul",)
DEFAULT_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("bf16", "fp32")}
INTERMEDIATE = 1536  # I
MODES = ("fwd", "fwd+bwd")


def _shapes(cfg: RunConfig) -> list[dict]:
    Ms = (1, 128) if not cfg.cuda or cfg.quick else (1, 128, 4096)
    if cfg.smoke:
        return [dict(M=M, I=64, mode=m) for M in (1, 8) for m in MODES]
    return [dict(M=M, I=INTERMEDIATE, mode=m) for M in Ms for m in MODES]


def _builder(cfg: RunConfig, shape: dict, dtype: torch.dtype):
    M, n, mode = shape["M"], shape["I"], shape["mode"]
    dev = cfg.device

    def build() -> list[Impl]:
        x = torch.randn(M, 2 * n, dtype=dtype, device=dev) * 3
        if mode == "fwd":
            impls = fastattn_impls(cfg, "silu_mul", lambda f, be: lambda: f(x, backend=be))

            def eager():
                return F.silu(x[..., :n]) * x[..., n:]

            impls.append(Impl("F.silu(gate) * up", "baseline", fn=eager))
            dst = torch.empty_like(x)
            impls.append(Impl("copy (bound)", "bound", fn=lambda: dst.copy_(x)))
            return impls
        xg = x.detach().requires_grad_()
        dy = torch.randn(M, n, dtype=dtype, device=dev)

        def grad_of(fn):
            return lambda: torch.autograd.grad(fn(xg), xg, dy)[0]

        impls = fastattn_impls(cfg, "silu_mul",
                               lambda f, be: grad_of(lambda t: f(t, backend=be)))
        impls.append(Impl("F.silu(gate) * up", "baseline",
                          fn=grad_of(lambda t: F.silu(t[..., :n]) * t[..., n:])))
        return impls

    return build


def cases(cfg: RunConfig) -> list[Case]:
    out = []
    for dtype in cfg.dtypes_for(DEFAULT_DTYPES[cfg.device]):
        elem = DTYPES[dtype].itemsize
        for shape in _shapes(cfg):
            out.append(Case(
                op=OP, params=dict(shape), dtype=dtype, build=_builder(cfg, shape, DTYPES[dtype]),
                bytes=silu_mul_bytes(shape["M"], shape["I"], elem, mode=shape["mode"]),
                bound="memory", x="M", series=("I", "mode"), check="F.silu(gate) * up"))
    return out
