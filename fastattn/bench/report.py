"""The results document: the environment it records, its schema and validation, and its
writers (terminal block per case, JSON, Markdown, PNG plots)."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from fastattn.bench.cases import DTYPES, KINDS

SCHEMA_VERSION = 1
STATUSES = ("ok", "not available", "error", "skipped")
RATE_UNITS = ("tokens/s", "sentences/s")  # the units of Case.rate


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
        # cases with a rate (items / median s), an agreement with the check output, and the
        # seconds prepare() took (converting, quantizing, exporting, compiling)
        "rate": _NUM_OR_NULL, "agreement": _NUM_OR_NULL, "setup_s": _NUM_OR_NULL,
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
        "ceiling": {"type": "string"},
        "metric": {"enum": ["TFLOP/s", "TOP/s", "GB/s", *RATE_UNITS, None]},
        "timing_mode": {"enum": ["kernel", "wall"]}, "x": _STR_OR_NULL,
        "series": {"type": "array", "items": {"type": "string"}},
        "status": {"enum": ["ok", "skipped", "error"]}, "reason": _STR_OR_NULL,
        "check_against": _STR_OR_NULL, "ratio": {"enum": ["speedup", "time"]},
        "items": {"type": ["integer", "null"]}, "agreement_metric": _STR_OR_NULL,
        "relative_to": _STR_OR_NULL,
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
                for key in ("timing", "tflops", "gbps", "rate", "fraction_of_ceiling"):
                    if r.get(key) is not None:
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


def _fmt_agreement(v: float | None) -> str:
    return "-" if v is None else f"{v:.6g}"


def _fmt_num(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if v < 1000 else f"{v:.0f}"


def _metric_value(res: dict, rec: dict) -> float | None:
    if rec["metric"] in RATE_UNITS:
        return res.get("rate")
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
    agree = rec.get("agreement_metric")
    lines.append(f"  {'implementation':<38} {'median':>10} {'p25..p75':>21} {metric:>11} "
                 f"{'of peak':>7}" + (" agreement" if agree else ""))
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
                     f"{_fmt_num(_metric_value(res, rec)):>11} {frac_s:>7}"
                     + (f" {_fmt_agreement(res.get('agreement')):>9}" if agree else ""))
    for s in rec["speedups"]:
        if rec.get("ratio") == "time":
            lines.append(f"  time {s['fastattn']} / {s['baseline']}: {1 / s['speedup']:.3g}x")
        else:
            lines.append(f"  speed-up {s['fastattn']} vs {s['baseline']}: {s['speedup']:.3g}x")
    if agree:
        lines.append(f"  agreement: {agree}")
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
        f" · {'sweep' if cfg.get('sweep') else 'quick' if cfg['quick'] else 'full'}"
        f"{' smoke' if cfg['smoke'] else ''} run"
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
        if cases and all(c.get("ratio") == "time" for c in cases):
            lines += _time_ratio_table(cases)
        elif cases and all(c.get("relative_to") for c in cases):
            lines += _relative_table(cases)
        elif fast_rows and bases:
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


def _relative_table(cases: list[dict]) -> list[str]:
    """Every implementation of each case against the one the case names (``relative_to``): its
    rate, the ratio of medians, the agreement of its output with the check output, the seconds
    its set-up took (converting, quantizing, exporting; compiling included where it warms up)."""
    lines = ["### Against the baseline of each case", "",
             "| case | implementation | rate | × baseline | agreement | setup | status |",
             "|---|---|---|---|---|---|---|"]
    metrics: dict[str, str] = {}
    for c in cases:
        ratio = {s["fastattn"]: s["speedup"] for s in c["speedups"]}
        for r in c["results"]:
            if r["impl"] == c["relative_to"] and r["status"] == "ok":
                ratio[r["impl"]] = 1.0
            rate = _metric_value(r, c)
            cells = [_md_escape(c["label"]), _md_escape(r["impl"]),
                     "" if rate is None else f"{_fmt_num(rate)} {c['metric'] or ''}",
                     f"{ratio[r['impl']]:.3g}x" if r["impl"] in ratio else "",
                     "" if r.get("agreement") is None else _fmt_agreement(r["agreement"]),
                     "" if r.get("setup_s") is None else f"{r['setup_s']:.3g} s",
                     r["status"] if r["impl"] != c["relative_to"] else
                     f"{r['status']} (baseline)"]
            lines.append("| " + " | ".join(cells) + " |")
        if c.get("agreement_metric"):
            metrics[c["agreement_metric"]] = c["label"]
    lines.append("")
    for m in metrics:
        lines.append(f"Agreement: {_md_escape(m)}.")
    return lines + ([""] if metrics else [])


def _time_ratio_table(cases: list[dict]) -> list[str]:
    """Per fastattn implementation and baseline of each case: both times per call and their
    ratio, for ops where the cost of a call is the figure (lower is better)."""
    lines = ["### Time per call, fastattn / PyTorch", "",
             "| case | fastattn | per call | baseline | per call | fastattn / baseline |",
             "|---|---|---|---|---|---|"]
    for c in cases:
        by_name = {r["impl"]: r for r in c["results"]}
        for s in c["speedups"]:
            fa, base = by_name[s["fastattn"]], by_name[s["baseline"]]
            lines.append(f"| {_md_escape(c['label'])} | {_md_escape(s['fastattn'])} | "
                         f"{fmt_time(fa['timing']['median_s'])} | {_md_escape(s['baseline'])} | "
                         f"{fmt_time(base['timing']['median_s'])} | {1 / s['speedup']:.3g}x |")
        for r in c["results"]:
            if r["kind"] == "fastattn" and r["status"] != "ok":
                lines.append(f"| {_md_escape(c['label'])} | {_md_escape(r['impl'])} | "
                             f"{r['status']} | | | |")
    return lines + [""]


MIN_PLOT_POINTS = 3


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
        # a line needs several sizes to say anything: subplots of one size are left out, and an
        # op without any other gets no plot (--sweep gives every line five sizes or more)
        groups = {k: g for k, g in groups.items()
                  if len({c["params"][c["x"]] for c in g}) >= MIN_PLOT_POINTS}
        if not groups:
            continue
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
