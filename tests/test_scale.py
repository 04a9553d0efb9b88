"""Scale: a 32k-token attention in bounded memory, and 64-bit index arithmetic.

Long sequences: the CPU attention kernel runs L = S = 32768 (B = H = 1, E = 64, bf16, causal)
in a subprocess whose address space is capped (``RLIMIT_AS``) at what it has mapped after a
small warm-up call plus 1.5 GiB, and whose peak RSS may grow by at most 512 MiB during the call:
an L x S float32 score matrix (4 GiB) or even a bf16 one (2 GiB) cannot be allocated. A few
rows of the output are held to the correctness rule (docs/design.md) against the float64 reference of those rows. The
premise is tested too: the reference, which does materialise L x S, fails under the same cap.

64-bit offsets, without allocating 2^31 elements: every tensor argument is a view whose batch
(or row) stride is 2^31 + 64 elements, carved out of one storage of 2^31 + 4 Mi elements that is
allocated but never touched except where the views are (untouched pages are never backed by
memory on CPU: the process' peak RSS stays far below the storage size, which is checked). Batch
1 then starts past the int32 range: a kernel that multiplies an index by a stride in 32 bits
reads or writes the wrong place (garbage, or a crash, which fails that entry only: the checks
run in a subprocess). Results are compared with the same call on contiguous copies. A second
check expands a (1, 1, 1, S) float mask to (B, H, L, S) with B*H*L*S = 2^31 + 2^15 logical
elements (stride 0), which a kernel flattening (b, h, i, j) into one int32 index gets wrong.

The Triton backend is checked this way only on a GPU: on CPU tensors, Triton's interpreter copies
every argument's whole storage back after each launch (interpreter._restore_args_dev), which
would touch all 4 GiB of the virtual storage.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fastattn

SCRIPT = str(Path(__file__).resolve())
MAX_RSS_GROWTH = 512 * 2**20
HUGE_STRIDE = 2**31 + 64  # elements: batch 1 starts past the int32 range
SLACK = 2**22  # elements after the stride for batch 0's data of all the views


# =============================================================================================
# worker side (runs in a subprocess)
# =============================================================================================
def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _peak_rss() -> int:
    """This process image's peak RSS (VmHWM). Not getrusage's ru_maxrss: that survives execve, so
    a worker spawned by a pytest process that once held a large model starts at the parent's
    peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def long_sequence(backend: str, L: int = 32768, cap_extra: int = 3 * 2**29) -> dict:
    """Causal bf16 attention, B = H = 1, E = 64, under an address-space cap of the mapped size
    after a warm-up call plus ``cap_extra``. Returns the time and the growth of the peak RSS."""
    import torch
    from helpers import assert_close_rule

    import fastattn
    from fastattn import reference

    torch.manual_seed(0)
    E, dtype = 64, torch.bfloat16
    q, k, v = (torch.randn(1, 1, L, E).to(dtype) for _ in range(3))
    # warm-up: thread pools and allocator arenas exist before the cap is measured
    w = 256
    fastattn.scaled_dot_product_attention(q[:, :, :w], k[:, :, :w], v[:, :, :w], is_causal=True,
                                          backend=backend)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + cap_extra, hard))
    try:
        rss0 = _peak_rss()
        t0 = time.perf_counter()
        out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
        seconds = time.perf_counter() - t0
        grown = _peak_rss() - rss0
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert out.shape == (1, 1, L, E) and out.dtype == dtype
    assert not torch.isnan(out).any(), "NaN in the output"
    rows = torch.tensor([0, 1, 4097, L // 2 + 3, L - 1])
    visible = torch.arange(L)[None, :] <= rows[:, None]  # (rows, L): causal, top-left
    hi = reference.scaled_dot_product_attention(q[:, :, rows].double(), k.double(), v.double(),
                                                visible)
    lo = reference.scaled_dot_product_attention(q[:, :, rows], k, v, visible)
    assert_close_rule(out[:, :, rows], hi, lo)
    assert grown < MAX_RSS_GROWTH, f"peak RSS grew by {grown / 2**20:.0f} MiB"
    return {"seconds": round(seconds, 2), "peak_rss_growth_MiB": round(grown / 2**20, 1)}


def memory_cap_premise() -> dict:
    """Under the same cap the reference, which materialises the L x S scores (2 GiB in bf16),
    must fail: otherwise the cap would not bound anything."""
    try:
        long_sequence("reference")
    except RuntimeError as e:
        assert "alloc" in str(e), e
        return {"reference_under_cap": str(e)[:120]}
    raise AssertionError("the reference ran under the cap: the cap does not bound memory")


class HugeStorage:
    """Views with stride(0) = HUGE_STRIDE over one storage that is only touched where they are."""

    def __init__(self, dtype, device):
        import torch

        self.base = torch.empty(HUGE_STRIDE + SLACK, dtype=dtype, device=device)
        self.cur = 0

    def place(self, t):
        """t (2, *rest) -> a view with the same values and stride(0) = HUGE_STRIDE."""
        assert t.shape[0] == 2
        n = t[0].numel()
        assert self.cur + n <= SLACK
        strides, acc = [], 1
        for s in reversed(t.shape[1:]):
            strides.insert(0, acc)
            acc *= s
        view = self.base.as_strided(t.shape, (HUGE_STRIDE, *strides), self.cur)
        view.copy_(t)
        self.cur += (n + 63) // 64 * 64
        return view


def _close(got, want, what):
    import torch

    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert not (got.is_floating_point() and torch.isnan(got).any()), f"{what}: NaN"
    if got.is_floating_point():
        torch.testing.assert_close(got.float().cpu(), want.float().cpu(), rtol=2e-2, atol=2e-2,
                                   msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(got.cpu(), want.cpu()), f"{what}: values differ"


def _grads(fn, tensors):
    """Outputs of fn(*tensors) and the gradients of sum(out * fixed weights) w.r.t. tensors."""
    import torch

    leaves = [t.detach().requires_grad_(True) for t in tensors]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(5)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))


def offsets_entries(backend: str, device: str):
    """(id, op, fn) of the 64-bit checks; each fn raises on failure."""
    import torch

    import fastattn

    bf16 = torch.bfloat16
    rnd = lambda *s, dtype=bf16: torch.randn(s).to(dtype).to(device)

    def both(fn, tensors, storage_dtype=bf16, what="results"):
        huge = HugeStorage(storage_dtype, device)
        placed = [huge.place(t) for t in tensors]
        got = fn(*placed)
        want = fn(*[t.contiguous() for t in tensors])
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            _close(a, b, f"{what}[{i}]")
        return placed

    def sdpa():
        q, k, v = rnd(2, 2, 17, 40), rnd(2, 1, 23, 40), rnd(2, 1, 23, 40)
        mask = rnd(2, 1, 17, 23)
        f = lambda q, k, v, m: _grads(
            lambda q, k, v, m: fastattn.scaled_dot_product_attention(
                q, k, v, m, is_causal=True, causal_alignment="bottom_right", enable_gqa=True,
                return_lse=True, backend=backend), [q, k, v, m])
        both(f, [q, k, v, mask])

    def kvcache():
        kc, vc = rnd(2, 2, 40, 64), rnd(2, 2, 40, 64)
        q, kn, vn = rnd(2, 4, 3, 64), rnd(2, 2, 3, 64), rnd(2, 2, 3, 64)
        seqlens = torch.tensor([7, 30], dtype=torch.int32, device=device)
        huge = HugeStorage(bf16, device)
        hk, hv = huge.place(kc), huge.place(vc)
        got = fastattn.attention_with_kvcache(q, hk, hv, seqlens, kn, vn, backend=backend)
        kc2, vc2 = kc.clone(), vc.clone()
        want = fastattn.attention_with_kvcache(q, kc2, vc2, seqlens, kn, vn, backend=backend)
        _close(got, want, "out")
        _close(hk, kc2, "k_cache after the update")
        _close(hv, vc2, "v_cache after the update")

    def norm(fn):
        def run():
            x, r, w = rnd(2, 700), rnd(2, 700), rnd(700)
            both(lambda x, r: _grads(lambda x, r: getattr(fastattn, fn)(
                x, 700, w, residual=r, backend=backend), [x, r]), [x, r])
        return run

    def quantize():
        x = rnd(2, 900, dtype=torch.float32) * 3
        both(lambda x: fastattn.quantize_per_token(x, backend=backend), [x],
             storage_dtype=torch.float32)

    def gemm():
        a = torch.randint(-127, 128, (2, 300), dtype=torch.int8, device=device)
        b = torch.randint(-127, 128, (2, 300), dtype=torch.int8, device=device)
        sa, sb = torch.rand(2, device=device), torch.rand(2, device=device)
        both(lambda a, b: (fastattn.int8_gemm(a, b, backend=backend),
                           fastattn.int8_gemm(a, b, sa, sb, out_dtype=bf16, backend=backend)),
             [a, b], storage_dtype=torch.int8)

    def linear(fn):
        def run():
            w_int8 = torch.randint(-127, 128, (24, 300), dtype=torch.int8, device=device)
            w_scale = torch.rand(24, device=device) / 100
            x = rnd(2, 300)
            both(lambda x: (getattr(fastattn, fn)(x, w_int8, w_scale, backend=backend),), [x])
        return run

    def expanded_mask():
        # B*H*L*S = 2^31 + 2^15 logical mask elements, one key visible per query: out = v[key 0]
        H, S = 2**15, 2**16 + 1
        q, k, v = rnd(1, H, 1, 16), rnd(1, 1, S, 16), rnd(1, 1, S, 16)
        mask = rnd(1, 1, 1, S).expand(1, H, 1, S)
        out = fastattn.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True, window=(0, 0),
                                                    backend=backend)
        assert torch.equal(out, v[:, :, :1].expand(1, H, 1, 16)), "wrong rows"

    return [("sdpa_batch_stride", "scaled_dot_product_attention", sdpa),
            ("sdpa_expanded_mask_2^31", "scaled_dot_product_attention", expanded_mask),
            ("kvcache_batch_stride", "attention_with_kvcache", kvcache),
            ("layer_norm_row_stride", "layer_norm", norm("layer_norm")),
            ("rms_norm_row_stride", "rms_norm", norm("rms_norm")),
            ("quantize_row_stride", "quantize_per_token", quantize),
            ("int8_gemm_row_stride", "int8_gemm", gemm),
            ("int8_linear_row_stride", "int8_linear", linear("int8_linear")),
            ("int8_weight_only_row_stride", "int8_weight_only_linear",
             linear("int8_weight_only_linear"))]


