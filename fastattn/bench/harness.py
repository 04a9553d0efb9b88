"""The shared benchmark harness: work formulas, timing, machine ceilings, the results document
(with its schema) and its writers (terminal table, JSON, Markdown, PNG plots).

Each op module (attention.py, decode.py, ...) only describes *what* to time: a list of `Case`s,
each of which allocates its inputs when built and returns the `Impl`s to compare. Everything else
lives here, so every op is measured, summarised and reported the same way:

* every implementation of a case is timed in the same run, interleaved round-robin (the starting
  implementation rotates each round, so a slow drift of the machine hits all of them alike),
  after warm-up calls that absorb compilation and autotuning;
* CPU: ``time.perf_counter`` around ``inner`` back-to-back calls (``inner`` sized so that one
  measurement lasts a few milliseconds); CUDA: ``torch.cuda.Event`` pairs around one call, with
  the L2 cache flushed before it and the stream held by ``torch.cuda._sleep`` while the host
  enqueues, so the events time the kernels and not Python's launch overhead (the same
  measurement as ``triton.testing.do_bench`` minus the launch gaps); ``timing="wall"`` cases
  (whole models) use the host clock with ``synchronize`` instead, launch overhead included;
* the median is the figure of merit, with the quartiles and min/max as spread; speed-ups are
  ratios of medians: ``median(baseline) / median(fastattn)``.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SCHEMA_VERSION = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KINDS = ("fastattn", "baseline", "bound")
STATUSES = ("ok", "not available", "error", "skipped")
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
# statistics and ratios
# ---------------------------------------------------------------------------------------------
def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    # linear interpolation between closest ranks (numpy's default)
    pos = q * (len(sorted_vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(samples: Sequence[float], inner: int = 1) -> dict:
    """Seconds per call -> the timing record of the results document."""
    if not samples:
        raise ValueError("no samples")
    s = sorted(samples)
    return {
        "median_s": statistics.median(s),
        "p25_s": _quantile(s, 0.25),
        "p75_s": _quantile(s, 0.75),
        "min_s": s[0],
        "max_s": s[-1],
        "reps": len(s),
        "inner": inner,
        "samples_s": list(samples),
    }


def speedups(results: Sequence[dict]) -> list[dict]:
    """For every fastattn implementation and every baseline/bound that ran: the speed-up
    median(baseline) / median(fastattn) (> 1: fastattn is faster)."""
    ok = [r for r in results if r["status"] == "ok"]
    out = []
    for fa in ok:
        if fa["kind"] != "fastattn":
            continue
        for base in ok:
            if base["kind"] == "fastattn":
                continue
            out.append({
                "fastattn": fa["impl"],
                "baseline": base["impl"],
                "baseline_kind": base["kind"],
                "speedup": base["timing"]["median_s"] / fa["timing"]["median_s"],
            })
    return out


# ---------------------------------------------------------------------------------------------
# what a case is made of
# ---------------------------------------------------------------------------------------------
@dataclass
class Impl:
    """One implementation of a case.

    ``fn()`` runs it once on inputs that the case allocated. ``prepare()``, when given instead,
    builds ``fn`` lazily (a torch.compile wrapper, a quantized module...) so a failure there is
    recorded like a failure of the first call. ``unavailable`` marks it "not available" upfront.
    """

    name: str
    kind: str  # "fastattn" | "baseline" | "bound"
    fn: Callable[[], Any] | None = None
    prepare: Callable[[], Callable[[], Any]] | None = None
    unavailable: str | None = None

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
    # the output fastattn's is compared with: an impl name (the first of a tuple that ran) or a
    # function computing it
    check: str | tuple[str, ...] | Callable[[], Any] | None = None

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


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
class Timer:
    """Times calls on one device. See the module docstring for the method per device."""

    _FLUSH_BYTES = 256 << 20  # > every GPU's L2 (H100/H200: 50/60 MB)

    def __init__(self, device: str):
        self.device = device
        self._flush = None
        self._cycles_per_s = None
        if device == "cuda":
            self._flush = torch.empty(self._FLUSH_BYTES, dtype=torch.int8, device="cuda")
            self._cycles_per_s = self._calibrate_sleep()

    @staticmethod
    def _calibrate_sleep() -> float | None:
        if not hasattr(torch.cuda, "_sleep"):
            return None
        cycles = 10_000_000
        torch.cuda._sleep(1000)  # first launch loads the kernel
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return cycles / (start.elapsed_time(end) * 1e-3)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def call(self, fn: Callable[[], Any]) -> tuple[Any, float, float]:
        """One synchronised call: (output, wall seconds, host seconds until fn returned)."""
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        self.sync()
        return out, time.perf_counter() - t0, t1 - t0

    def round(self, calls: Sequence[tuple[Callable[[], Any], int, float]], mode: str) -> list[float]:
        """One measurement per (fn, inner, host_s), in the given order: seconds per call."""
        if self.device != "cuda":
            out = []
            for fn, inner, _ in calls:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                out.append((time.perf_counter() - t0) / inner)
            return out
        if mode == "wall":
            out = []
            for fn, inner, _ in calls:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                torch.cuda.synchronize()
                out.append((time.perf_counter() - t0) / inner)
            return out
        events = []
        for fn, inner, host_s in calls:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            if self._cycles_per_s:
                # keep the stream busy while the host enqueues flush + fn, so the events
                # bracket the kernels back to back (bounded: 100 us .. 50 ms)
                hold = min(max(2.0 * host_s * inner + 1e-4, 1e-4), 0.05)
                torch.cuda._sleep(int(hold * self._cycles_per_s))
            self._flush.zero_()
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            events.append((start, end, inner))
        torch.cuda.synchronize()
        return [s.elapsed_time(e) * 1e-3 / inner for s, e, inner in events]


class _FallbackLog(logging.Handler):
    """Collects fastattn's debug lines about backend choices that fell back to the reference."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if "fell back" in msg and msg not in self.lines:
            self.lines.append(msg)


