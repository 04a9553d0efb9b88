"""Timing: the clock per device, the statistics of a case's samples, and the machine ceilings.

* every implementation of a case is timed in the same run, interleaved round-robin (the starting
  implementation rotates each round, so a slow drift of the machine hits all of them alike),
  after warm-up calls that absorb compilation and autotuning (harness.run_case);
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

import gc
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fastattn.bench.cases import DTYPES, RunConfig, copy_bytes, gemm_flops


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


def speedups(results: Sequence[dict], against: str | None = None) -> list[dict]:
    """For every fastattn implementation and every baseline/bound that ran: the speed-up
    median(baseline) / median(fastattn) (> 1: fastattn is faster).

    ``against`` names one implementation instead: then every other implementation that ran,
    whatever its kind, is compared with that one alone (its "fastattn" key names it)."""
    ok = [r for r in results if r["status"] == "ok"]
    if against is None:
        compared = [r for r in ok if r["kind"] == "fastattn"]
        bases = [r for r in ok if r["kind"] != "fastattn"]
    else:
        compared = [r for r in ok if r["impl"] != against]
        bases = [r for r in ok if r["impl"] == against]
    out = []
    for fa in compared:
        for base in bases:
            out.append({
                "fastattn": fa["impl"],
                "baseline": base["impl"],
                "baseline_kind": base["kind"],
                "speedup": base["timing"]["median_s"] / fa["timing"]["median_s"],
            })
    return out


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



def release(timer: Timer) -> None:
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
            release(timer)
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
