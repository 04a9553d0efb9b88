"""Launch plumbing of the Triton kernels, checked on CPU: grids that hold any number of (batch,
head) pairs or row blocks within CUDA's 65,535 limit on grid dimensions y and z, and the device
guard around every launch."""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("triton", reason="needs triton installed")

from fastattn import reference  # noqa: E402
from fastattn.triton import _launch  # noqa: E402
from fastattn.triton import attention as A  # noqa: E402
from fastattn.triton import int8_gemm as G  # noqa: E402
from fastattn.triton import layer_norm as LN  # noqa: E402


@pytest.mark.parametrize("n", [1, 7, 65535, 65536, 3 * 65535 + 7, 2**22 + 1])
@pytest.mark.parametrize("x", [1, 300])
def test_grid_folded_covers_every_index_within_limits(x, n):
    gx, y, z = _launch.grid_folded(x, n)
    assert gx == x and 1 <= y <= 65535 and 1 <= z <= 65535
    # program (i, j, k) covers j + k * y: every index below n once, and fewer than y extra
    assert y * z >= n and y * (z - 1) < n
    if n <= 65535:
        assert (y, z) == (n, 1)  # no folding, no idle program


def _recording_kernels(monkeypatch, module, names, meta):
    """Replace module's kernels by stand-ins that record the grid each launch asks for."""
    grids = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                grids.append((self.name, grid({**meta, **kwargs}) if callable(grid) else grid))
            return launch

    for name in names:
        monkeypatch.setattr(module, name, Fake(name))
    return grids


def _assert_within_limits(grids):
    assert grids
    for name, grid in grids:
        assert len(grid) <= 3, name
        assert all(1 <= g for g in grid), (name, grid)
        assert all(g <= 65535 for g in grid[1:]), (name, grid)


def test_attention_grids_hold_any_batch_times_heads(monkeypatch):
    """B * H = 70,000 query heads (and kv heads): every attention launch stays within the
    limits of grid dimensions y and z."""
    grids = _recording_kernels(monkeypatch, A, [
        "_attention_fwd_kernel", "_attention_bwd_preprocess_kernel", "_attention_bwd_dkdv_kernel",
        "_attention_bwd_dq_kernel", "_kvcache_append_kernel", "_kvcache_split_kernel",
        "_kvcache_combine_kernel"], {"BLOCK_M": 16, "BLOCK_N": 16})
    B, H, L, E = 70_000, 1, 2, 16
    q = torch.randn(B, H, L, E)
    out, lse = A.attention_fwd(q, q, q, None, 1.0, -1, 0, 0, 0.0, 0)
    for det in (False, True):
        A.attention_bwd(q, q, q, q, out, lse, None, None, 1.0, -1, 0, 0, 0.0, 0, False, det)
    cache = torch.zeros(B, H, 8, E)
    A.attention_kvcache(q[:, :, :1], cache, cache, torch.zeros(B, dtype=torch.int32),
                        q[:, :, :1], q[:, :, :1], 1.0, True, num_splits=2)
    assert {g[0] for g in grids} >= {"_attention_fwd_kernel", "_attention_bwd_dq_kernel",
                                     "_kvcache_split_kernel", "_kvcache_combine_kernel"}
    _assert_within_limits(grids)


def test_weight_only_grid_holds_any_row_count(monkeypatch):
    grids = _recording_kernels(monkeypatch, G, ["_int8_weight_only_kernel"], {"BLOCK_N": 16})
    M = 32 * 65535 + 1  # row blocks of 32 beyond the y limit
    x = torch.randn(M, 1)
    G.int8_weight_only_linear(x, torch.ones(4, 1, dtype=torch.int8), torch.ones(4), None)
    _assert_within_limits(grids)
    assert grids[0][1][1] * grids[0][1][2] >= M // 32


@pytest.fixture
def tiny_fold(monkeypatch):
    """Fold at 3 instead of 65,535, so that small problems run the folded programs (and the idle
    ones past the end) through the real kernels under the interpreter."""
    if not A._interpret():
        pytest.skip("runs the kernels under TRITON_INTERPRET=1")
    monkeypatch.setattr(_launch, "MAX_GRID_YZ", 3)


def _close(out, ref, tol=1e-4):
    torch.testing.assert_close(out, ref.to(out.dtype), atol=tol, rtol=tol)


