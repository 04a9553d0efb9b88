"""Launch helpers shared by the Triton launchers: the device guard and grids that hold any
number of (batch, head) pairs."""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

# CUDA caps grid dimensions y and z at 65,535 programs (x at 2**31 - 1)
MAX_GRID_YZ = 65535


def autotune_enabled() -> bool:
    """FASTATTN_TRITON_AUTOTUNE=0 pins every autotuned kernel to the first candidate of its list
    that fits the device (the lists are in order of preference): one compile per kernel instead
    of one per candidate, for short checks on a fresh machine."""
    return os.environ.get("FASTATTN_TRITON_AUTOTUNE", "1") != "0"


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device and its current stream, not necessarily the
    tensors' ones: make the tensors' device current for the launch."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def grid_folded(x: int, n: int) -> tuple[int, int, int]:
    """Grid (x, y, z) whose programs (i, j, k) cover index j + k * y in [0, n) for every
    program column i (folded_id() in the kernel): n over y alone would be refused above
    65,535 (B * H = 65,536 is 64 sequences of 1,024 heads). Programs past n (at most y - 1 per
    column, only when n > 65,535) must return at once."""
    y = max(1, min(n, MAX_GRID_YZ))
    return x, y, triton.cdiv(max(n, 1), y)


@triton.jit
def folded_id():
    """The index in [0, n) (or past it: return at once) that a program of a grid_folded(x, n)
    grid covers."""
    return tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)


def device_guard(launcher):
    """Decorator: run a launcher with its first argument's CUDA device current (see on_device),
    for every kernel it launches and every tensor it allocates."""

    @functools.wraps(launcher)
    def run(first, *args, **kwargs):
        with on_device(first):
            return launcher(first, *args, **kwargs)

    return run
