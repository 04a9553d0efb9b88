"""int8 benchmarks.

``int8_gemm``: the GEMM core, ``fastattn.int8_gemm(a, b)`` (int8 x int8 -> int32) per fast
backend against ``torch._int_mm`` (and, on CUDA, a bf16 ``torch.matmul`` of the same shape).

``int8_linear``: the W8A8 linear with the per-token quantization of the activations included,
``fastattn.int8_linear`` per fast backend and ``fastattn.nn.Int8Linear.from_float`` against,
on CPU, torch.ao's dynamic-quantized Linear and the float ``F.linear`` (fp32 and bf16); on CUDA,
bf16 ``F.linear`` (= ``torch.matmul(x, w.T)``).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F

from fastattn.bench.cases import DTYPES, Case, Impl, RunConfig, fastattn_impls, gemm_flops, resolve

GEMM_OP = "int8_gemm"
GEMM_FUNCTIONS = ("int8_gemm",)
LINEAR_OP = "int8_linear"
LINEAR_FUNCTIONS = ("int8_linear", "quantize_per_channel", "nn.Int8Linear.from_float")
LINEAR_DEFAULT_DTYPES = {"cpu": ("fp32",), "cuda": ("bf16",)}


# --sweep on CPU: rows of the activation, from decoding (1) to a prefill batch
SWEEP_MS = (1, 4, 16, 64, 256, 1024)


def _shapes(cfg: RunConfig) -> list[dict]:
    """(M, K, N) of x (M, K) @ W (N, K).T."""
    if cfg.smoke:
        return [dict(M=32, K=64, N=96), dict(M=1, K=64, N=96)]
    if not cfg.cuda and cfg.sweep:  # rows swept over one 2048 x 2048 weight
        return [dict(M=M, K=2048, N=2048) for M in SWEEP_MS]
    if not cfg.cuda:
        return [dict(M=512, K=768, N=3072), dict(M=128, K=4096, N=4096), dict(M=1, K=4096, N=4096)]
    Ms = (1, 16, 64, 1024, 4096)
    return [dict(M=M, K=KN, N=KN) for KN in (4096, 8192) for M in Ms]


def _exact_int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b (N, K).T of int8 operands, exactly: float64 holds every partial sum
    (|sum| <= 127^2 * K < 2^53), and unlike int64 it has a matmul on every device."""
    return torch.matmul(a.double(), b.double().t())


def _quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # operands only (untimed): fastattn's quantizer when present, else the reference, whose
    # output is the bit-exact contract of every backend
    func, _ = resolve("quantize_per_channel")
    if func is None:
        from fastattn import reference

        func = reference.quantize_per_channel
    return func(w)


def _gemm_builder(cfg: RunConfig, shape: dict):
    M, K, N = shape["M"], shape["K"], shape["N"]
    dev = cfg.device

    def build() -> list[Impl]:
        a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=dev)
        b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev)
        impls = fastattn_impls(cfg, "int8_gemm", lambda f, be: lambda: f(a, b, backend=be))
        # b.t() is a view: (K, N) column-major, the layout cuBLASLt's int8 path wants
        impls.append(Impl("torch._int_mm", "baseline", fn=lambda: torch._int_mm(a, b.t())))
        if cfg.cuda:
            xa, wb = a.to(torch.bfloat16), b.to(torch.bfloat16)
            impls.append(Impl("torch.matmul[bf16]", "baseline", fn=lambda: torch.matmul(xa, wb.t())))
        return impls, lambda: _exact_int_matmul(a, b)

    return build


def gemm_cases(cfg: RunConfig) -> list[Case]:
    out = []
    for shape in _shapes(cfg):
        M, K, N = shape["M"], shape["K"], shape["N"]
        swept = cfg.cuda or cfg.sweep
        x = "M" if swept else "shape"
        params = dict(shape) if swept else dict(shape, shape=f"{M}x{K}x{N}")
        out.append(Case(op=GEMM_OP, params=params, dtype="int8", build=_gemm_builder(cfg, shape),
                        flops=gemm_flops(M, N, K), bound="compute", ceiling="gemm_int8",
                        x=x, series=("K",) if swept else ()))
    return out


def _linear_builder(cfg: RunConfig, shape: dict, dtype: torch.dtype):
    M, K, N = shape["M"], shape["K"], shape["N"]
    dev = cfg.device

    def build() -> list[Impl]:
        x = torch.randn(M, K, dtype=dtype, device=dev)
        linear = torch.nn.Linear(K, N, bias=False, device=dev, dtype=dtype).eval()
        w = linear.weight.detach()
        w_int8, w_scale = _quantize_weight(w)
        impls = fastattn_impls(
            cfg, "int8_linear", lambda f, be: lambda: f(x, w_int8, w_scale, backend=be))

        def check():
            # W8A8 outputs are held to the float result of the same quantized operands
            from fastattn import reference

            x_int8, x_scale = reference.quantize_per_token(x)
            acc = _exact_int_matmul(x_int8, w_int8)
            return acc * x_scale.double()[:, None] * w_scale.double()[None, :]

        def prepare_module():
            from_float, why = resolve("nn.Int8Linear.from_float")
            if from_float is None:
                raise NotImplementedError(why)
            module = from_float(copy.deepcopy(linear)).eval()

            def run():
                with torch.no_grad():
                    return module(x)

            return run

        impls.append(Impl("fastattn.nn.Int8Linear(auto)", "fastattn", prepare=prepare_module))
        if cfg.cuda:
            impls.append(Impl("F.linear[bf16]", "baseline", fn=_matmul(x, w, torch.bfloat16)))
            return impls, check
        impls.append(Impl("torch.ao dynamic int8 Linear", "baseline",
                          prepare=lambda: _ao_dynamic(linear, x)))
        impls.append(Impl("F.linear[fp32]", "baseline", fn=_matmul(x, w, torch.float32)))
        impls.append(Impl("F.linear[bf16]", "baseline", fn=_matmul(x, w, torch.bfloat16)))
        return impls, check

    return build


def _matmul(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype):
    xd, wd = x.to(dtype), w.to(dtype)
    return lambda: F.linear(xd, wd)


def _ao_dynamic(linear: torch.nn.Linear, x: torch.Tensor):
    """torch.ao's dynamic quantization (int8 weights per tensor, activations quantized on the fly
    per tensor, fbgemm/onednn kernels). Deprecated in recent torch; absent or failing: reported."""
    if x.dtype != torch.float32:
        raise NotImplementedError(f"torch.ao dynamic quantization takes float32 input, not {x.dtype}")
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        qmodel = quantize_dynamic(torch.nn.Sequential(copy.deepcopy(linear).float()),
                                  {torch.nn.Linear}, dtype=torch.qint8)

    def run():
        with torch.no_grad():
            return qmodel(x)

    return run


def linear_cases(cfg: RunConfig) -> list[Case]:
    out = []
    for dtype in cfg.dtypes_for(LINEAR_DEFAULT_DTYPES[cfg.device]):
        for shape in _shapes(cfg):
            M, K, N = shape["M"], shape["K"], shape["N"]
            swept = cfg.cuda or cfg.sweep
            x = "M" if swept else "shape"
            params = dict(shape) if swept else dict(shape, shape=f"{M}x{K}x{N}")
            tdtype = DTYPES[dtype]
            out.append(Case(
                op=LINEAR_OP, params=params, dtype=dtype, build=_linear_builder(cfg, shape, tdtype),
                flops=gemm_flops(M, N, K), bound="compute", ceiling="gemm_int8",
                x=x, series=("K",) if swept else ()))
    return out
