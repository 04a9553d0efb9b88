"""Determinism and thread safety of every public op.

Determinism: under ``torch.use_deterministic_algorithms(True)`` 20 runs of the canonical case of
each op (forward, and backward where the op has one; attention with L = 160, S = 257 so that
many blocks share each dK/dV/dmask reduction) are bitwise equal: C++ CPU kernels always,
the Triton kernels (interpreted) on a tiny attention and LayerNorm case. In the default mode the
run-to-run spread (max |run_i - run_0| over 20 runs, per output and gradient) is measured and
printed (``pytest -s``); forward outputs and the norms' backward (reduced deterministically by
contract) must not vary at all, and the attention backward may vary only by float rounding.
Measured here (2 cores): 0 for every output and gradient of every op; the CPU attention backward
is two-pass without atomics, so it is bitwise repeatable in the default mode too.

Threads: each op called from 4 Python threads at once (different inputs per thread, several
calls each, started together) gives results bitwise equal to the same calls made serially, on
the "reference" and "cpu" backends.
"""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from test_reliability import OPS, make_case, need_op, op_backend_params

RUNS = 20
THREADS = 4


@contextlib.contextmanager
def deterministic_algorithms(on: bool):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def _bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[int]:
    """Indices of the results that differ bitwise (NaN compared by bit pattern)."""
    bad = []
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.shape != y.shape or x.dtype != y.dtype:
            bad.append(i)
        elif x.numel() and not torch.equal(x.reshape(-1).view(torch.uint8),
                                           y.reshape(-1).view(torch.uint8)):
            bad.append(i)
    return bad


def _names(case, results) -> list[str]:
    n_out = len(results) - len(case.grad) - len(case.mutated)
    return ([f"out[{i}]" for i in range(n_out)] + [f"{m} (updated)" for m in case.mutated]
            + [f"d{g}" for g in case.grad])


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_mode_bitwise_cpu(op, dtype):
    need_op(op, "cpu")
    case = make_case(op, dtype, large=True)
    with deterministic_algorithms(True):
        first = case.evaluate("cpu")
        for run in range(1, RUNS):
            bad = _bitwise_equal(first, case.evaluate("cpu"))
            assert not bad, (f"{op}: run {run} differs bitwise from run 0 in "
                             f"{[_names(case, first)[i] for i in bad]}")


def _tiny_triton_cases():
    import fastattn

    def sdpa_case():
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(1, 1, 8, 16, generator=g) for _ in range(3))
        return {"q": q, "k": k, "v": v}

    def sdpa_run(t, backend):
        return fastattn.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True,
                                                     return_lse=True, backend=backend)

    def ln_case():
        g = torch.Generator().manual_seed(4)
        return {"x": torch.randn(3, 40, generator=g), "weight": torch.randn(40, generator=g),
                "bias": torch.randn(40, generator=g)}

    def ln_run(t, backend):
        return (fastattn.layer_norm(t["x"], 40, t["weight"], t["bias"], backend=backend),)

    from test_reliability import Case

    return {"scaled_dot_product_attention": Case("scaled_dot_product_attention", sdpa_case,
                                                 sdpa_run, grad=("q", "k", "v")),
            "layer_norm": Case("layer_norm", ln_case, ln_run, grad=("x", "weight", "bias"))}


@pytest.mark.parametrize("op", ["scaled_dot_product_attention", "layer_norm"])
def test_deterministic_mode_bitwise_triton_tiny(op):
    need_op(op, "triton")
    case = _tiny_triton_cases()[op]
    with deterministic_algorithms(True):
        first = case.evaluate("triton")
        for run in range(1, RUNS):
            bad = _bitwise_equal(first, case.evaluate("triton"))
            assert not bad, f"{op}/triton: run {run} differs bitwise in results {bad}"


# The backward results allowed to vary in the default mode (accumulated with atomics or in a
# thread-count-dependent order); everything else must be bitwise stable.
_MAY_VARY = {"scaled_dot_product_attention": ("dq", "dk", "dv", "dmask")}


@pytest.mark.parametrize("op", list(OPS))
def test_default_mode_run_to_run_spread_cpu(op):
    need_op(op, "cpu")
    case = make_case(op, torch.float32, large=True)
    with deterministic_algorithms(False):
        runs = [case.evaluate("cpu") for _ in range(RUNS)]
    names = _names(case, runs[0])
    spread = {}
    for i, name in enumerate(names):
        ref = runs[0][i]
        if not ref.is_floating_point():
            diff = max(int((r[i].long() - ref.long()).abs().max()) if ref.numel() else 0
                       for r in runs)
        else:
            diff = max(float((r[i].double() - ref.double()).abs().max()) if ref.numel() else 0.0
                       for r in runs)
        spread[name] = diff
    print(f"\n{op} (cpu, float32, default mode, {RUNS} runs): max |run_i - run_0| = "
          + ", ".join(f"{k}: {v:.3g}" for k, v in spread.items()))
    for name, diff in spread.items():
        if name in _MAY_VARY.get(op, ()):
            scale = float(runs[0][names.index(name)].abs().max()) or 1.0
            assert diff <= 1e-4 * scale, f"{op}: {name} varies by {diff:.3g} (scale {scale:.3g})"
        else:
            assert diff == 0, f"{op}: {name} varies run to run by {diff:.3g} in the default mode"


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_dropout_reproducible_with_manual_seed(backend):
    """Dropout draws its seed from torch's CPU generator: torch.manual_seed replays it."""
    import fastattn

    need_op("scaled_dot_product_attention", backend)
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend=backend))
    assert torch.equal(outs[0], outs[1]), backend
    torch.manual_seed(124)
    other = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend=backend)
    assert not torch.equal(other, outs[0]), f"{backend}: the dropout mask ignores the seed"


# ---------------------------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,backend", op_backend_params(backends=("reference", "cpu")))
def test_threads_match_serial(op, backend):
    need_op(op, backend)
    calls_per_thread = 3
    cases = [make_case(op, (torch.float32, torch.bfloat16)[i % 2], seed=i) for i in range(THREADS)]
    serial = [c.evaluate(backend) for c in cases]
    inputs = [[c.inputs() for _ in range(calls_per_thread)] for c in cases]
    results: list[list | None] = [None] * THREADS
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def work(i):
        try:
            start.wait()
            results[i] = [cases[i].evaluate(backend, ins) for ins in inputs[i]]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), f"{op}/{backend}: a thread hangs"
    assert not errors, f"{op}/{backend}: {errors[0]!r}"
    for i in range(THREADS):
        for j, got in enumerate(results[i]):
            bad = _bitwise_equal(serial[i], got)
            assert not bad, (f"{op}/{backend}: thread {i} call {j} differs from the serial call "
                             f"in {[_names(cases[i], got)[b] for b in bad]}")
