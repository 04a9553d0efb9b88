"""Distributed training through converted modules, and fake-tensor support of every op.

DDP: two processes (gloo, CPU, started as subprocesses sharing a file store) each wrap a
small ``nn.TransformerEncoder`` converted by ``fastattn.convert`` and the same unconverted model
in ``DistributedDataParallel``, feed a different batch per rank (causal float mask, padding
mask), and take one training step. The converted model's loss and its all-reduced gradients
are held to the correctness rule (docs/design.md) against the unconverted model in float64 (the oracle) with the
unconverted float32 model as the low-precision baseline, and both ranks must hold identical
gradients. It runs with ``backend="auto"`` (what a user gets) and, where it runs here, with the
Triton kernels.

Fake tensors: every ``fastattn::*`` operator that a public call dispatches to (forward and
backward, on each backend that runs here) is recorded with its real arguments and checked with
``torch.library.opcheck`` (schema, fake implementation, autograd registration); the public
functions also run under ``FakeTensorMode`` and must give the shapes, dtypes and strides of the
eager call.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fastattn

SCRIPT = str(Path(__file__).resolve())
WORLD = 2


# =============================================================================================
# DDP (each rank is a subprocess running this file)
# =============================================================================================
def _set_backend(model, backend: str) -> int:
    n = 0
    for m in model.modules():
        if type(m).__module__.startswith("fastattn.") and hasattr(m, "backend"):
            m.backend = backend
            n += 1
    return n


def _ddp_rank(rank: int, store_path: str, backends: list[str], out_path: str) -> None:
    import torch
    import torch.distributed as dist
    from helpers import assert_close_rule
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fastattn

    torch.set_num_threads(1)  # two ranks share the machine's cores
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    try:
        torch.manual_seed(0)  # the same initial weights on every rank
        layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0,
                                           batch_first=True)
        base = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        B, L = 3, 11
        g = torch.Generator().manual_seed(100 + rank)  # a different batch per rank
        x = torch.randn(B, L, 32, generator=g)
        w = torch.randn(B, L, 32, generator=g)
        causal = nn.Transformer.generate_square_subsequent_mask(L)
        pad = torch.zeros(B, L, dtype=torch.bool)
        pad[1, -3:] = True  # padding at the end of sequence 1

        def step(model, dtype):
            model = DDP(model.to(dtype))
            out = model(x.to(dtype), mask=causal.to(dtype), src_key_padding_mask=pad,
                        is_causal=True)
            loss = (out * w.to(dtype)).sum() / out.numel()
            loss.backward()
            grads = {n: p.grad.detach().clone() for n, p in model.module.named_parameters()}
            return loss.detach(), grads

        loss_hi, grads_hi = step(copy.deepcopy(base), torch.float64)
        loss_lo, grads_lo = step(copy.deepcopy(base), torch.float32)
        report = {}
        for backend in backends:
            converted = fastattn.convert(copy.deepcopy(base))
            n = _set_backend(converted, backend)
            kinds = sorted({type(m).__name__ for m in converted.modules()
                            if type(m).__module__.startswith("fastattn.")})
            loss, grads = step(converted, torch.float32)
            assert_close_rule(loss, loss_hi, loss_lo, name=f"{backend}: loss")
            assert grads.keys() == grads_hi.keys()
            for name in grads:
                assert_close_rule(grads[name], grads_hi[name], grads_lo[name], factor=3.0,
                                  name=f"{backend}: grad {name}")
            # DDP averaged the gradients: every rank holds the same ones, bit for bit
            flat = torch.cat([grads[k].reshape(-1) for k in sorted(grads)])
            gathered = [torch.empty_like(flat) for _ in range(WORLD)]
            dist.all_gather(gathered, flat)
            assert all(torch.equal(gathered[0], t) for t in gathered), "ranks disagree"
            report[backend] = {"fastattn_modules": kinds, "modules_with_backend": n,
                               "loss": loss.item(), "loss_ref": loss_hi.item()}
        if rank == 0:
            Path(out_path).write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def test_ddp_step_converted_matches_unconverted(tmp_path):
    import fastattn

    try:
        fastattn.convert  # noqa: B018
    except (ImportError, AttributeError) as e:
        pytest.skip(f"fastattn.convert is missing: the function is not in the package yet ({e})")
    from test_reliability import op_unavailable

    backends = ["auto"]
    if op_unavailable("scaled_dot_product_attention", "triton") is None:
        backends.append("triton")
    out = tmp_path / "report.json"
    procs = [subprocess.Popen([sys.executable, SCRIPT, "--rank", str(rank), "--store",
                               str(tmp_path / "store"), "--backends", ",".join(backends),
                               "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(WORLD)]
    errors = []
    try:
        for rank, p in enumerate(procs):
            _, err = p.communicate(timeout=400)
            if p.returncode != 0:
                errors.append(f"rank {rank} (rc {p.returncode}):\n{err[-3000:]}")
    finally:
        for p in procs:  # a rank stuck in a collective after its peer failed
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not errors, "DDP step failed:\n" + "\n".join(errors)
    report = json.loads(out.read_text())
    print("\n" + json.dumps(report, indent=1))
    for backend in backends:
        assert "MultiheadAttention" in report[backend]["fastattn_modules"], report
        assert report[backend]["modules_with_backend"] >= 2, report


# =============================================================================================
# fake tensors / opcheck
# =============================================================================================
def _record_fastattn_ops(fn):
    """Run fn() and return [(op, args, kwargs)] of every fastattn::* op it dispatched, with the
    tensor arguments copied (strides kept) before the op ran (some ops update their inputs)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map

    def snapshot(t):
        if not isinstance(t, torch.Tensor):
            return t
        # a copy of the whole storage viewed the same way: expanded (stride 0) arguments stay so
        storage = t.untyped_storage()
        copy_ = torch.empty(0, dtype=t.dtype, device=t.device)
        copy_.set_(type(storage)(storage.nbytes(), device=t.device).copy_(storage),
                   t.storage_offset(), t.shape, t.stride())
        return copy_

    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "fastattn":
                calls.append((func, tree_map(snapshot, args), tree_map(snapshot, kwargs)))
            return func(*args, **kwargs)

    with Record():
        fn()
    return calls


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("op", ["scaled_dot_product_attention", "attention_with_kvcache",
                                "layer_norm", "rms_norm", "quantize_per_token",
                                "quantize_per_channel", "int8_gemm", "int8_weight_only_linear",
                                "int8_linear", "silu_mul", "attention_varlen"])