def scale_entries(backends: list[str], device: str):
    """[(key, op, fn)]: the long-sequence entries (CPU) then the 64-bit ones per backend."""
    entries = []
    if device == "cpu":
        entries.append(("cpu/long_32k", "scaled_dot_product_attention",
                        lambda: long_sequence("cpu")))
        entries.append(("reference/memory_cap_premise", None, memory_cap_premise))
    for backend in backends:
        entries += [(f"{backend}/{id_}", op, fn) for id_, op, fn in offsets_entries(backend, device)]
    return entries


def worker(backends: list[str], device: str, after: str | None) -> None:
    import warnings

    from test_reliability import op_unavailable

    warnings.simplefilter("ignore")
    entries = scale_entries(backends, device)
    if after is not None:
        entries = entries[[e[0] for e in entries].index(after) + 1:]
    for key, op, fn in entries:
        status, detail = "pass", ""
        why = None if op is None else op_unavailable(op, key.split("/")[0], device)
        if why is not None:
            status, detail = "skip", why
        else:
            print(f"START {key}", flush=True)
            try:
                info = fn()
                detail = json.dumps(info) if info else ""
            except Exception as e:  # noqa: BLE001 - every exception is a result here
                status = "fail"
                detail = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"
            if status == "pass" and device == "cpu" and _peak_rss() > 2 * 2**30:
                status = "fail"
                detail = (f"peak RSS {_peak_rss() / 2**30:.1f} GiB: the huge storage was touched "
                          "beyond the views (a copy of the whole storage?)")
        print("RESULT " + json.dumps({"id": key, "status": status, "detail": detail[:2000]}),
              flush=True)


