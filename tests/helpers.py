"""The correctness rule of docs/design.md as one assertion, plus small shared test utilities.

    max|out - ref_hi| <= factor * max|out_torch_lowp - ref_hi| + eps

ref_hi is fastattn.reference evaluated in float64 (CPU) or float32 (GPU) on the same inputs;
out_torch_lowp is plain PyTorch in the kernel's own dtype. factor is 2 for outputs, 3 for
gradients. Non-finite entries must agree exactly (same positions, same values) and are left out
of the error, except that where PyTorch's own low-precision result overflows the kernel may
overflow the same way.
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
    fin_o, fin_r, fin_t = torch.isfinite(o), torch.isfinite(r), torch.isfinite(t)
    # Non-finite entries must equal the reference's, except where PyTorch's own low-precision
    # result overflowed too (the dtype cannot hold the value): there the kernel must give what
    # PyTorch gives.
    same_r = (o == r) | (torch.isnan(o) & torch.isnan(r))
    same_t = (o == t) | (torch.isnan(o) & torch.isnan(t))
    ok = torch.where(fin_r, fin_o | (~fin_t & same_t), same_r)
    if not ok.all():
        bad = (~ok).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: non-finite entries differ from the reference "
                             f"(first positions {bad}; NaN in out: {torch.isnan(o).sum().item()})")
    cmp = fin_r & fin_o
    if r.numel() == 0 or not cmp.any():
        return
    err = (o - r)[cmp].abs().max().item()
    both = cmp & fin_t
    # where PyTorch's own low-precision result overflowed everywhere, the rule bounds nothing
    # beyond the finiteness checked above
    base = (t - r)[both].abs().max().item() if both.any() else float("inf")
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
