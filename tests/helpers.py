"""The correctness rule of DESIGN.md as one assertion, plus small shared test utilities.

    max|out - ref_hi| <= factor * max|out_torch_lowp - ref_hi| + eps

ref_hi is fastattn.reference evaluated in float64 (CPU) or float32 (GPU) on the same inputs;
out_torch_lowp is plain PyTorch in the kernel's own dtype. factor is 2 for outputs, 3 for
gradients. Non-finite entries must agree exactly (same positions, same values) and are left out
of the error.
"""

from __future__ import annotations

import os

import pytest
import torch

BACKENDS_UNDER_TEST = ("reference", "cpu", "triton")


def assert_close_rule(
    out: torch.Tensor,
    ref_hi: torch.Tensor,
    out_torch_lowp: torch.Tensor,
    *,
    factor: float = 2.0,
    eps: float | None = None,
    name: str = "out",
) -> None:
    assert out.shape == ref_hi.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_hi.shape)}"
    o = out.detach().double().cpu()
    r = ref_hi.detach().double().cpu()
    t = out_torch_lowp.detach().double().cpu()
    fin_o, fin_r = torch.isfinite(o), torch.isfinite(r)
    if not torch.equal(fin_o, fin_r) or not torch.equal(o[~fin_r], r[~fin_r]):
        bad = (fin_o != fin_r).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: non-finite entries differ from the reference "
                             f"(first positions {bad}; NaN in out: {torch.isnan(o).sum().item()})")
    if r.numel() == 0 or not fin_r.any():
        return
    err = (o - r)[fin_r].abs().max().item()
    base = (t - r)[fin_r & torch.isfinite(t)].abs().max().item() if fin_r.any() else 0.0
    if eps is None:
        eps = 1e-5 * max(1.0, r[fin_r].abs().max().item())
    bound = factor * base + eps
    if not err <= bound:
        raise AssertionError(
            f"{name}: max|out - ref| = {err:.3e} > {factor} * max|torch_lowp - ref| "
            f"({base:.3e}) + eps ({eps:.1e}) = {bound:.3e}")


def skip_unless_backend(backend: str, device: str = "cpu") -> None:
    """Skip (with the reason) when a backend cannot run here: the reason is real, e.g. the C++
    extension is not built or triton is not in interpreter mode on CPU."""
    from fastattn.ops._backend import availability

    why = availability(backend, device)
    if why is not None:
        pytest.skip(f"backend {backend!r} unavailable on {device}: {why}")


def nan_padded(t: torch.Tensor, pad: int = 3) -> torch.Tensor:
    """A copy of t carved out of a larger NaN-filled storage (xformers-style out-of-bounds check):
    any read past t's extent sees NaN. The last dim is padded too, so the result is strided."""
    shape = list(t.shape)
    big = torch.full([s + pad for s in shape[:-1]] + [shape[-1] + 2 * pad], float("nan"),
                     dtype=t.dtype, device=t.device)
    idx = tuple(slice(0, s) for s in shape[:-1]) + (slice(pad, pad + shape[-1]),)
    view = big[idx]
    view.copy_(t)
    return view


def is_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
