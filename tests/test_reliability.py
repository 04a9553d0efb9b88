"""Reliability suite, shared part: the table of public ops, one small canonical case per op, and
the out-of-bounds check.

The other reliability files build on this table:

    test_bad_input.py     invalid calls (each must raise a clear error naming the argument) and
                          valid edge cases, run in a subprocess per backend so a crash is a failure
    test_properties.py    hypothesis: random shapes/strides/dtypes/masks/options vs the reference
    test_concurrency.py   determinism (bitwise over 20 runs) and 4 threads vs serial calls
    test_scale.py         a 32k-token CPU attention under a memory cap; 64-bit offsets
    test_distributed.py   2-process DDP through converted modules; fake-tensor/opcheck per op

Ops are looked up by name on ``fastattn`` at run time: an op that is not in the package yet skips
with a reason saying so, and the same tests cover it as soon as it lands. A backend is tested for
an op when it can run it here (the C++ extension has the op's kernel; triton is installed, in
interpreter mode on CPU, and the op's Triton module exists).

Out of bounds (xformers-style): every tensor input is carved out of a larger storage filled with
NaN (int8 operands: with -128, a value symmetric quantization never produces), and the cache
slots past ``cache_seqlens`` are NaN too. A kernel that reads one element past a tensor's extent,
ignores a stride or reads a stale cache slot puts NaN into an output or gradient (or changes an
int32 result), which the test catches.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from helpers import nan_padded

import fastattn
from fastattn.ops._backend import availability

BACKENDS = ("reference", "cpu", "triton")


@dataclass(frozen=True)
class OpInfo:
    """cpp_ops: the C++ ops whose CPU kernels this public function dispatches to (all needed for
    the "cpu" backend); triton_module: fastattn.triton.<module> holding its launchers."""

    cpp_ops: tuple[str, ...]
    triton_module: str


OPS: dict[str, OpInfo] = {
    "scaled_dot_product_attention": OpInfo(("attention_fwd", "attention_bwd"), "attention"),
    "attention_with_kvcache": OpInfo(("attention_kvcache",), "attention"),
    "layer_norm": OpInfo(("layer_norm_fwd", "layer_norm_bwd"), "layer_norm"),
    "rms_norm": OpInfo(("layer_norm_fwd", "layer_norm_bwd"), "layer_norm"),
    "quantize_per_token": OpInfo(("quantize_per_token",), "int8_gemm"),
    "quantize_per_channel": OpInfo(("quantize_per_token",), "int8_gemm"),
    "int8_gemm": OpInfo(("int8_gemm",), "int8_gemm"),
    "int8_weight_only_linear": OpInfo(("int8_weight_only_linear",), "int8_gemm"),
    "int8_linear": OpInfo(("quantize_per_token", "int8_gemm", "int8_weight_only_linear"),
                          "int8_gemm"),
    "silu_mul": OpInfo(("silu_mul_fwd", "silu_mul_bwd"), "activation"),
    # no Triton kernel: fastattn.triton.linear does not exist, the triton backend is skipped
    "linear": OpInfo(("linear",), "linear"),
    "attention_varlen": OpInfo(("attention_varlen_fwd", "attention_varlen_bwd"), "attention"),
}


@functools.cache
def op_unavailable(name: str, backend: str, device: str = "cpu") -> str | None:
    """None when ``fastattn.<name>`` exists and ``backend`` can run it on ``device`` here, else
    the reason (used as the skip reason)."""
    if not hasattr(fastattn, name):
        return f"fastattn.{name} is missing: the function is not in the package yet"
    info = OPS[name]
    if backend in ("cpu", "cuda"):
        for cpp in info.cpp_ops:
            why = availability(backend, device, cpp)
            if why is not None:
                return why
        return None
    why = availability(backend, device)
    if why is None and backend == "triton":
        if importlib.util.find_spec(f"fastattn.triton.{info.triton_module}") is None:
            why = f"fastattn.triton.{info.triton_module} is missing"
    return why


def need_op(name: str, backend: str, device: str = "cpu") -> None:
    why = op_unavailable(name, backend, device)
    if why is not None:
        pytest.skip(f"{name} on backend {backend!r}: {why}")


def op_backend_params(names=None, backends=BACKENDS):
    """pytest params (op, backend) with readable ids; skipping happens inside the test so that the
    reason is reported."""
    names = list(OPS) if names is None else names
    return [pytest.param(n, b, id=f"{n}-{b}") for n in names for b in backends]


def run_entry_script(cmd: list[str], *, timeout_s: float, env: dict | None = None) -> dict:
    """Run a script that prints ``START <id>`` before and ``RESULT <json>`` after each entry
    (tests/_bad_input_catalogue.py, tests/test_scale.py) and accepts ``--after <id>``. An entry
    that kills the process (segfault, abort) or hangs is recorded as failed and the run
    resumes after it. Returns {id: {"status", "detail"}}."""
    results: dict[str, dict] = {}
    after = None
    while True:
        full = cmd + (["--after", after] if after is not None else [])
        try:
            proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout_s, env=env)
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err, rc = f"timed out after {timeout_s} s", "timeout"
        started = None
        for line in out.splitlines():
            if line.startswith("START "):
                started = line[6:]
            elif line.startswith("RESULT "):
                r = json.loads(line[7:])
                results[r["id"]] = r
                started = None
        if rc == 0:
            return results
        if started is None:
            raise RuntimeError(f"{cmd[1]} failed outside an entry (rc {rc}):\n{err[-3000:]}")
        results[started] = {"id": started, "status": "fail",
                            "detail": f"the process died in this entry (rc {rc}): {err[-1500:]}"}
        after = started


# ---------------------------------------------------------------------------------------------
# one canonical case per op
# ---------------------------------------------------------------------------------------------
def int8_padded(t: torch.Tensor, pad: int = 3, fill: int = -128) -> torch.Tensor:
    """nan_padded for integer tensors (int8 operands, int32 cache_seqlens): the surrounding
    storage holds ``fill``, a value no valid read should see."""
    shape = list(t.shape)
    big = torch.full([s + pad for s in shape[:-1]] + [shape[-1] + 2 * pad], fill,
                     dtype=t.dtype, device=t.device)
    view = big[tuple(slice(0, s) for s in shape[:-1]) + (slice(pad, pad + shape[-1]),)]
    view.copy_(t)
    return view


def _padded(t: torch.Tensor) -> torch.Tensor:
    return nan_padded(t) if t.is_floating_point() else int8_padded(t)


@dataclass
class Case:
    """One call of a public op: ``run(inputs, backend)`` returns its output tensors. ``grad``
    names the inputs that receive a gradient (from the loss sum(out * fixed random weights));
    ``mutated`` names inputs the op writes (the KV caches), reported as outputs too."""

    op: str
    make: Callable[[], dict[str, torch.Tensor]]
    run: Callable[[dict, str], tuple[torch.Tensor, ...]]
    grad: tuple[str, ...] = ()
    mutated: tuple[str, ...] = ()
    kwargs: dict = field(default_factory=dict)

    def inputs(self, padded: bool = False) -> dict[str, torch.Tensor]:
        """Fresh inputs with the same values every call; ``padded`` carves each tensor out of a
        NaN (int8: -128) filled storage."""
        ins = self.make()
        if padded:
            ins = {k: _padded(v) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                   for k, v in ins.items()}
        return ins

    def evaluate(self, backend: str, inputs: dict | None = None, *,
                 grad: bool = True) -> list[torch.Tensor]:
        """Outputs, mutated inputs and gradients of one call, as a flat list."""
        ins = self.inputs() if inputs is None else inputs
        leaves = [ins[n] for n in self.grad] if grad else []
        for t in leaves:
            t.requires_grad_(True)
        outs = [o for o in self.run(ins, backend) if isinstance(o, torch.Tensor)]
        results = [o.detach() for o in outs] + [ins[n].detach().clone() for n in self.mutated]
        if leaves:
            gen = torch.Generator().manual_seed(7)
            loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum()
                       for o in outs if o.is_floating_point() and o.requires_grad)
            grads = torch.autograd.grad(loss, leaves)
            results += [g.detach() for g in grads]
        return results


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(shape, generator=_gen(seed)) * scale).to(dtype)


def _randint8(*shape, seed=0):
    return torch.randint(-127, 128, shape, generator=_gen(seed), dtype=torch.int8)


def make_case(op: str, dtype: torch.dtype = torch.float32, seed: int = 0,
              large: bool = False) -> Case:
    """The canonical small case of ``op``: odd sizes, every optional input used, GQA and a float
    mask receiving a gradient for attention, a fused residual for the norms. ``seed`` changes
    the values, not the shapes; ``large`` makes the attention sequences span many kernel blocks
    (where parallel reductions could make results depend on scheduling)."""
    fa = fastattn
    s0 = 1000 * seed  # per-tensor generator seeds are s0 + 1, s0 + 2, ...
    if op == "scaled_dot_product_attention":
        B, H, Hkv, L, S, E = (2, 4, 2, 160, 257, 40) if large else (2, 4, 2, 13, 21, 40)

        def make():
            return {"q": _randn(B, H, L, E, dtype=dtype, seed=s0 + 1),
                    "k": _randn(B, Hkv, S, E, dtype=dtype, seed=s0 + 2),
                    "v": _randn(B, Hkv, S, E, dtype=dtype, seed=s0 + 3),
                    "mask": _randn(B, 1, L, S, dtype=dtype, seed=s0 + 4)}

        def run(t, backend):
            return fa.scaled_dot_product_attention(
                t["q"], t["k"], t["v"], t["mask"], is_causal=True, enable_gqa=True,
                causal_alignment="bottom_right", return_lse=True, backend=backend)

        return Case(op, make, run, grad=("q", "k", "v", "mask"))
    if op == "attention_with_kvcache":
        B, H, Hkv, cap, Lq, E = 2, 4, 2, 32, 3, 40
        seqlens = [5, 17]

        def make():
            kc = _randn(B, Hkv, cap, E, dtype=dtype, seed=s0 + 5)
            vc = _randn(B, Hkv, cap, E, dtype=dtype, seed=s0 + 6)
            return {"q": _randn(B, H, Lq, E, dtype=dtype, seed=s0 + 1), "k_cache": kc,
                    "v_cache": vc, "cache_seqlens": torch.tensor(seqlens, dtype=torch.int32),
                    "k_new": _randn(B, Hkv, Lq, E, dtype=dtype, seed=s0 + 2),
                    "v_new": _randn(B, Hkv, Lq, E, dtype=dtype, seed=s0 + 3)}

        def run(t, backend):
            return (fa.attention_with_kvcache(t["q"], t["k_cache"], t["v_cache"],
                                              t["cache_seqlens"], t["k_new"], t["v_new"],
                                              backend=backend),)

        return Case(op, make, run, mutated=("k_cache", "v_cache"),
                    kwargs={"seqlens": seqlens, "new": Lq})
    if op in ("layer_norm", "rms_norm"):
        shape, N = (2, 7, 96), 96

        def make():
            ins = {"x": _randn(*shape, dtype=dtype, seed=s0 + 1),
                   "residual": _randn(*shape, dtype=dtype, seed=s0 + 2),
                   "weight": _randn(N, dtype=dtype, seed=s0 + 3, scale=0.5) + 1}
            if op == "layer_norm":
                ins["bias"] = _randn(N, dtype=dtype, seed=s0 + 4)
            return ins

        def run(t, backend):
            if op == "layer_norm":
                return fa.layer_norm(t["x"], (N,), t["weight"], t["bias"], 1e-5,
                                     residual=t["residual"], backend=backend)
            return fa.rms_norm(t["x"], (N,), t["weight"], 1e-6, residual=t["residual"],
                               backend=backend)

        grads = ("x", "residual", "weight") + (("bias",) if op == "layer_norm" else ())
        return Case(op, make, run, grad=grads)
    if op in ("quantize_per_token", "quantize_per_channel"):
        M, K = (7, 96) if op == "quantize_per_token" else (24, 96)

        def make():
            x = _randn(M, K, dtype=dtype, seed=s0 + 1, scale=3.0)
            x[0] = 0  # a zero row: scale 0, q 0
            return {"x": x}

        def run(t, backend):
            return getattr(fa, op)(t["x"], backend=backend)

        return Case(op, make, run)
    if op == "int8_gemm":
        M, N, K = 9, 24, 96

        def make():
            return {"a": _randint8(M, K, seed=s0 + 1), "b": _randint8(N, K, seed=s0 + 2),
                    "a_scale": _randn(M, seed=s0 + 3).abs() / 100, "b_scale": _randn(N, seed=s0 + 4).abs() / 100,
                    "bias": _randn(N, seed=s0 + 5)}

        def run(t, backend):
            acc = fa.int8_gemm(t["a"], t["b"], backend=backend)
            deq = fa.int8_gemm(t["a"], t["b"], t["a_scale"], t["b_scale"], t["bias"],
                               out_dtype=dtype, backend=backend)
            return acc, deq

        return Case(op, make, run)
    if op in ("int8_linear", "int8_weight_only_linear"):
        N, K = 24, 96

        def make():
            w = _randn(N, K, seed=s0 + 2)
            w_scale = w.abs().amax(1) / 127
            w_int8 = torch.round(w / w_scale[:, None]).clamp(-127, 127).to(torch.int8)
            # M = 9 takes int8_linear's W8A8 path, M = 2 its weight-only path
            return {"x": _randn(9, K, dtype=dtype, seed=s0 + 1), "x_small": _randn(2, K, dtype=dtype, seed=s0 + 4),
                    "w_int8": w_int8, "w_scale": w_scale, "bias": _randn(N, seed=s0 + 3)}

        def run(t, backend):
            f = getattr(fa, op)
            return tuple(f(x, t["w_int8"], t["w_scale"], t["bias"], backend=backend)
                         for x in (t["x"], t["x_small"]))

        return Case(op, make, run)
    if op == "silu_mul":
        # I = 37 leaves vector tails; large: rows of 4100 (more than one CPU piece), threaded
        shape = (4, 9, 2 * 4100) if large else (2, 7, 2 * 37)

        def make():
            return {"x": _randn(*shape, dtype=dtype, seed=s0 + 1, scale=3.0)}

        def run(t, backend):
            return (fa.silu_mul(t["x"], backend=backend),)

        return Case(op, make, run, grad=("x",))
    if op == "linear":
        # M = 3 rows: the weight-streaming kernel (K = 37 leaves vector tails); large: M = 24 rows
        # take at::linear inside the op
        M, K, N = (24, 300, 70) if large else (3, 37, 21)

        def make():
            return {"x": _randn(M, K, dtype=dtype, seed=s0 + 1),
                    "weight": _randn(N, K, dtype=dtype, seed=s0 + 2, scale=K ** -0.5),
                    "bias": _randn(N, dtype=dtype, seed=s0 + 3)}

        def run(t, backend):
            return (fa.linear(t["x"], t["weight"], t["bias"], backend=backend),)

        return Case(op, make, run, grad=("x", "weight", "bias"))
    if op == "attention_varlen":
        # sequences (query rows, keys): an empty one, a single row, L != S both ways; large:
        # sequences spanning several kernel blocks
        lens = ([(70, 90), (0, 5), (1, 1), (100, 66)] if large
                else [(5, 9), (0, 3), (1, 1), (13, 4)])
        H, Hkv, E = 4, 2, 40
        cu_q = torch.tensor([0] + torch.tensor([a for a, _ in lens]).cumsum(0).tolist(),
                            dtype=torch.int32)
        cu_k = torch.tensor([0] + torch.tensor([s for _, s in lens]).cumsum(0).tolist(),
                            dtype=torch.int32)
        max_q, max_k = max(a for a, _ in lens), max(s for _, s in lens)

        def make():
            return {"q": _randn(int(cu_q[-1]), H, E, dtype=dtype, seed=s0 + 1),
                    "k": _randn(int(cu_k[-1]), Hkv, E, dtype=dtype, seed=s0 + 2),
                    "v": _randn(int(cu_k[-1]), Hkv, E, dtype=dtype, seed=s0 + 3),
                    "cu_seqlens_q": cu_q.clone(), "cu_seqlens_k": cu_k.clone(),
                    "sinks": _randn(H, seed=s0 + 4)}

        def run(t, backend):
            return fa.attention_varlen(t["q"], t["k"], t["v"], t["cu_seqlens_q"],
                                       t["cu_seqlens_k"], max_q, max_k, is_causal=True,
                                       causal_alignment="bottom_right", window=(7, -1),
                                       sinks=t["sinks"], return_lse=True, backend=backend)

        return Case(op, make, run, grad=("q", "k", "v", "sinks"))
    raise KeyError(op)


# ---------------------------------------------------------------------------------------------
# out of bounds
# ---------------------------------------------------------------------------------------------
def _poison_cache_tail(case: Case, caches: dict) -> None:
    """NaN in every KV-cache slot a correct kernel must not read (past seqlens + new tokens)."""
    for name in ("k_cache", "v_cache"):
        if name in caches:
            for b, n in enumerate(case.kwargs["seqlens"]):
                caches[name][b, :, n + case.kwargs["new"]:] = float("nan")


def _oob_params():
    # attention under the Triton interpreter in bf16 only: its fp32 path is the same kernel
    return [pytest.param(op, b, dt, id=f"{op}-{b}-{str(dt)[6:]}")
            for op in OPS for b in BACKENDS for dt in (torch.float32, torch.bfloat16)
            if not (b == "triton" and dt == torch.float32
                    and op in ("scaled_dot_product_attention", "attention_with_kvcache",
                               "attention_varlen"))]


@pytest.mark.parametrize("op,backend,dtype", _oob_params())
def test_out_of_bounds_reads(op, backend, dtype):
    need_op(op, backend)
    case = make_case(op, dtype)
    ins = case.inputs(padded=True)
    kv = case.op == "attention_with_kvcache"
    if kv:
        _poison_cache_tail(case, ins)
    got = case.evaluate(backend, ins)
    # the same call on contiguous inputs: the padding must not change any value
    want = case.evaluate(backend)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if kv and i > 0:  # the updated caches, whose poisoned tail is expected
            w = w.clone()
            _poison_cache_tail(case, {("k_cache", "v_cache")[i - 1]: w})
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
            continue
        assert not (g.is_floating_point() and torch.isnan(g).any()), \
            f"{op}/{backend}: NaN in result[{i}] (an out-of-bounds read)"
        if g.is_floating_point():
            # strided and contiguous layouts may take different (equally valid) code paths
            tol = 1e-5 if g.dtype == torch.float32 else 2e-2
            torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol,
                                       msg=lambda m, i=i: f"{op}/{backend} result[{i}]: {m}")
        else:
            assert torch.equal(g, w), f"{op}/{backend}: result[{i}] differs on padded inputs"


def test_case_table_covers_every_public_op():
    """Every public op of the package is in OPS (a new op must be added to the suite)."""
    public = {n for n in getattr(fastattn, "__all__", [])
              if callable(getattr(fastattn, n, None)) and n not in ("backends",)}
    missing = public - set(OPS)
    assert not missing, f"public ops without reliability coverage: {sorted(missing)}"
    for op in OPS:
        if hasattr(fastattn, op):  # the canonical case builds and names real inputs
            case = make_case(op)
            ins = case.inputs()
            assert set(case.grad) | set(case.mutated) <= set(ins), op