@contextlib.contextmanager
def capture_warnings():
    """Records warnings (fastattn's fallback notices, deprecations) instead of printing them."""
    logger = logging.getLogger("fastattn")
    handler = _FallbackLog()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    notes: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield notes
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        for w in caught:
            msg = f"{w.category.__name__}: {w.message}"
            if msg not in notes:
                notes.append(msg[:500])
        notes.extend(line[:500] for line in handler.lines if line not in notes)


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _max_abs_diff(a: Any, b: Any) -> float | None:
    ta, tb = _first_tensor(a), _first_tensor(b)
    if ta is None or tb is None or ta.shape != tb.shape:
        return None
    with torch.no_grad():
        return float((ta.detach().double() - tb.detach().double()).abs().max())


def _unavailable_reason(e: BaseException, notes: Sequence[str]) -> str:
    msg = f"{type(e).__name__}: {str(e).strip()}"
    # torch's SDPA explains why a backend refused the call in warnings issued just before
    why = [n for n in notes if "UserWarning" in n and ("Memory efficient" in n or "Flash" in n
                                                       or "cuDNN" in n or "kernel" in n)]
    if why:
        msg += " [" + " | ".join(w.split(": ", 1)[-1] for w in why[:3]) + "]"
    return msg[:800]


def _is_unavailability(impl: Impl, e: BaseException) -> bool:
    """A fastattn backend that declines a call is "not available"; anything else it raises is an
    error. A baseline that cannot run a call (an SDPA backend that does not support the shape,
    _int_mm below its minimum M...) is "not available" whatever it raises."""
    if impl.kind != "fastattn":
        return True
    if isinstance(e, NotImplementedError):
        return True
    return isinstance(e, RuntimeError) and "cannot run this call" in str(e)


def _result(impl: Impl, status: str, reason: str | None = None) -> dict:
    return {"impl": impl.name, "kind": impl.kind, "status": status, "reason": reason,
            "timing": None, "tflops": None, "gbps": None, "fraction_of_ceiling": None,
            "first_call_s": None, "host_s": None, "max_abs_diff": None, "warnings": []}


def case_record(case: Case) -> dict:
    metric = None
    if case.bound == "memory" and case.bytes:
        metric = "GB/s"
    elif case.flops:
        metric = "TOP/s" if case.dtype == "int8" else "TFLOP/s"
    return {
        "op": case.op, "label": case.label, "params": dict(case.params), "dtype": case.dtype,
        "flops": case.flops, "bytes": case.bytes, "bound": case.bound,
        "ceiling": case.ceiling_key, "metric": metric, "timing_mode": case.timing,
        "x": case.x, "series": list(case.series), "status": "ok", "reason": None,
        "check_against": None,
        "results": [], "speedups": [], "elapsed_s": 0.0,
    }


def skipped_case(case: Case, reason: str) -> dict:
    rec = case_record(case)
    rec["status"], rec["reason"] = "skipped", reason
    return rec


