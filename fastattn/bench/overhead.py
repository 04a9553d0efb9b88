"""Per-call overhead benchmark: tiny eager calls, where the Python around a kernel (argument
checks, backend choice, dispatch, autograd recording) is most of the time, fastattn's call against
the matching PyTorch call. Each call is timed under ``torch.no_grad()`` and with autograd
recording (the inputs and weights a model would train requiring grad), on the host clock:

* ``layer_norm`` / ``rms_norm``: (1, 1, 576) float32 rows with weight (and bias), against
  ``F.layer_norm`` / ``F.rms_norm``;
* ``decode``: one query token, B=1, 9 query heads over 3 KV heads, E=64, 200 tokens in a cache of
  256, ``fastattn.attention_with_kvcache`` against SDPA on the filled part of the cache;
* ``int8_weight_only_linear``: M=1, 576 -> 1536, against ``F.linear`` with the float weight;
* ``silu_mul``: one token's fused gate/up output (1, 1, 2 * 1536), against
  ``F.silu(x[..., :I]) * x[..., I:]``.

The figure is each call's median time (rounds of many back-to-back calls after a warm-up) and
fastattn's time over PyTorch's, from the same interleaved run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fastattn.bench.cases import Case, Impl, RunConfig, fastattn_impls

OP = "overhead"
FUNCTIONS = ("layer_norm", "rms_norm", "attention_with_kvcache", "int8_weight_only_linear",
             "silu_mul")
CALLS = ("layer_norm", "rms_norm", "decode", "int8_weight_only_linear", "silu_mul")
GRAD_MODES = ("no_grad", "autograd")
N = 576  # hidden size
H, HKV, E, SEQLEN, CAPACITY = 9, 3, 64, 200, 256  # decoding
N_OUT = 1536  # int8 linear output features; the MLP's intermediate size I for silu_mul
# calls before the first timed one: lazy imports, caches and dispatch tables warm up
WARMUP_CALLS = 200


def _warmed(fn: Callable[[], Any], calls: int) -> Callable[[], Callable[[], Any]]:
    def prepare():
        for _ in range(calls):
            fn()
        return fn

    return prepare


def _in_mode(grad: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    if grad == "autograd":
        return fn

    def no_grad():
        with torch.no_grad():
            return fn()

    return no_grad


def _calls(call: str, dev: str, grad: bool) -> tuple[Callable, Callable]:
    """(fastattn's call made from (func, backend), PyTorch's call) on fresh inputs: the tensors a
    model would train require grad when ``grad``; the KV cache and the int8 weight never do."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, requires_grad=False):
        t = torch.randn(*shape, generator=g).to(dev)
        return t.requires_grad_(grad and requires_grad)

    if call in ("layer_norm", "rms_norm"):
        x = rand(1, 1, N, requires_grad=True)
        w = rand(N, requires_grad=True)
        if call == "rms_norm":
            return (lambda f, be: lambda: f(x, (N,), w, backend=be),
                    lambda: F.rms_norm(x, (N,), w))
        b = rand(N, requires_grad=True)
        return (lambda f, be: lambda: f(x, (N,), w, b, backend=be),
                lambda: F.layer_norm(x, (N,), w, b))
    if call == "decode":
        q = rand(1, H, 1, E, requires_grad=True)
        k_cache, v_cache = rand(1, HKV, CAPACITY, E), rand(1, HKV, CAPACITY, E)
        seqlens = torch.full((1,), SEQLEN, dtype=torch.int32, device=dev)
        return (lambda f, be: lambda: f(q, k_cache, v_cache, seqlens, backend=be),
                lambda: F.scaled_dot_product_attention(
                    q, k_cache[:, :, :SEQLEN], v_cache[:, :, :SEQLEN], enable_gqa=True))
    if call == "silu_mul":
        x = rand(1, 1, 2 * N_OUT, requires_grad=True)  # the gate/up linear's output
        return (lambda f, be: lambda: f(x, backend=be),
                lambda: F.silu(x[..., :N_OUT]) * x[..., N_OUT:])
    x = rand(1, N, requires_grad=True)
    w = torch.randn(N_OUT, N, generator=g).to(dev)
    w_scale = w.abs().amax(dim=1) / 127
    w_int8 = torch.round(w / w_scale[:, None]).clamp(-127, 127).to(torch.int8)
    w_float = (w_int8.float() * w_scale[:, None]).requires_grad_(grad)
    bias = rand(N_OUT, requires_grad=True)
    return (lambda f, be: lambda: f(x, w_int8, w_scale, bias, backend=be),
            lambda: F.linear(x, w_float, bias))


def _builder(cfg: RunConfig, call: str, grad: str):
    function = "attention_with_kvcache" if call == "decode" else call
    baseline = {"layer_norm": "F.layer_norm", "rms_norm": "F.rms_norm",
                "decode": "torch.sdpa", "int8_weight_only_linear": "F.linear",
                "silu_mul": "F.silu(gate) * up"}[call]
    warmup = 2 if cfg.smoke else WARMUP_CALLS

    def build() -> list[Impl]:
        fast, torch_call = _calls(call, cfg.device, grad == "autograd")
        impls = fastattn_impls(cfg, function, lambda f, be: _in_mode(grad, fast(f, be)))
        for impl in impls:
            if impl.fn is not None:
                impl.fn, impl.prepare = None, _warmed(impl.fn, warmup)
        impls.append(Impl(baseline, "baseline",
                          prepare=_warmed(_in_mode(grad, torch_call), warmup)))
        return impls

    return build, baseline


def cases(cfg: RunConfig) -> list[Case]:
    if "fp32" not in cfg.dtypes_for(("fp32",)):
        return []  # the calls are float32 only
    out = []
    for grad in GRAD_MODES:
        for call in CALLS:
            build, baseline = _builder(cfg, call, grad)
            # the host clock on every device: the launch and Python overhead is the point
            out.append(Case(op=OP, params={"call": call, "grad": grad}, dtype="fp32",
                            build=build, timing="wall", ratio="time", check=baseline))
    return out