@pytest.mark.parametrize("deterministic", [False, True])
def test_folded_attention_matches_reference(tiny_fold, deterministic):
    """B * H = 8 query heads over a (x, 3, 3) grid, 4 kv heads over (x, 3, 2): forward, both
    backward paths and decoding give the reference's results."""
    torch.manual_seed(0)
    B, H, Hkv, L, E = 2, 4, 2, 5, 16
    q = torch.randn(B, H, L, E, dtype=torch.float64).float().requires_grad_()
    k = torch.randn(B, Hkv, L, E).requires_grad_()
    v = torch.randn(B, Hkv, L, E).requires_grad_()
    scale = E ** -0.5
    out, lse = A.attention_fwd(q, k, v, None, scale, -1, 0, 0, 0.0, 0)
    ref = reference.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                 enable_gqa=True)
    _close(out, ref)
    dout = torch.randn_like(ref)
    dq_ref, dk_ref, dv_ref = torch.autograd.grad(ref, (q, k, v), dout)
    dq, dk, dv, _, _ = A.attention_bwd(dout, q.detach(), k.detach(), v.detach(), out, lse, None,
                                       None, scale, -1, 0, 0, 0.0, 0, False, deterministic)
    for got, want in ((dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        _close(got, want)

    cache_k = torch.randn(B, Hkv, 8, E)
    cache_v = torch.randn(B, Hkv, 8, E)
    lens = torch.tensor([3, 6], dtype=torch.int32)
    want = reference.attention_with_kvcache(q.detach()[:, :, :1], cache_k, cache_v, lens,
                                            scale=scale, causal=True)
    for splits in (1, 2):
        got = A.attention_kvcache(q.detach()[:, :, :1], cache_k, cache_v, lens, None, None,
                                  scale, True, num_splits=splits)
        _close(got, want)


def test_folded_weight_only_matches_reference(tiny_fold):
    """8 row blocks of 16 over a (x, 3, 3) grid: the idle program writes nothing."""
    torch.manual_seed(0)
    x = torch.randn(16 * 8 - 5, 24)
    w = torch.randint(-127, 128, (20, 24), dtype=torch.int8)
    scale = torch.rand(20) + 0.5
    got = G.int8_weight_only_linear(x, w, scale, None)
    _close(got, reference.int8_weight_only_linear(x, w, scale), 1e-4)


def test_on_device_guards_cuda_tensors_only():
    class FakeCuda:
        is_cuda = True
        device = torch.device("cuda", 1)

    guard = _launch.on_device(FakeCuda())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_launch.on_device(torch.zeros(1)), contextlib.nullcontext)


def test_every_launch_runs_under_the_device_guard(monkeypatch):
    """Each launcher makes its tensors' device current for every kernel it launches (Triton
    launches on the current device and stream): launches are recorded with whether a guard for
    the launcher's input was open at the time."""
    if not A._interpret():
        pytest.skip("runs the kernels under TRITON_INTERPRET=1")
    from triton.runtime import interpreter

    open_guards: list[torch.Tensor] = []
    launches: list[tuple[str, bool]] = []

    @contextlib.contextmanager
    def spy(t):
        open_guards.append(t)
        try:
            yield
        finally:
            open_guards.pop()

    for module, attr in ((_launch, "on_device"), (LN, "_on_device")):
        monkeypatch.setattr(module, attr, spy)
    run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        launches.append((self.fn.__name__, bool(open_guards)))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", recording_run)

    q = torch.randn(1, 2, 4, 16)
    out, lse = A.attention_fwd(q, q, q, None, 0.25, -1, -1, 0, 0.0, 0)
    A.attention_bwd(out, q, q, q, out, lse, None, None, 0.25, -1, -1, 0, 0.0, 0, False, True)
    A.attention_bwd(out, q, q, q, out, lse, None, None, 0.25, -1, -1, 0, 0.0, 0, False, False)
    cache = torch.zeros(1, 2, 8, 16)
    A.attention_kvcache(q[:, :, :1], cache, cache.clone(), torch.tensor([2], dtype=torch.int32),
                        q[:, :, :1], q[:, :, :1], 0.25, True, num_splits=2)
    x = torch.randn(3, 32)
    xq, xs = G.quantize_per_token(x)
    G.int8_gemm(xq, xq, xs, xs, None, torch.float32)
    G.int8_weight_only_linear(x, xq, xs, None)
    y, _, mean, rstd = LN.layer_norm_fwd(x, torch.ones(32), torch.zeros(32), None, 1e-5, False)
    LN.layer_norm_bwd(y, None, x, torch.ones(32), torch.zeros(32), mean, rstd, False)

    names = {n for n, _ in launches}
    assert {"_attention_fwd_kernel", "_attention_bwd_preprocess_kernel",
            "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel", "_kvcache_append_kernel",
            "_kvcache_split_kernel", "_kvcache_combine_kernel", "_quantize_per_token_kernel",
            "_int8_gemm_kernel", "_int8_weight_only_kernel", "_layer_norm_fwd_kernel",
            "_layer_norm_bwd_kernel", "_sum_partials_kernel"} <= names
    unguarded = sorted({n for n, guarded in launches if not guarded})
    assert not unguarded, f"launched without the device guard: {unguarded}"