def run_case(case: Case, cfg: RunConfig, timer: Timer) -> dict:
    """Warm up, time (interleaved), summarise one case. Never raises for a failing impl."""
    t_start = time.monotonic()
    rec = case_record(case)
    try:
        built = case.build()
    except Exception as e:  # noqa: BLE001 - e.g. out of memory allocating the inputs
        rec["status"], rec["reason"] = "error", f"building the inputs failed: {type(e).__name__}: {e}"
        _release(timer)
        return rec

    # build() returns the impls, or (impls, function computing the check reference)
    impls, check_fn = built if isinstance(built, tuple) else (built, None)
    if check_fn is None and callable(case.check):
        check_fn = case.check
    results: dict[str, dict] = {}
    live: list[tuple[Impl, Callable[[], Any], float]] = []  # (impl, fn, host seconds per call)
    outputs: dict[str, Any] = {}
    est: dict[str, float] = {}
    check_names = (case.check,) if isinstance(case.check, str) else (
        case.check if isinstance(case.check, tuple) else ())
    for impl in impls:
        if impl.unavailable is not None:
            results[impl.name] = _result(impl, "not available", impl.unavailable)
            continue
        res = _result(impl, "ok")
        out = fn = None
        host = wall = 0.0
        with capture_warnings() as notes:
            try:
                fn = impl.prepare() if impl.prepare is not None else impl.fn
                out, first, _ = timer.call(fn)
                res["first_call_s"] = first
                host = wall = first
                for _ in range(max(cfg.warmup - 1, 0)):
                    out, wall, host = timer.call(fn)
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    _release(timer)
                res["status"] = "not available" if _is_unavailability(impl, e) else "error"
                res["reason"] = _unavailable_reason(e, notes)
        res["warnings"] = list(notes)
        results[impl.name] = res
        if res["status"] == "ok":
            res["host_s"] = host
            live.append((impl, fn, host))
            est[impl.name] = max(wall, 1e-7)
            if impl.kind == "fastattn" or impl.name in check_names:
                outputs[impl.name] = out
        del out

    # correctness guard: a fast number from a wrong kernel would be worse than no number
    ref = None
    if check_fn is not None:
        try:
            with torch.no_grad():
                ref = check_fn()
            rec["check_against"] = "reference"
        except Exception as e:  # noqa: BLE001
            rec["reason"] = f"the check reference failed: {type(e).__name__}: {e}"
    else:
        for name in check_names:
            if name in outputs:
                ref, rec["check_against"] = outputs[name], name
                break
    if ref is not None:
        for name, out in outputs.items():
            if results[name]["kind"] == "fastattn":
                results[name]["max_abs_diff"] = _max_abs_diff(out, ref)
    del ref
    outputs.clear()

    if live:
        lo, hi = cfg.rep_range
        inners = {}
        for impl, _, _ in live:
            if cfg.device == "cuda" and case.timing == "kernel":
                inners[impl.name] = 1  # one call between events, after an L2 flush
            else:
                inners[impl.name] = max(1, min(1000, math.ceil(cfg.min_measure_s / est[impl.name])))
        round_s = sum(est[i.name] * inners[i.name] for i, _, _ in live)
        if cfg.reps is not None:
            reps = cfg.reps
        else:
            reps = max(lo, min(hi, int(cfg.case_target_s / max(round_s, 1e-9))))
            if cfg.deadline is not None:
                left = cfg.deadline - time.monotonic()
                reps = max(min(lo, 2), min(reps, int(0.8 * left / max(round_s, 1e-9))))
        samples: dict[str, list[float]] = {i.name: [] for i, _, _ in live}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # recorded at warm-up already
            try:
                for r in range(reps):
                    k = r % len(live)
                    order = live[k:] + live[:k]
                    times = timer.round([(fn, inners[i.name], host) for i, fn, host in order],
                                        case.timing)
                    for (impl, _, _), t in zip(order, times, strict=True):
                        samples[impl.name].append(t)
            except Exception as e:  # noqa: BLE001 - e.g. OOM at a later repetition
                for impl, _, _ in live:
                    if not samples[impl.name]:
                        results[impl.name].update(status="error", reason=f"{type(e).__name__}: {e}")
                rec["reason"] = f"timing stopped early: {type(e).__name__}: {e}"
        ceiling = (cfg.ceilings.get(case.ceiling_key) or {}).get("value")
        for impl, _, _ in live:
            res = results[impl.name]
            if res["status"] != "ok" or not samples[impl.name]:
                continue
            res["timing"] = summarize(samples[impl.name], inners[impl.name])
            med = res["timing"]["median_s"]
            if case.flops:
                res["tflops"] = case.flops / med / 1e12
            if case.bytes:
                res["gbps"] = case.bytes / med / 1e9
            value = res["gbps"] if case.bound == "memory" else res["tflops"]
            if ceiling and value is not None:
                res["fraction_of_ceiling"] = value / ceiling

    del live, impls, check_fn, built
    rec["results"] = [results[name] for name in results]
    rec["speedups"] = speedups(rec["results"])
    rec["elapsed_s"] = time.monotonic() - t_start
    _release(timer)
    return rec


