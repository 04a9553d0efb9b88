"""The run loop of one case: build its inputs, warm up and check every implementation, time them
(timing.py), and turn the samples into the case's record of the results document (report.py);
plus the progress bar of a run."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fastattn.bench.cases import Case, Impl, RunConfig
from fastattn.bench.timing import Timer, release, speedups, summarize


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
            "timing": None, "tflops": None, "gbps": None, "rate": None,
            "fraction_of_ceiling": None, "setup_s": None, "first_call_s": None, "host_s": None,
            "max_abs_diff": None, "agreement": None, "warnings": []}


def case_record(case: Case) -> dict:
    metric = None
    if case.rate is not None:
        metric = case.rate[1]
    elif case.bound == "memory" and case.bytes:
        metric = "GB/s"
    elif case.flops:
        metric = "TOP/s" if case.dtype == "int8" else "TFLOP/s"
    return {
        "op": case.op, "label": case.label, "params": dict(case.params), "dtype": case.dtype,
        "flops": case.flops, "bytes": case.bytes, "bound": case.bound,
        "ceiling": case.ceiling_key, "metric": metric, "timing_mode": case.timing,
        "x": case.x, "series": list(case.series), "status": "ok", "reason": None,
        "check_against": None, "ratio": case.ratio,
        "items": None if case.rate is None else case.rate[0],
        "agreement_metric": None if case.agreement is None else case.agreement[0],
        "relative_to": case.relative_to,
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
        release(timer)
        return rec

    # build() returns the impls, or (impls, function computing the check reference)
    impls, check_fn = built if isinstance(built, tuple) else (built, None)
    if check_fn is None and callable(case.check):
        check_fn = case.check
    results: dict[str, dict] = {}
    # (impl, fn, host seconds per call, the call whose time is subtracted from fn's, its host s)
    live: list[tuple[Impl, Callable[[], Any], float, Callable[[], Any] | None, float]] = []
    outputs: dict[str, Any] = {}
    est: dict[str, float] = {}
    check_names = (case.check,) if isinstance(case.check, str) else (
        case.check if isinstance(case.check, tuple) else ())
    for impl in impls:
        if impl.skipped is not None:
            results[impl.name] = _result(impl, "skipped", impl.skipped)
            continue
        if impl.unavailable is not None:
            results[impl.name] = _result(impl, "not available", impl.unavailable)
            continue
        res = _result(impl, "ok")
        out = fn = minus = None
        host = wall = m_host = m_wall = 0.0
        with capture_warnings() as notes:
            try:
                if impl.prepare is not None:
                    t0 = time.perf_counter()
                    fn = impl.prepare()
                    res["setup_s"] = time.perf_counter() - t0
                else:
                    fn = impl.fn
                fn, minus = fn if isinstance(fn, tuple) else (fn, impl.minus)
                out, first, _ = timer.call(fn)
                res["first_call_s"] = first
                host = wall = first
                if minus is not None:
                    _, m_wall, m_host = timer.call(minus)
                for _ in range(max(cfg.warmup - 1, 0)):
                    out, wall, host = timer.call(fn)
                    if minus is not None:
                        _, m_wall, m_host = timer.call(minus)
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    release(timer)
                res["status"] = "not available" if _is_unavailability(impl, e) else "error"
                res["reason"] = _unavailable_reason(e, notes)
        res["warnings"] = list(notes)
        results[impl.name] = res
        if res["status"] == "ok":
            res["host_s"] = host
            live.append((impl, fn, host, minus, m_host))
            est[impl.name] = max(wall + m_wall, 1e-7)
            if impl.kind == "fastattn" or impl.name in check_names or case.agreement:
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
            if case.agreement is not None:
                try:
                    results[name]["agreement"] = float(case.agreement[1](out, ref))
                except Exception as e:  # noqa: BLE001 - e.g. an output of another shape
                    results[name]["warnings"].append(f"agreement: {type(e).__name__}: {e}")
            elif results[name]["kind"] == "fastattn":
                results[name]["max_abs_diff"] = _max_abs_diff(out, ref)
    del ref
    outputs.clear()

    if live:
        lo, hi = cfg.rep_range
        inners = {}
        for impl, *_ in live:
            if cfg.device == "cuda" and case.timing == "kernel":
                inners[impl.name] = 1  # one call between events, after an L2 flush
            else:
                inners[impl.name] = max(1, min(1000, math.ceil(cfg.min_measure_s / est[impl.name])))
        round_s = sum(est[i.name] * inners[i.name] for i, *_ in live)
        if cfg.reps is not None:
            reps = cfg.reps
        else:
            reps = max(lo, min(hi, int(cfg.case_target_s / max(round_s, 1e-9))))
            if cfg.deadline is not None:
                left = cfg.deadline - time.monotonic()
                reps = max(min(lo, 2), min(reps, int(0.8 * left / max(round_s, 1e-9))))
        samples: dict[str, list[float]] = {i.name: [] for i, *_ in live}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # recorded at warm-up already
            try:
                for r in range(reps):
                    k = r % len(live)
                    order = live[k:] + live[:k]
                    calls = []
                    for impl, fn, host, minus, m_host in order:
                        calls.append((fn, inners[impl.name], host))
                        if minus is not None:
                            calls.append((minus, inners[impl.name], m_host))
                    times = iter(timer.round(calls, case.timing))
                    for impl, _, _, minus, _ in order:
                        t = next(times)
                        if minus is not None:
                            # a difference of two noisy times: clamped at 0, never negative
                            t = max(t - next(times), 0.0)
                        samples[impl.name].append(t)
            except Exception as e:  # noqa: BLE001 - e.g. OOM at a later repetition
                for impl, *_ in live:
                    if not samples[impl.name]:
                        results[impl.name].update(status="error", reason=f"{type(e).__name__}: {e}")
                rec["reason"] = f"timing stopped early: {type(e).__name__}: {e}"
        ceiling = (cfg.ceilings.get(case.ceiling_key) or {}).get("value")
        for impl, *_ in live:
            res = results[impl.name]
            if res["status"] != "ok" or not samples[impl.name]:
                continue
            res["timing"] = summarize(samples[impl.name], inners[impl.name])
            med = res["timing"]["median_s"]
            if med <= 0:  # only a difference (minus) can be 0: the measurement is noise
                res.update(status="error", timing=None,
                           reason="the timed call minus the subtracted one is not positive: "
                                  "too noisy, time more work per call")
                continue
            if case.rate is not None:
                res["rate"] = case.rate[0] / med
            if case.flops:
                res["tflops"] = case.flops / med / 1e12
            if case.bytes:
                res["gbps"] = case.bytes / med / 1e9
            value = res["gbps"] if case.bound == "memory" else res["tflops"]
            if ceiling and value is not None:
                res["fraction_of_ceiling"] = value / ceiling

    del live, impls, check_fn, built
    rec["results"] = [results[name] for name in results]
    rec["speedups"] = speedups(rec["results"], against=case.relative_to)
    rec["elapsed_s"] = time.monotonic() - t_start
    release(timer)
    return rec


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
