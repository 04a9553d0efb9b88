"""Invalid input and valid edge cases of every public function and module, per backend.

The entries live in tests/_bad_input_catalogue.py and run there, in a subprocess, so that a
kernel that crashes (segfault, abort) on some input fails that entry instead of killing pytest;
the run resumes after the crashed entry. Each (backend, entry) becomes one test here.

Invalid calls (≥ 40, every public function and module): each must raise ValueError, TypeError or
RuntimeError (AssertionError for nn.MultiheadAttention, as torch.nn.MultiheadAttention raises)
with a message naming the argument: wrong rank, mismatched sizes, unsupported or mixed dtypes,
a second device ("meta"), empty tensors where invalid, non-finite scales and eps, wrong mask
shape/dtype, negative sizes, out-of-range window/dropout/cache_seqlens, bad backend strings.

Valid edge cases: defined behaviour, checked against the float64 reference with the correctness rule (docs/design.md)
(non-finite entries must match the reference's exactly, so no NaN where the reference has none):

    ============================  ================================================================
    input                         defined behaviour
    ============================  ================================================================
    L = 1, S = 1; L = 1, S = 37   as the reference (softmax over one key is 1: out = v)
    B = 0 / L = 0                 empty output of the right shape, no kernel launch needed
    S = 0 (no keys)               out = 0, lse = -inf (F.scaled_dot_product_attention gives 0)
    E = 0, default scale          F.scaled_dot_product_attention's answer: the mean of v
    all-masked rows (bool mask,   out = 0, lse = -inf, gradients 0 on those rows; never NaN
    -inf float mask, window)
    logits ~1e4 (fp32, bf16)      finite, as the reference (running max subtracted before exp)
    inputs ~1e-30 (fp32)          finite and non-zero where the reference is non-zero
    kvcache: seqlens 0, no new    out = 0 (no visible key)
    kvcache: filled to capacity   as the reference; the new tokens written at cache_seqlens
    layer_norm: 0 rows            empty output
    layer_norm: width 1 /         variance 0: out = bias (rstd = 1/sqrt(eps)), finite; width 1:
    constant rows                 d out / d x = 0 (up to float32 rounding times rstd)
    layer_norm: |x| ~1e4 (bf16)   as the reference (statistics in float32)
    norms: |x| ~1e-30 (fp32)      finite, as the reference
    rms_norm: eps = 0, |x| ~1e-18 as the reference (scale invariant while mean(x^2) is normal)
    layer_norm: fp16 weight on    computed in float32 (F.layer_norm raises "mixed dtype" here;
    fp32 input                    fastattn accepts it)
    rms_norm: all-zero row        out = 0 on that row
    quantize: 0 rows, K = 1,      bit-exact with the reference (zero row: q = 0, scale = 0;
    zero rows, 1e38 and 1e-30     huge/tiny magnitudes scale exactly)
    int8_gemm: M = 0, K = 0       (0, N) int32; K = 0 gives zeros (+ bias when dequantized)
    int8_gemm: K = 1, ±127/-128   exact int32 products
    int8_linear: 0 rows /         empty output / that row equals the bias exactly
    a zero token
    silu_mul: 0 rows, I = 1       empty output; a row shorter than any vector, as the reference
    silu_mul: |gate| up to 1e4    finite: silu = -0 where exp(-gate) overflows, gate where it
                                  underflows (PyTorch's answers), gradients too
    silu_mul: |x| ~1e-30          finite, as the reference
    ============================  ================================================================
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import _bad_input_catalogue as catalogue
import pytest
from test_reliability import BACKENDS, run_entry_script

import fastattn

CATALOGUE = Path(catalogue.__file__)
TIMEOUT_S = 400

# Entries that fail because of a bug in the package, not in the test: (id, backend or None for
# every backend) -> the bug. strict: the test fails as soon as the bug is fixed, so this table
# stays true.
KNOWN_BUGS: dict[tuple[str, str | None], str] = {}


def _known_bug(entry_id: str, backend: str) -> str | None:
    return KNOWN_BUGS.get((entry_id, backend)) or KNOWN_BUGS.get((entry_id, None))


@functools.cache
def run_catalogue() -> dict[str, dict]:
    """{"<backend>/<id>": result} of every entry on every backend."""
    return run_entry_script([sys.executable, str(CATALOGUE), "--backends", ",".join(BACKENDS)],
                            timeout_s=TIMEOUT_S)


def _params():
    params = []
    for backend in BACKENDS:
        for e in catalogue.ENTRIES:
            if backend not in e.backends:  # e.g. a bad backend string: one backend is enough
                continue
            marks = []
            if (bug := _known_bug(e.id, backend)) is not None:
                marks.append(pytest.mark.xfail(strict=True, reason=bug))
            params.append(pytest.param(backend, e.id, id=f"{backend}-{e.id}", marks=marks))
    return params


@pytest.mark.parametrize("backend,entry_id", _params())
def test_catalogue_entry(backend, entry_id):
    r = run_catalogue()[f"{backend}/{entry_id}"]
    if r["status"] == "skip":
        pytest.skip(r["detail"])
    assert r["status"] == "pass", f"{entry_id} on {backend}: {r['detail']}"


def test_catalogue_covers_every_public_function():
    invalid = [e for e in catalogue.ENTRIES if e.raises is not None]
    assert len(invalid) >= 40
    ids = [e.id for e in catalogue.ENTRIES]
    assert len(ids) == len(set(ids)), "duplicate entry ids"
    targets = {e.target for e in invalid}
    public = {n for n in fastattn.__all__ if callable(getattr(fastattn, n)) and n != "backends"}
    assert public <= targets, f"public functions without invalid-input entries: {public - targets}"
    for module in ("nn.MultiheadAttention", "nn.LayerNorm", "nn.RMSNorm", "nn.Int8Linear",
                   "convert"):
        assert module in targets, module