def _release(timer: Timer) -> None:
    # The inputs die with the case's closures (reference counting); the cached CUDA blocks are
    # handed back so the next shape starts unfragmented. A full gc.collect() costs ~0.3 s with
    # torch loaded: the youngest generation catches any cycle a case made.
    if timer.device == "cuda":
        gc.collect(0)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# machine ceilings
# ---------------------------------------------------------------------------------------------
def measure_ceilings(cfg: RunConfig, timer: Timer) -> dict:
    """Peak GEMM throughput per dtype and copy bandwidth, measured now on this machine: the
    denominators of "fraction of ceiling"."""
    dev = cfg.device
    if cfg.smoke:
        n, copy_elems, reps = 256, 1 << 20, 2
    elif cfg.cuda:
        n, copy_elems, reps = 8192, 1 << 28, 20
    else:
        n, copy_elems, reps = 2048, 1 << 26, 5
    gemm_dtypes = ["bf16"] if cfg.cuda else ["fp32", "bf16"]
    out = {}
    specs = []
    for name in gemm_dtypes:
        specs.append((f"gemm_{name}", "TFLOP/s", gemm_flops(n, n, n), [n, n, n],
                      lambda name=name: _gemm_fn(n, DTYPES[name], dev)))
    specs.append(("gemm_int8", "TOP/s", gemm_flops(n, n, n), [n, n, n],
                  lambda: _int8_gemm_fn(n, dev)))
    specs.append(("copy", "GB/s", copy_bytes(copy_elems, 4), [copy_elems],
                  lambda: _copy_fn(copy_elems, dev)))
    for key, unit, work, shape, make in specs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn = make()
                for _ in range(cfg.warmup):
                    timer.call(fn)
                times = [timer.round([(fn, 1, 0.0)], "kernel")[0] for _ in range(reps)]
            best, med = min(times), statistics.median(times)
            scale = 1e9 if unit == "GB/s" else 1e12
            # the ceiling is the best observed rate: the machine proved it can do that much
            out[key] = {"status": "ok", "value": work / best / scale, "median": work / med / scale,
                        "unit": unit, "shape": shape, "reps": reps}
        except Exception as e:  # noqa: BLE001
            out[key] = {"status": "error", "value": None, "median": None, "unit": unit,
                        "shape": shape, "reps": 0, "reason": f"{type(e).__name__}: {e}"}
        finally:
            fn = None
            _release(timer)
    return out


def _gemm_fn(n: int, dtype: torch.dtype, device: str) -> Callable[[], Any]:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return lambda: torch.matmul(a, b)


def _int8_gemm_fn(n: int, device: str) -> Callable[[], Any]:
    a = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=device)
    w = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=device)
    return lambda: torch._int_mm(a, w.t())  # (N, K) weight, transposed view: cuBLASLt's TN


def _copy_fn(numel: int, device: str) -> Callable[[], Any]:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> dict:
    root = Path(__file__).resolve().parents[2]
    info = {"commit": None, "dirty": None}
    try:
        info["commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                        capture_output=True, text=True, timeout=10,
                                        check=True).stdout.strip() or None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True, text=True,
                                timeout=10, check=True).stdout
        info["dirty"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict:
    """Everything needed to interpret (and reproduce) the numbers."""
    env = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device,
        "device_name": _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "fastattn": _version("fastattn"),
        "git": _git_commit(),
        "gpu": None,
        "backends": None,
    }
    with contextlib.suppress(Exception):
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    try:
        import fastattn

        env["fastattn"] = getattr(fastattn, "__version__", env["fastattn"])
        env["backends"] = fastattn.backends()
    except Exception as e:  # noqa: BLE001
        env["backends"] = {"error": f"{type(e).__name__}: {e}"}
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device_name"] = props.name
        env["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                      "sm_count": props.multi_processor_count,
                      "memory_gib": round(props.total_memory / 2**30, 1)}
    return env