def test_opcheck_recorded_ops(op, backend):
    import torch
    from test_reliability import make_case, need_op

    need_op(op, backend)
    case = make_case(op, torch.float32)
    calls = _record_fastattn_ops(lambda: case.evaluate(backend))
    assert calls, f"{op}/{backend} dispatched no fastattn op"
    seen = set()
    for func, args, kwargs in calls:
        key = (str(func), tuple(a.shape if isinstance(a, torch.Tensor)
                                else tuple(a) if isinstance(a, list) else a for a in args))
        if key in seen:
            continue
        seen.add(key)
        torch.library.opcheck(func, args, kwargs,
                              test_utils=("test_schema", "test_faketensor",
                                          "test_autograd_registration"))


# Ops that check values on the host (CPU tensors only, by design): a fake tensor has no values.
_HOST_VALUE_CHECKS = {
    "attention_with_kvcache": "cache_seqlens bounds are checked on the host for CPU tensors",
    "int8_gemm": "non-finite scales are checked on the host for CPU tensors",
    "int8_weight_only_linear": "a non-finite w_scale is checked on the host for CPU tensors",
    "int8_linear": "a non-finite w_scale is checked on the host for CPU tensors",
}


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("op", ["scaled_dot_product_attention", "attention_with_kvcache",
                                "layer_norm", "rms_norm", "quantize_per_token",
                                "quantize_per_channel", "int8_gemm", "int8_weight_only_linear",
                                "int8_linear", "silu_mul", "attention_varlen"])
def test_public_function_under_fake_tensor_mode(op, backend):
    import torch
    from test_reliability import make_case, need_op
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    need_op(op, backend)
    case = make_case(op, torch.float32)
    eager = case.evaluate(backend, grad=False)
    ins = case.inputs()
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake_ins = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v
                    for k, v in ins.items()}
        try:
            fake = case.evaluate(backend, fake_ins, grad=False)
        except DataDependentOutputException as e:
            if op not in _HOST_VALUE_CHECKS:
                raise
            pytest.skip(f"{_HOST_VALUE_CHECKS[op]} (by design): {e}")
    assert len(fake) == len(eager)
    for i, (f, e) in enumerate(zip(fake, eager, strict=True)):
        assert (f.shape, f.dtype, f.stride()) == (e.shape, e.dtype, e.stride()), \
            f"{op}/{backend} result[{i}]: fake {f.shape} {f.dtype} {f.stride()} vs eager " \
            f"{e.shape} {e.dtype} {e.stride()}"


# =============================================================================================
def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--backends", default="auto")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        _ddp_rank(args.rank, args.store, args.backends.split(","), args.out)
    except Exception:
        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    main()
