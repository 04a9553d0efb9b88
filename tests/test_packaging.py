"""Packaging: the sdist carries every source and header and the metadata, and it builds a wheel
that installs into a fresh venv and runs each CPU kernel family.

The install test builds fastattn._C from scratch (4-8 min on 2 cores): it is marked ``install``,
deselected by default (pyproject.toml) and run by ``make test-install`` (CI runs it after
``make test``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

import fastattn

ROOT = Path(__file__).resolve().parents[1]


def _sdist(out: Path) -> Path:
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], cwd=ROOT,
                   check=True, capture_output=True, text=True)
    (path,) = out.glob("fastattn-*.tar.gz")
    return path


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    return _sdist(tmp_path_factory.mktemp("sdist"))


def _sources() -> list[str]:
    """What a build from the sdist needs: every file under csrc/, the package (Python files and
    package data), the build files and the licence."""
    files = [p for p in (ROOT / "csrc").rglob("*") if p.is_file()]
    files += [p for p in (ROOT / "fastattn").rglob("*.py")]
    files += [ROOT / "fastattn" / "py.typed", *(ROOT / "fastattn" / "bench" / "data").glob("*")]
    files += [ROOT / n for n in ("setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE",
                                 "README.md")]
    return sorted(str(p.relative_to(ROOT)) for p in files if "__pycache__" not in p.parts)


def test_sdist_carries_every_source_and_the_metadata(sdist):
    prefix = f"fastattn-{fastattn.__version__}/"
    with tarfile.open(sdist) as tar:
        names = {n[len(prefix):] for n in tar.getnames() if n.startswith(prefix)}
        pkg_info = tar.extractfile(prefix + "PKG-INFO").read().decode()
    missing = [f for f in _sources() if f not in names]
    assert not missing, f"not in the sdist: {missing}"
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]
    assert f"Version: {fastattn.__version__}" in pkg_info
    assert "License-Expression: BSD-3-Clause" in pkg_info
    assert "Requires-Dist: torch<2.14,>=2.11" in pkg_info
    assert "Provides-Extra: hf" in pkg_info


# every CPU kernel family once, against the reference (run inside the fresh venv)
CHECK = textwrap.dedent("""
    import os, sys, torch, fastattn
    from fastattn import reference as ref
    assert os.path.realpath(fastattn.__file__).startswith(os.path.realpath(sys.prefix)), fastattn.__file__
    assert fastattn.backends()["available"]["cpu"]["cpu"] is True, fastattn.backends()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 32) for _ in range(3))
    torch.testing.assert_close(fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu"),
                               ref.scaled_dot_product_attention(q, k, v, is_causal=True))
    kc, vc = torch.randn(1, 2, 32, 32), torch.randn(1, 2, 32, 32)
    lens = torch.tensor([20], dtype=torch.int32)
    torch.testing.assert_close(fastattn.attention_with_kvcache(q[:, :, :1], kc, vc, lens, backend="cpu"),
                               ref.attention_with_kvcache(q[:, :, :1], kc, vc, lens))
    x, w, b = torch.randn(8, 64), torch.randn(64), torch.randn(64)
    torch.testing.assert_close(fastattn.layer_norm(x, (64,), w, b, backend="cpu"), ref.layer_norm(x, (64,), w, b))
    torch.testing.assert_close(fastattn.rms_norm(x, (64,), w, backend="cpu"), ref.rms_norm(x, (64,), w))
    torch.testing.assert_close(fastattn.silu_mul(x, backend="cpu"), ref.silu_mul(x))
    a = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    bm = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
    assert torch.equal(fastattn.int8_gemm(a, bm, backend="cpu"), ref.int8_gemm(a, bm))
    wq, ws = fastattn.quantize_per_channel(torch.randn(16, 64))
    torch.testing.assert_close(fastattn.int8_weight_only_linear(x, wq, ws, backend="cpu"),
                               ref.int8_weight_only_linear(x, wq, ws))
    print("ok", fastattn.__version__)
""")


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.install
def test_sdist_builds_a_wheel_that_installs_into_a_fresh_venv(sdist, tmp_path):
    venv = tmp_path / "venv"
    py = str(venv / "bin" / "python")
    _run([sys.executable, "-m", "venv", str(venv)])
    # torch first (the CPU wheel): the build below compiles against the torch it will run with
    torch_version = __import__("torch").__version__.split("+")[0]
    _run([py, "-m", "pip", "install", "-q", f"torch=={torch_version}", "setuptools>=77",
          "wheel", "ninja"])
    env = dict(os.environ, FASTATTN_SKIP_CUDA_BUILD="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    _run([py, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", str(sdist),
          "-w", str(tmp_path / "wheels")], env=env, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheels").glob("fastattn-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    for want in ("fastattn/_C.", "fastattn/py.typed", "fastattn/bench/data/prose.txt",
                 "fastattn/checkpoint.py", "dist-info/licenses/LICENSE"):
        assert any(want in n for n in names), f"{want} not in {wheel.name}"
    _run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], cwd=tmp_path)
    out = _run([py, "-c", CHECK], cwd=tmp_path)  # not the checkout: the installed package
    assert out.stdout.strip() == f"ok {fastattn.__version__}"