# ---------------------------------------------------------------------------------------------
# the results document: schema and validation
# ---------------------------------------------------------------------------------------------
_NUM_OR_NULL = {"type": ["number", "null"]}
_STR_OR_NULL = {"type": ["string", "null"]}
TIMING_SCHEMA = {
    "type": ["object", "null"],
    "required": ["median_s", "p25_s", "p75_s", "min_s", "max_s", "reps", "inner", "samples_s"],
    "properties": {
        "median_s": {"type": "number", "minimum": 0}, "p25_s": {"type": "number", "minimum": 0},
        "p75_s": {"type": "number", "minimum": 0}, "min_s": {"type": "number", "minimum": 0},
        "max_s": {"type": "number", "minimum": 0}, "reps": {"type": "integer", "minimum": 1},
        "inner": {"type": "integer", "minimum": 1},
        "samples_s": {"type": "array", "items": {"type": "number", "minimum": 0}},
    },
}
RESULT_SCHEMA = {
    "type": "object",
    "required": ["impl", "kind", "status", "reason", "timing", "tflops", "gbps",
                 "fraction_of_ceiling", "first_call_s", "host_s", "max_abs_diff", "warnings"],
    "properties": {
        "impl": {"type": "string"}, "kind": {"enum": list(KINDS)},
        "status": {"enum": list(STATUSES)}, "reason": _STR_OR_NULL, "timing": TIMING_SCHEMA,
        "tflops": _NUM_OR_NULL, "gbps": _NUM_OR_NULL, "fraction_of_ceiling": _NUM_OR_NULL,
        "first_call_s": _NUM_OR_NULL, "host_s": _NUM_OR_NULL, "max_abs_diff": _NUM_OR_NULL,
        "warnings": {"type": "array", "items": {"type": "string"}},
    },
}
SPEEDUP_SCHEMA = {
    "type": "object",
    "required": ["fastattn", "baseline", "baseline_kind", "speedup"],
    "properties": {"fastattn": {"type": "string"}, "baseline": {"type": "string"},
                   "baseline_kind": {"enum": ["baseline", "bound"]},
                   "speedup": {"type": "number", "minimum": 0}},
}
CASE_SCHEMA = {
    "type": "object",
    "required": ["op", "label", "params", "dtype", "flops", "bytes", "bound", "ceiling", "metric",
                 "timing_mode", "x", "series", "status", "reason", "check_against", "results",
                 "speedups", "elapsed_s"],
    "properties": {
        "op": {"type": "string"}, "label": {"type": "string"}, "params": {"type": "object"},
        "dtype": {"type": "string"}, "flops": {"type": ["integer", "null"]},
        "bytes": {"type": ["integer", "null"]}, "bound": {"enum": ["compute", "memory"]},
        "ceiling": {"type": "string"}, "metric": {"enum": ["TFLOP/s", "TOP/s", "GB/s", None]},
        "timing_mode": {"enum": ["kernel", "wall"]}, "x": _STR_OR_NULL,
        "series": {"type": "array", "items": {"type": "string"}},
        "status": {"enum": ["ok", "skipped", "error"]}, "reason": _STR_OR_NULL,
        "check_against": _STR_OR_NULL,
        "results": {"type": "array", "items": RESULT_SCHEMA},
        "speedups": {"type": "array", "items": SPEEDUP_SCHEMA},
        "elapsed_s": {"type": "number", "minimum": 0},
    },
}
CEILING_SCHEMA = {
    "type": "object",
    "required": ["status", "value", "median", "unit", "shape", "reps"],
    "properties": {"status": {"enum": ["ok", "error"]}, "value": _NUM_OR_NULL,
                   "median": _NUM_OR_NULL, "unit": {"enum": ["TFLOP/s", "TOP/s", "GB/s"]},
                   "shape": {"type": "array", "items": {"type": "integer"}},
                   "reps": {"type": "integer", "minimum": 0}},
}
OP_SCHEMA = {
    "type": "object",
    "required": ["status", "functions", "n_cases", "elapsed_s"],
    "properties": {
        "status": {"enum": ["ok", "not available", "partial", "skipped"]},
        "functions": {"type": "object", "additionalProperties": _STR_OR_NULL},
        "n_cases": {"type": "integer", "minimum": 0},
        "elapsed_s": {"type": "number", "minimum": 0},
    },
}
RESULTS_SCHEMA = {
    "type": "object",
    "required": ["schema_version", "tool", "complete", "config", "env", "ceilings", "ops", "cases"],
    "properties": {
        "schema_version": {"enum": [SCHEMA_VERSION]},
        "tool": {"enum": ["fastattn.bench"]},
        "complete": {"type": "boolean"},
        "config": {
            "type": "object",
            "required": ["device", "ops", "dtypes", "quick", "smoke", "backends", "argv"],
            "properties": {"device": {"enum": ["cpu", "cuda"]},
                           "ops": {"type": "array", "items": {"type": "string"}},
                           "dtypes": {"type": ["array", "null"], "items": {"enum": list(DTYPES)}},
                           "quick": {"type": "boolean"}, "smoke": {"type": "boolean"},
                           "backends": {"type": "array", "items": {"type": "string"}},
                           "argv": {"type": "array", "items": {"type": "string"}}},
        },
        "env": {
            "type": "object",
            "required": ["date", "device", "device_name", "cpu_model", "torch", "triton", "git",
                         "backends"],
            "properties": {"date": {"type": "string"}, "device_name": {"type": "string"},
                           "cpu_model": {"type": "string"}, "torch": {"type": "string"},
                           "triton": _STR_OR_NULL, "git": {"type": "object"},
                           "backends": {"type": ["object", "null"]}},
        },
        "ceilings": {"type": "object", "additionalProperties": CEILING_SCHEMA},
        "ops": {"type": "object", "additionalProperties": OP_SCHEMA},
        "cases": {"type": "array", "items": CASE_SCHEMA},
    },
}

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def validate(doc: Any, schema: dict = RESULTS_SCHEMA, path: str = "$") -> list[str]:
    """Checks ``doc`` against a JSON-Schema subset (type, enum, required, properties,
    additionalProperties, items, minimum). Returns the list of violations (empty: valid)."""
    errors: list[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](doc) for t in types):
            return [f"{path}: expected {'/'.join(types)}, got {type(doc).__name__} {doc!r:.60}"]
    if "enum" in schema and doc not in schema["enum"]:
        errors.append(f"{path}: {doc!r} not one of {schema['enum']}")
    if "minimum" in schema and _TYPES["number"](doc) and doc < schema["minimum"]:
        errors.append(f"{path}: {doc} < minimum {schema['minimum']}")
    if isinstance(doc, dict):
        for key in schema.get("required", ()):
            if key not in doc:
                errors.append(f"{path}: missing {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, value in doc.items():
            if key in props:
                errors += validate(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                errors += validate(value, extra, f"{path}.{key}")
            elif extra is False:
                errors.append(f"{path}: unexpected key {key!r}")
    if isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            errors += validate(item, schema["items"], f"{path}[{i}]")
    return errors


def validate_results(doc: dict) -> list[str]:
    """The schema plus the invariants a reader relies on: a number only where something ran,
    speed-ups that are the ratio of the medians shown."""
    errors = validate(doc)
    if errors:
        return errors
    for ci, case in enumerate(doc["cases"]):
        by_name = {}
        for r in case["results"]:
            where = f"$.cases[{ci}] {case['label']} {r['impl']}"
            by_name[r["impl"]] = r
            if r["status"] == "ok":
                if r["timing"] is None:
                    errors.append(f"{where}: status ok without timing")
                elif not (r["timing"]["min_s"] <= r["timing"]["median_s"] <= r["timing"]["max_s"]):
                    errors.append(f"{where}: median outside [min, max]")
            else:
                if r["reason"] is None:
                    errors.append(f"{where}: status {r['status']!r} without a reason")
                for key in ("timing", "tflops", "gbps", "fraction_of_ceiling"):
                    if r[key] is not None:
                        errors.append(f"{where}: status {r['status']!r} but {key} is set")
        for s in case["speedups"]:
            fa, base = by_name.get(s["fastattn"]), by_name.get(s["baseline"])
            if fa is None or base is None or fa["status"] != "ok" or base["status"] != "ok":
                errors.append(f"$.cases[{ci}]: speed-up refers to an implementation that did not run")
                continue
            want = base["timing"]["median_s"] / fa["timing"]["median_s"]
            if not math.isclose(s["speedup"], want, rel_tol=1e-9):
                errors.append(f"$.cases[{ci}]: speed-up {s['speedup']} != ratio of medians {want}")
    return errors


# ---------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------
def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _fmt_num(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if v < 1000 else f"{v:.0f}"


def _metric_value(res: dict, rec: dict) -> float | None:
    return res["gbps"] if rec["metric"] == "GB/s" else res["tflops"]


def format_case(rec: dict) -> str:
    """The terminal block of one case: a row per implementation, then the speed-ups."""
    work = []
    if rec["flops"]:
        work.append(f"{rec['flops'] / 1e9:.4g} G{'OP' if rec['dtype'] == 'int8' else 'FLOP'}")
    if rec["bytes"]:
        work.append(f"{rec['bytes'] / 1e6:.4g} MB")
    lines = [f"[{rec['op']}] {rec['label']}" + (f"  ({', '.join(work)})" if work else "")]
    if rec["status"] != "ok" and not rec["results"]:
        lines.append(f"  {rec['status']}: {rec['reason']}")
        return "\n".join(lines)
    metric = rec["metric"] or "-"
    lines.append(f"  {'implementation':<38} {'median':>10} {'p25..p75':>21} {metric:>9} "
                 f"{'of peak':>7}")
    for res in rec["results"]:
        if res["status"] != "ok":
            reason = (res["reason"] or "").replace("\n", " ")
            lines.append(f"  {res['impl']:<38} {res['status']}: {reason[:150]}")
            continue
        t = res["timing"]
        frac = res["fraction_of_ceiling"]
        frac_s = "-" if frac is None else f"{frac:.0%}"
        spread = f"{fmt_time(t['p25_s'])}..{fmt_time(t['p75_s'])}"
        lines.append(f"  {res['impl']:<38} {fmt_time(t['median_s']):>10} {spread:>21} "
                     f"{_fmt_num(_metric_value(res, rec)):>9} {frac_s:>7}")
    for s in rec["speedups"]:
        lines.append(f"  speed-up {s['fastattn']} vs {s['baseline']}: {s['speedup']:.3g}x")
    if rec["status"] != "ok":
        lines.append(f"  {rec['status']}: {rec['reason']}")
    return "\n".join(lines)


def write_json(doc: dict, out_dir: Path) -> Path:
    """Atomically (so a run killed mid-write leaves the previous complete file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def write_markdown(doc: dict, out_dir: Path) -> Path:
    """results.md: environment, ceilings, then per op the speed-up table first, the timings
    after, and what was not available and why."""
    env, cfg = doc["env"], doc["config"]
    git = env.get("git") or {}
    lines = [
        f"# fastattn benchmarks: {cfg['device']} ({env['device_name']})",
        "",
        f"{env['date']} · torch {env['torch']} · triton {env['triton']} · commit "
        f"{(git.get('commit') or 'unknown')[:12]}{' (dirty)' if git.get('dirty') else ''}"
        f" · {'quick' if cfg['quick'] else 'full'}{' smoke' if cfg['smoke'] else ''} run"
        f"{'' if doc['complete'] else ' · **incomplete** (interrupted or out of time)'}",
        "",
        f"CPU: {env['cpu_model']} ({env.get('cpu_count')} cores, {env.get('torch_threads')} "
        f"torch threads, {env.get('cpu_capability')}). fastattn backends timed: "
        f"{', '.join(cfg['backends'])}.",
        "",
        "Speed-up = median time of the baseline / median time of fastattn (> 1: fastattn is "
        "faster); against a *bound* (a plain copy of the same bytes) it is the fraction of copy "
        "speed reached. All implementations of a case were timed in the same run, interleaved.",
        "",
        "## Machine ceilings (measured at start)",
        "",
        "| ceiling | best | median | shape |",
        "|---|---|---|---|",
    ]
    for key, c in doc["ceilings"].items():
        if c["status"] == "ok":
            lines.append(f"| {key} | {c['value']:.4g} {c['unit']} | {c['median']:.4g} {c['unit']} "
                         f"| {'x'.join(map(str, c['shape']))} |")
        else:
            lines.append(f"| {key} | error: {_md_escape(c.get('reason', ''))} | | |")
    for op, info in doc["ops"].items():
        cases = [c for c in doc["cases"] if c["op"] == op]
        lines += ["", f"## {op}", ""]
        missing = {f: why for f, why in info["functions"].items() if why is not None}
        for f, why in missing.items():
            lines.append(f"- `fastattn.{f}`: **not available** ({_md_escape(why)})")
        if missing:
            lines.append("")
        # columns: every baseline/bound of the op, in the order the cases list them
        bases = []
        for c in cases:
            for r in c["results"]:
                if r["kind"] != "fastattn" and r["impl"] not in bases:
                    bases.append(r["impl"])
        fast_rows = [(c, r) for c in cases for r in c["results"] if r["kind"] == "fastattn"]
        if fast_rows and bases:
            lines += ["### Speed-up of fastattn", "",
                      "| case | fastattn | " + " | ".join(f"vs {_md_escape(b)}" for b in bases) + " |",
                      "|---|---|" + "---|" * len(bases)]
            for c, r in fast_rows:
                if r["status"] != "ok":
                    cells = [r["status"]] + [""] * (len(bases) - 1)
                else:
                    got = {s["baseline"]: s["speedup"] for s in c["speedups"]
                           if s["fastattn"] == r["impl"]}
                    cells = [f"{got[b]:.3g}x" if b in got else "n/a" for b in bases]
                lines.append(f"| {_md_escape(c['label'])} | {r['impl']} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += ["### Timings", "",
                  "| case | implementation | median | p25..p75 | min..max | metric | of ceiling "
                  "| max abs diff | status |",
                  "|---|---|---|---|---|---|---|---|---|"]
        notes: dict[str, list[str]] = {}
        reasons: dict[tuple[str, str, str], int] = {}
        for c in cases:
            if not c["results"]:
                lines.append(f"| {_md_escape(c['label'])} | | | | | | | | {c['status']}: "
                             f"{_md_escape(c['reason'] or '')} |")
            for r in c["results"]:
                if r["status"] == "ok":
                    t = r["timing"]
                    val = _metric_value(r, c)
                    frac = r["fraction_of_ceiling"]
                    frac_s = "-" if frac is None else f"{frac:.0%}"
                    diff = r["max_abs_diff"]
                    diff_s = "-" if diff is None else f"{diff:.2e}"
                    lines.append(
                        f"| {_md_escape(c['label'])} | {_md_escape(r['impl'])} | "
                        f"{fmt_time(t['median_s'])} | {fmt_time(t['p25_s'])}..{fmt_time(t['p75_s'])}"
                        f" | {fmt_time(t['min_s'])}..{fmt_time(t['max_s'])} | "
                        f"{_fmt_num(val)} {c['metric'] or ''} | {frac_s} | {diff_s} | ok |")
                else:
                    key = (r["impl"], r["status"], r["reason"] or "")
                    reasons[key] = reasons.get(key, 0) + 1
                    lines.append(f"| {_md_escape(c['label'])} | {_md_escape(r['impl'])} | | | | | "
                                 f"| | {r['status']} |")
                for w in r["warnings"]:
                    notes.setdefault(w, []).append(r["impl"])
        if reasons:
            lines += ["", "Not timed, and why:", ""]
            for (impl, status, reason), n in reasons.items():
                lines.append(f"- {_md_escape(impl)}, {n} case{'s' if n > 1 else ''}: {status}: "
                             f"{_md_escape(reason[:400])}")
        if notes:
            lines += ["", "Warnings recorded during warm-up:", ""]
            for w, who in notes.items():
                lines.append(f"- {_md_escape(w[:300])} ({', '.join(sorted(set(who)))})")
    path = out_dir / "results.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_plots(doc: dict, out_dir: Path) -> tuple[list[Path], str | None]:
    """One PNG per op: a subplot per series (e.g. dtype/head dim/causal), throughput against the
    swept size, one line per implementation. Returns (paths, why none) - matplotlib is optional."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return [], f"plots skipped: matplotlib unavailable ({type(e).__name__}: {e})"
    plot_dir = out_dir / "plots"
    paths = []
    for op in doc["ops"]:
        cases = [c for c in doc["cases"] if c["op"] == op and c["x"] and c["metric"]
                 and any(r["status"] == "ok" for r in c["results"])]
        if not cases:
            continue
        groups: dict[str, list[dict]] = {}
        for c in cases:
            key = " ".join([c["dtype"]] + [f"{k}={c['params'][k]}" for k in c["series"]])
            groups.setdefault(key, []).append(c)
        ncols = min(3, len(groups))
        nrows = math.ceil(len(groups) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
        for ax, (key, group) in zip(axes.flat, groups.items(), strict=False):
            xs = []
            for c in group:
                if c["params"][c["x"]] not in xs:
                    xs.append(c["params"][c["x"]])
            numeric = all(isinstance(x, (int, float)) for x in xs)
            if numeric:
                xs.sort()
            lines: dict[str, list[tuple[Any, float]]] = {}
            for c in group:
                for r in c["results"]:
                    v = _metric_value(r, c) if r["status"] == "ok" else None
                    if v is not None:
                        lines.setdefault(r["impl"], []).append((c["params"][c["x"]], v))
            for impl, pts in lines.items():
                pts.sort(key=lambda p: xs.index(p[0]))
                px = [p[0] if numeric else xs.index(p[0]) for p in pts]
                ax.plot(px, [p[1] for p in pts], marker="o",
                        linewidth=2.2 if impl.startswith("fastattn") else 1.2, label=impl)
            if numeric and len(xs) > 1 and xs[-1] / max(xs[0], 1) >= 8:
                ax.set_xscale("log", base=2)
            if not numeric:
                ax.set_xticks(range(len(xs)), [str(x) for x in xs], fontsize=7)
            ax.set_ylim(bottom=0)
            ax.set_xlabel(group[0]["x"])
            ax.set_ylabel(group[0]["metric"])
            ax.set_title(key, fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(groups):]:
            ax.axis("off")
        fig.suptitle(f"{op} on {doc['env']['device_name']}", fontsize=10)
        fig.tight_layout()
        plot_dir.mkdir(parents=True, exist_ok=True)
        path = plot_dir / f"{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths, None


class Progress:
    """A progress bar on stderr (tqdm when installed and stderr is a terminal, else plain text:
    a line per case in logs, a redrawn bar on a terminal)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.t0 = time.monotonic()
        self._tty = sys.stderr.isatty()
        self._bar = None
        if enabled and self._tty:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, file=sys.stderr, unit="case", leave=False)
            except ImportError:
                pass

    def start(self, label: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description(label[:60])
            return
        width = 24
        fill = int(width * self.done / max(self.total, 1))
        text = (f"[{'#' * fill}{'.' * (width - fill)}] {self.done + 1}/{self.total} "
                f"{time.monotonic() - self.t0:5.0f}s {label}")
        if self._tty:
            sys.stderr.write("\r\033[K" + text[:150])
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def advance(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)

    def write(self, text: str) -> None:
        """Print above the bar (stdout)."""
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            if self.enabled and self._tty:
                sys.stderr.write("\r\033[K")
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self._tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