# =============================================================================================
# tests
# =============================================================================================
OFFSET_IDS = ["sdpa_batch_stride", "sdpa_expanded_mask_2^31", "kvcache_batch_stride",
              "layer_norm_row_stride", "rms_norm_row_stride", "quantize_row_stride",
              "int8_gemm_row_stride", "int8_linear_row_stride", "int8_weight_only_row_stride"]


@functools.cache
def _results(backends: tuple[str, ...], device: str) -> dict:
    from test_reliability import run_entry_script

    return run_entry_script([sys.executable, SCRIPT, "--backends", ",".join(backends),
                             "--device", device], timeout_s=500)


def _check(key: str, backends=("cpu",), device="cpu") -> dict:
    r = _results(tuple(backends), device)[key]
    if r["status"] == "skip":
        pytest.skip(r["detail"])
    assert r["status"] == "pass", f"{key}: {r['detail']}"
    return json.loads(r["detail"]) if r["detail"] else {}


@pytest.mark.slow
def test_cpu_attention_32k_tokens_in_bounded_memory():
    info = _check("cpu/long_32k")
    print(f"\nL = S = 32768 bf16 causal on cpu under the cap: {info}")


def test_memory_cap_stops_an_LxS_buffer():
    _check("reference/memory_cap_premise")


@pytest.mark.parametrize("entry", OFFSET_IDS)
def test_64bit_offsets_cpu(entry):
    _check(f"cpu/{entry}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("entry", OFFSET_IDS)
def test_64bit_offsets_gpu(backend, entry):
    _check(f"{backend}/{entry}", backends=("triton", "cuda"), device="cuda")


# =============================================================================================
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--after", default=None)
    args = ap.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "1" if args.device == "cpu" else "0")
    worker(args.backends.split(","), args.device, args.after)


if __name__ == "__main__":
    main()
