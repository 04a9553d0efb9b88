"""What a benchmark case is made of: the case and implementation model, the run configuration,
the work formulas a measured time is divided by, and the helpers op modules build cases with.

Each op module (attention.py, decode.py, ...) only describes *what* to time: a list of `Case`s,
each of which allocates its inputs when built and returns the `Impl`s to compare. timing.py
measures them, harness.py runs them, report.py writes the results document.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KINDS = ("fastattn", "baseline", "bound")
# fastattn backends that make sense to time per device: Triton on CPU tensors only runs through
# the interpreter (numpy per program instance), whose timings say nothing about the kernel.
FAST_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}



# ---------------------------------------------------------------------------------------------
# work formulas (what a measured time is divided by)
# ---------------------------------------------------------------------------------------------
def attention_flops(B: int, H: int, L: int, S: int, E: int, *, causal: bool = False,
                    mode: str = "fwd", Ev: int | None = None) -> int:
    """FLOPs of softmax attention, FlashAttention's convention.

    Forward: two GEMMs (Q K^T: L x S x E, P V: L x S x Ev) at 2 FLOPs per multiply-add, i.e.
    4·B·H·L·S·E when Ev == E; causal halves it (half the score matrix is masked); the backward
    counts 2.5x the forward (five GEMMs of the same size instead of two).
    """
    Ev = E if Ev is None else Ev
    fwd = 2 * B * H * L * S * (E + Ev)
    if causal:
        fwd //= 2  # exact: fwd is even
    factor = {"fwd": 2, "bwd": 5, "fwd+bwd": 7}  # in halves of the forward
    if mode not in factor:
        raise ValueError(f"mode must be one of {tuple(factor)}, got {mode!r}")
    return fwd * factor[mode] // 2


def gemm_flops(M: int, N: int, K: int) -> int:
    """(M, K) @ (K, N): 2·M·N·K (one multiply and one add per term)."""
    return 2 * M * N * K


def layer_norm_bytes(M: int, N: int, elem_size: int, *, residual: bool = False,
                     n_params: int = 2, param_size: int | None = None) -> int:
    """Minimum DRAM traffic of a (fused) LayerNorm/RMSNorm forward over (M, N) rows.

    Reads x (and the residual r), writes out (and x + r, which the fused op returns for the next
    residual branch); reads the n_params weight/bias vectors of N elements once.
    """
    param_size = elem_size if param_size is None else param_size
    streams = 4 if residual else 2
    return M * N * elem_size * streams + n_params * N * param_size


def silu_mul_bytes(M: int, inter: int, elem_size: int, *, mode: str = "fwd") -> int:
    """Minimum DRAM traffic of SiLU-and-mul over M rows, I = inter: the forward reads x (M, 2I)
    and writes out (M, I); the backward ("fwd+bwd" adds it) reads grad (M, I) and x and writes
    grad_x (M, 2I)."""
    if mode not in ("fwd", "fwd+bwd"):
        raise ValueError(f"mode must be 'fwd' or 'fwd+bwd', got {mode!r}")
    fwd = 3 * M * inter * elem_size
    return fwd if mode == "fwd" else fwd + 5 * M * inter * elem_size


def decode_bytes(B: int, Hkv: int, S: int, E: int, elem_size: int) -> int:
    """KV-cache bytes one decoding step must read: K and V, (B, Hkv, S, E) each."""
    return 2 * B * Hkv * S * E * elem_size


def copy_bytes(numel: int, elem_size: int) -> int:
    """A copy reads and writes every element."""
    return 2 * numel * elem_size


def encoder_flops(B: int, L: int, d: int, ff: int, layers: int) -> int:
    """Forward FLOPs of a Transformer encoder stack: per layer the four d x d projections and
    the two feed-forward GEMMs (2·B·L·(4·d² + 2·d·ff)) plus attention (4·B·L²·d)."""
    return layers * (2 * B * L * (4 * d * d + 2 * d * ff) + attention_flops(B, 1, L, L, d))


# ---------------------------------------------------------------------------------------------
# what a case is made of
# ---------------------------------------------------------------------------------------------
Call = Callable[[], Any]


@dataclass
class Impl:
    """One implementation of a case.

    ``fn()`` runs it once on inputs that the case allocated. ``prepare()``, when given instead,
    builds ``fn`` lazily (a torch.compile wrapper, a quantized module...) so a failure there is
    recorded like a failure of the first call (and its duration as the result's ``setup_s``).
    ``unavailable`` marks it "not available" upfront, ``skipped`` "skipped".
    """

    name: str
    kind: str  # "fastattn" | "baseline" | "bound"
    fn: Call | None = None
    prepare: Callable[[], Call | tuple[Call, Call]] | None = None
    unavailable: str | None = None
    # an optional baseline that is not installed: "skipped", with how to install it
    skipped: str | None = None
    # a call whose time is subtracted from fn's, measured right after it in every round (e.g.
    # generate() of 1 token, from generate() of 1 + n tokens: the time of the n decoding steps).
    # prepare() gives it by returning (fn, minus).
    minus: Call | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")


@dataclass
class Case:
    """One shape/dtype/option combination of one op. ``build()`` allocates the inputs and returns
    the implementations (or ``(impls, check_fn)``, check_fn computing the reference output on
    those inputs); it is called right before timing so that only one case's tensors live at a
    time."""

    op: str
    params: dict
    dtype: str
    build: Callable[[], list[Impl]]
    flops: int | None = None
    bytes: int | None = None
    bound: str = "compute"  # which ceiling the fraction refers to: "compute" | "memory"
    ceiling: str | None = None  # ceilings key; default from bound and dtype
    x: str | None = None  # the param on the x axis of the plots
    series: tuple[str, ...] = ()  # the params that identify one subplot
    timing: str = "kernel"  # "kernel" (device time of the call) | "wall" (host clock, synced)
    # how fastattn is compared with a baseline in the reports: "speedup" (baseline / fastattn)
    # or "time" (fastattn / baseline: the cost of a call, where lower is better)
    ratio: str = "speedup"
    # the output fastattn's is compared with: an impl name (the first of a tuple that ran) or a
    # function computing it
    check: str | tuple[str, ...] | Callable[[], Any] | None = None
    # (items per call, unit): the figure is a rate, items / median time, e.g. (512, "tokens/s")
    rate: tuple[int, str] | None = None
    # (what it measures, fn(output, check output) -> float): computed for every implementation
    # instead of max_abs_diff, e.g. the fraction of greedy tokens equal to the baseline's
    agreement: tuple[str, Callable[[Any, Any], float]] | None = None
    # the implementation every other one is compared with (speed-ups of every kind against it),
    # instead of fastattn's against every baseline
    relative_to: str | None = None
    # why the whole case is not run (e.g. the model's package is not installed)
    skip: str | None = None

    @property
    def label(self) -> str:
        parts = [self.dtype] + [f"{k}={v}" for k, v in self.params.items()]
        return " ".join(parts)

    @property
    def ceiling_key(self) -> str:
        if self.ceiling is not None:
            return self.ceiling
        if self.bound == "memory":
            return "copy"
        return gemm_ceiling_key(self.dtype)


def gemm_ceiling_key(dtype: str) -> str:
    # fp16 runs on the same tensor-core/AMX units as bf16 at the same rate
    return {"fp32": "gemm_fp32", "bf16": "gemm_bf16", "fp16": "gemm_bf16",
            "int8": "gemm_int8"}.get(dtype, f"gemm_{dtype}")


@dataclass
class RunConfig:
    """How this run measures: device, mode, dtype/backend choice, repetitions, time budget."""

    device: str = "cpu"
    quick: bool = False
    smoke: bool = False
    # CPU: each op's sizes swept for the plots (at least five per line, few lines), timed as
    # --quick times; on CUDA the full runs already sweep
    sweep: bool = False
    dtypes: list[str] | None = None  # None: each op's default
    backends: tuple[str, ...] = ("cpu",)
    compile: bool = True  # time torch.compile baselines (CUDA)
    reps: int | None = None  # fixed number of timed rounds (default: from the time target)
    deadline: float | None = None  # time.monotonic() after which the current op's cases skip
    ceilings: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def dtypes_for(self, default: Sequence[str]) -> list[str]:
        return list(default) if self.dtypes is None else list(self.dtypes)

    # per-mode knobs: seconds one measurement should last (CPU), seconds a case should take,
    # minimum/maximum timed rounds
    @property
    def min_measure_s(self) -> float:
        if self.sweep and not self.cuda:
            # a measurement spanning several scheduler slices (4-16 ms) of a shared machine: the
            # short sizes of a sweep otherwise measure whether the process got a slice
            return 0.05
        return 0.0 if self.smoke else (0.005 if self.quick else 0.02)

    @property
    def case_target_s(self) -> float:
        if self.smoke:
            return 0.0
        if self.cuda:
            return 0.3 if self.quick else 1.5
        return 1.5 if self.quick else 6.0

    @property
    def rep_range(self) -> tuple[int, int]:
        if self.smoke:
            return 2, 2
        if self.cuda:
            return (10, 100) if self.quick else (25, 400)
        return (3, 15) if self.quick else (7, 50)

    @property
    def warmup(self) -> int:
        return 1 if self.smoke else (3 if self.cuda else 2)


# ---------------------------------------------------------------------------------------------
# resolving the public API without crashing on what is not merged yet
# ---------------------------------------------------------------------------------------------
def resolve(path: str) -> tuple[Any, str | None]:
    """``resolve("nn.Int8Linear.from_float")`` -> (object, None), or (None, why) when the
    fastattn build at hand does not provide it (ops land in stages)."""
    try:
        obj: Any = importlib.import_module("fastattn")
    except Exception as e:  # noqa: BLE001 - report any import failure as unavailability
        return None, f"fastattn does not import ({type(e).__name__}: {e})"
    done = ["fastattn"]
    for part in path.split("."):
        try:
            obj = getattr(obj, part)
        except Exception as e:  # noqa: BLE001 - AttributeError, or ImportError from lazy modules
            return None, (f"{'.'.join(done + [part])} is not available in this build "
                          f"({type(e).__name__}: {e})")
        done.append(part)
    return obj, None


def fastattn_impls(cfg: RunConfig, function: str,
                   make: Callable[[Any, str], Callable[[], Any]]) -> list[Impl]:
    """One Impl per fast backend of the run: ``make(func, backend)`` returns the call to time.
    A function missing from this build gives "not available" rows, never a number."""
    func, why = resolve(function)
    impls = []
    for be in cfg.backends:
        name = f"fastattn[{be}]"
        if func is None:
            impls.append(Impl(name, "fastattn", unavailable=why))
        else:
            impls.append(Impl(name, "fastattn", fn=make(func, be)))
    return impls


def compile_fn(fn: Callable, **kwargs) -> Callable:
    """``torch.compile(fn, dynamic=False)`` with dynamo's recompile limit raised: a benchmark
    compiles the same function for many shapes, and past the default limit (8) dynamo silently
    runs the function eagerly - which would then be timed under the compiled label."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 1024))
    return torch.compile(fn, dynamic=False, **kwargs)
