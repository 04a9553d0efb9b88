"""The first lines of bench/gpu_check.sh's summary: one per kernel family, PASS/FAIL of its GPU
smoke tests (tests_smoke.xml) and its key ratio, the median benchmark speed-up of each fastattn
backend over its baseline (bench/results.json).

    python bench/gpu_check_summary.py RESULTS_DIR EXIT_STATUS
"""

from __future__ import annotations

import json
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# family: (test-name prefix in tests/test_gpu_smoke.py, benchmark ops)
FAMILIES = {
    "attention": ("test_attention_", ("attention", "decode")),
    "norm": ("test_norm_", ("layer_norm",)),
    "int8": ("test_int8_", ("int8_gemm", "int8_linear")),
}

# bench/gpu_check.sh's exit status when torch sees no CUDA device (it stops before the build)
NO_GPU = 3


def _tests(res: Path) -> dict[str, dict[str, int]]:
    counts = {f: {"passed": 0, "failed": 0, "skipped": 0} for f in FAMILIES}
    xml = res / "tests_smoke.xml"
    if not xml.exists():
        return counts
    for case in ET.parse(xml).getroot().iter("testcase"):
        for fam, (prefix, _) in FAMILIES.items():
            if case.get("name", "").startswith(prefix):
                kind = ("failed" if case.find("failure") is not None or case.find("error")
                        is not None else "skipped" if case.find("skipped") is not None
                        else "passed")
                counts[fam][kind] += 1
    return counts


def _ratios(res: Path) -> dict[str, str]:
    path = res / "bench" / "results.json"
    out = {f: "no benchmark results" for f in FAMILIES}
    if not path.exists():
        return out
    cases = json.loads(path.read_text()).get("cases", [])
    for fam, (_, ops) in FAMILIES.items():
        by_impl: dict[tuple[str, str], list[float]] = {}
        for case in cases:
            if case.get("op") not in ops:
                continue
            for s in case.get("speedups") or []:
                if s.get("baseline_kind") == "baseline" and s.get("speedup"):
                    by_impl.setdefault((s["fastattn"], s["baseline"]), []).append(s["speedup"])
        if by_impl:
            out[fam] = ", ".join(f"{impl} {statistics.median(v):.2f}x vs {base} ({len(v)} cases)"
                                 for (impl, base), v in sorted(by_impl.items()))
    return out


def main(res: Path, status: int) -> None:
    tests, ratios = _tests(res), _ratios(res)
    if status == NO_GPU:  # nothing was built or run: no family failed, none was tested
        for fam in FAMILIES:
            print(f"{fam}: NOT RUN (no CUDA device)")
        print(f"verdict: NO GPU (exit {status}): nothing was built or run")
        return
    for fam in FAMILIES:
        t = tests[fam]
        ok = t["passed"] > 0 and t["failed"] == 0 and t["skipped"] == 0
        print(f"{fam}: {'PASS' if ok else 'FAIL'} (smoke tests {t['passed']} passed, "
              f"{t['failed']} failed, {t['skipped']} skipped); key ratio: {ratios[fam]}")
    print(f"verdict: {'PASS' if status == 0 else 'FAIL'} (exit {status})")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
