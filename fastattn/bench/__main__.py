"""``python -m fastattn.bench``: time fastattn's kernels against PyTorch's, side by side.

    python -m fastattn.bench --op all --device cpu --quick --out bench/results/cpu
    python -m fastattn.bench --op e2e --device cpu --quick --out bench/results/cpu-e2e
    python -m fastattn.bench --sweep --out bench/results/cpu-sweep      # the plots (make bench-sweep)
    python -m fastattn.bench --op attention --device cuda --dtype bf16 --out bench/results/h200

Writes DIR/results.json (every figure, the environment, validated against the schema in
report.py), DIR/results.md (the tables, speed-ups first) and DIR/plots/<op>.png, and prints a
table per case as it goes, with a progress bar on stderr. The JSON/Markdown are rewritten after
every case, so a run that is interrupted (or runs out of --time-budget) keeps what it measured.
Exit status: 0, or 1 when a fastattn implementation failed with an error (not merely "not
available"), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import torch

from fastattn.bench import (
    activation,
    attention,
    cases,
    decode,
    e2e,
    generate,
    harness,
    int8,
    layer_norm,
    linear,
    model,
    overhead,
    report,
    timing,
    varlen,
)
from fastattn.triton import _interpret

# ops whose figures are not fractions of the machine's ceilings
NO_CEILINGS = {"overhead", "e2e"}

# op -> (case generator, public functions it needs, time-budget weight)
OPS = {
    "attention": (attention.cases, attention.FUNCTIONS, 0.35),
    "varlen": (varlen.cases, varlen.FUNCTIONS, 0.1),
    "decode": (decode.cases, decode.FUNCTIONS, 0.1),
    "layer_norm": (layer_norm.cases, layer_norm.FUNCTIONS, 0.15),
    "silu_mul": (activation.cases, activation.FUNCTIONS, 0.05),
    "int8_gemm": (int8.gemm_cases, int8.GEMM_FUNCTIONS, 0.08),
    "int8_linear": (int8.linear_cases, int8.LINEAR_FUNCTIONS, 0.12),
    "linear": (linear.cases, linear.FUNCTIONS, 0.08),
    "model": (model.cases, model.FUNCTIONS, 0.2),
    "generate": (generate.cases, generate.FUNCTIONS, 0.1),
    "overhead": (overhead.cases, overhead.FUNCTIONS, 0.05),
    "e2e": (e2e.cases, e2e.FUNCTIONS, 0.5),
}
# what --op all runs: every op but e2e, which loads real models from their packages, compiles
# them and takes 10-20 minutes on 2 cores in --quick mode (17.5 min with one thread on a shared
# machine): it is asked for by name
ALL = [op for op in OPS if op != "e2e"]
# what --sweep runs unless --op says otherwise: the ops whose CPU cases have sweep sizes
SWEEP = ["attention", "decode", "layer_norm", "int8_gemm", "int8_linear"]


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    out = []
    for v in values:
        out += [p.strip() for p in v.split(",") if p.strip()]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fastattn.bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", action="append", metavar="OP",
                   help=f"one of {', '.join(OPS)}, all (= all but e2e; repeatable or comma list;"
                        " default all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", action="append", metavar="DTYPE",
                   help="fp32, bf16, fp16 (repeatable or comma list; default: per op)")
    p.add_argument("--quick", action="store_true", help="a representative subset of the shapes")
    p.add_argument("--sweep", action="store_true",
                   help="CPU: sizes swept for the plots, at least five per line (attention, "
                        "decode, layer_norm, int8_gemm, int8_linear; default --op), timed as "
                        "--quick times (~5-10 min on 2 cores)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, 2 repetitions: checks that everything runs (CI)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default bench/results/<device>)")
    p.add_argument("--backends", default=None,
                   help="fastattn backends to time, comma list (default: cpu on CPU, "
                        "triton,cuda on CUDA; 'reference' adds the pure-PyTorch fallback)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per case (default: auto)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop starting new cases after this long (shared among the ops); the "
                        "rest are recorded as skipped")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    ops = _split(args.op) or (SWEEP if args.sweep else ["all"])
    if "all" in ops:
        i = ops.index("all")
        ops = ops[:i] + ALL + ops[i + 1:]
    bad = [o for o in ops if o not in OPS]
    if bad:
        p.error(f"--op: unknown {bad}; choose from {', '.join(OPS)}, all")
    args.ops = list(dict.fromkeys(ops))
    args.dtypes = _split(args.dtype)
    if args.dtypes is not None:
        bad = [d for d in args.dtypes if d not in cases.DTYPES]
        if bad:
            p.error(f"--dtype: unknown {bad}; choose from {', '.join(cases.DTYPES)}")
        args.dtypes = list(dict.fromkeys(args.dtypes))
    backends = _split([args.backends]) if args.backends else list(cases.FAST_BACKENDS[args.device])
    for be in backends:
        if be not in ("triton", "cuda", "cpu", "reference"):
            p.error(f"--backends: unknown backend {be!r}")
        if be == "triton" and args.device == "cpu":
            p.error("--backends triton with --device cpu: Triton runs CPU tensors only through "
                    "its interpreter, whose timings say nothing about the kernel")
        if (be, args.device) in (("cuda", "cpu"), ("cpu", "cuda")):
            p.error(f"--backends {be} does not run on --device {args.device}")
    args.backends = list(dict.fromkeys(backends))
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be >= 1")
    if args.out is None:
        args.out = Path("bench/results") / args.device
    return args


def _op_info(functions: tuple[str, ...]) -> dict:
    return {f: cases.resolve(f)[1] for f in functions}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
            return 2
        if _interpret.interpret():
            print("error: TRITON_INTERPRET=1 would time the Triton interpreter; unset it",
                  file=sys.stderr)
            return 2

    cfg = cases.RunConfig(device=args.device, quick=args.quick or args.smoke or (args.sweep and args.device == "cpu"),
                          smoke=args.smoke, sweep=args.sweep,
                          dtypes=args.dtypes, backends=tuple(args.backends),
                          compile=not args.no_compile, reps=args.reps)
    out_dir: Path = args.out
    t_start = time.monotonic()

    # SIGTERM (e.g. from `timeout`) ends the run like Ctrl-C: what was measured is written
    def _terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old_handler = signal.signal(signal.SIGTERM, _terminate)
    doc = {
        "schema_version": report.SCHEMA_VERSION,
        "tool": "fastattn.bench",
        "complete": False,
        "config": {"device": args.device, "ops": args.ops, "dtypes": args.dtypes,
                   "quick": cfg.quick, "smoke": cfg.smoke, "sweep": cfg.sweep,
                   "backends": args.backends,
                   "argv": list(sys.argv[1:] if argv is None else argv),
                   "time_budget_s": args.time_budget, "compile": cfg.compile},
        "env": report.environment(args.device),
        "ceilings": {},
        "ops": {},
        "cases": [],
    }
    failed = False
    progress = None
    try:
        timer = timing.Timer(args.device)
        # the machine's GEMM and copy rates are the denominators of the kernels' "fraction of
        # ceiling"; per-call overhead has none, and measuring them takes minutes on a CPU
        if set(args.ops) - NO_CEILINGS:
            cfg.ceilings = timing.measure_ceilings(cfg, timer)
            doc["ceilings"] = cfg.ceilings
            ceil_line = ", ".join(f"{k} {c['value']:.4g} {c['unit']}" if c["status"] == "ok"
                                  else f"{k} error" for k, c in cfg.ceilings.items())
            print(f"ceilings on {doc['env']['device_name']}: {ceil_line}", flush=True)

        plan = [(op, OPS[op][0](cfg)) for op in args.ops]
        progress = harness.Progress(sum(len(cs) for _, cs in plan),
                                    enabled=not args.no_progress)
        for i, (op, op_cases) in enumerate(plan):
            t_op = time.monotonic()
            functions = _op_info(OPS[op][1])
            info = {"status": "ok", "functions": functions, "n_cases": len(op_cases),
                    "elapsed_s": 0.0}
            if all(why is not None for why in functions.values()):
                info["status"] = "not available"
            doc["ops"][op] = info
            if args.time_budget is not None:
                # each op gets its weight's share of what is left (time an op does not use goes
                # to the ones after it), and never less than 3% of the budget, so that an op
                # that overran (a case is not interrupted) does not starve all the others
                left = args.time_budget - (time.monotonic() - t_start)
                weight_left = sum(OPS[o][2] for o, _ in plan[i:])
                share = max(left * OPS[op][2] / weight_left, 0.03 * args.time_budget)
                cfg.deadline = time.monotonic() + share
            n_skipped = 0
            for case in op_cases:
                progress.start(f"{op} {case.label}")
                if case.skip is not None:
                    rec = harness.skipped_case(case, case.skip)
                    n_skipped += 1
                elif cfg.deadline is not None and time.monotonic() > cfg.deadline:
                    rec = harness.skipped_case(case, "time budget exhausted")
                    n_skipped += 1
                else:
                    rec = harness.run_case(case, cfg, timer)
                doc["cases"].append(rec)
                failed |= any(r["status"] == "error" and r["kind"] == "fastattn"
                              for r in rec["results"])
                progress.advance()
                progress.write(report.format_case(rec))
                info["elapsed_s"] = time.monotonic() - t_op
                report.write_json(doc, out_dir)
            if n_skipped and info["status"] == "ok":
                info["status"] = "skipped" if n_skipped == len(op_cases) else "partial"
            progress.write(f"== {op}: {len(op_cases)} cases in {info['elapsed_s']:.1f} s ==")
        doc["complete"] = True
    except KeyboardInterrupt as e:
        print(f"\ninterrupted ({e}): writing what was measured", file=sys.stderr)
        failed = True
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        if progress is not None:
            progress.close()
        doc["elapsed_s"] = time.monotonic() - t_start
        report.write_json(doc, out_dir)
        md = report.write_markdown(doc, out_dir)
        plots, why = ([], "plots disabled") if args.no_plots else report.write_plots(doc, out_dir)
        errors = report.validate_results(doc)
    print(f"wrote {out_dir / 'results.json'}, {md}" + (f", {len(plots)} plots" if plots else "")
          + (f" ({why})" if why and not plots else "") + f" in {doc['elapsed_s']:.1f} s")
    if errors:
        print("results.json does not satisfy its schema:\n  " + "\n  ".join(errors[:20]),
              file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
