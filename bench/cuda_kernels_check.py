"""Checks and times the CUDA kernels of fastattn._C on a GPU (run by bench/gpu_check_cuda.sh).

Every op with a CUDA kernel in csrc/cuda runs through ``torch.ops.fastattn`` on CUDA tensors and
is compared with ``fastattn.reference`` in float64 by the correctness rule (docs/design.md) (max|out - ref| <=
2 * max|torch_lowp - ref| + eps, 3x for gradients; int8 results exact), then timed against its
PyTorch baseline with torch.cuda.Event (interleaved rounds, median). Each case is recorded as
ok / FAIL / ERROR and the run goes on. Results: <out>/cuda_kernels_check.json and .md, written
after every section so a timeout keeps what was measured.

    python bench/cuda_kernels_check.py --out bench/results/h200
    python bench/cuda_kernels_check.py --out /tmp/s --sanitize   # tiny cases, no timing

FASTATTN_CHECK_DEVICE=cpu runs the same checks on another backend's CPU kernels (a dry run of
this script on a machine without a GPU; no timings).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastattn import reference  # noqa: E402
from tests.helpers import assert_close_rule  # noqa: E402

DEV = os.environ.get("FASTATTN_CHECK_DEVICE", "cuda")
KEY = "CUDA" if DEV == "cuda" else "CPU"
OPS = ("attention_fwd", "attention_bwd", "attention_kvcache", "layer_norm_fwd", "layer_norm_bwd",
       "quantize_per_token", "int8_gemm", "int8_weight_only_linear")


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


class Report:
    def __init__(self, out: Path, sanitize: bool):
        self.out = out
        self.sanitize = sanitize
        self.data = {"env": {}, "checks": [], "timings": [], "started": time.time()}

    def check(self, name: str, fn) -> None:
        t = time.time()
        try:
            fn()
            status, detail = "ok", ""
        except AssertionError as e:
            status, detail = "FAIL", str(e)[:2000]
        except Exception as e:  # a crash of one case must not stop the others
            status, detail = "ERROR", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
        try:
            sync()
        except Exception as e:  # a sticky launch error surfaces here
            status, detail = "ERROR", f"{type(e).__name__}: {e}"[:2000]
        self.data["checks"].append({"name": name, "status": status, "detail": detail,
                                    "seconds": round(time.time() - t, 3)})
        print(f"[{status:5s}] {name}" + (f"\n        {detail.splitlines()[0]}" if detail else ""),
              flush=True)

    def timing(self, rec: dict) -> None:
        self.data["timings"].append(rec)
        print("  " + rec["name"] + ": " + ", ".join(
            f"{k} {v['ms']:.3f} ms" for k, v in rec["impls"].items() if "ms" in v), flush=True)

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.data["seconds"] = round(time.time() - self.data["started"], 1)
        suffix = "_sanitize" if self.sanitize else ""
        (self.out / f"cuda_kernels_check{suffix}.json").write_text(json.dumps(self.data, indent=1))
        lines = ["# CUDA kernels check", "", f"device: {self.data['env'].get('device')}, "
                 f"torch {self.data['env'].get('torch')}, {self.data['seconds']} s", ""]
        n_ok = sum(c["status"] == "ok" for c in self.data["checks"])
        lines += [f"## Correctness ({n_ok}/{len(self.data['checks'])} ok)", "",
                  "| case | status | detail |", "|---|---|---|"]
        for c in self.data["checks"]:
            d = c["detail"].splitlines()[0][:160] if c["detail"] else ""
            lines.append(f"| {c['name']} | {c['status']} | {d.replace('|', '/')} |")
        if self.data["timings"]:
            lines += ["", "## Timings (median of interleaved rounds; speed-up = baseline / ours)",
                      "", "| case | ours (ms) | baseline | baseline (ms) | speed-up | ours rate |",
                      "|---|---|---|---|---|---|"]
            for t in self.data["timings"]:
                ours = t["impls"].get("fastattn.cuda", {})
                for bname, b in t["impls"].items():
                    if bname == "fastattn.cuda":
                        continue
                    sp = (b["ms"] / ours["ms"]) if "ms" in b and "ms" in ours else float("nan")
                    rate = t.get("rate", "")
                    lines.append(f"| {t['name']} | {ours.get('ms', float('nan')):.3f} | {bname} | "
                                 f"{b.get('ms', float('nan')):.3f} | {sp:.2f}x | {rate} |")
        (self.out / f"cuda_kernels_check{suffix}.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# correctness
# ---------------------------------------------------------------------------------------------
def window_args(L, S, causal, window, align):
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right, (0 if align == "top_left" else S - L)


def sdpa_lowp(q, k, v, mask, causal, window, align, scale):
    L, S = q.shape[2], k.shape[2]
    vis = reference.visible_keys(L, S, is_causal=causal, window=window, causal_alignment=align,
                                 device=q.device)
    m = mask
    if vis is not None:
        add = torch.zeros(L, S, dtype=q.dtype, device=q.device).masked_fill(~vis, float("-inf"))
        m = add if m is None else m + add
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=True)


def attn_inputs(B, H, Hkv, L, S, E, Ev, dtype, masked, layout):
    if layout == "bshd":  # (B, L, H, E) memory seen as (B, H, L, E): strided, last dim contiguous
        q = torch.randn(B, L, H, E, dtype=dtype, device=DEV).transpose(1, 2)
        k = torch.randn(B, S, Hkv, E, dtype=dtype, device=DEV).transpose(1, 2)
        v = torch.randn(B, S, Hkv, Ev, dtype=dtype, device=DEV).transpose(1, 2)
    else:
        q = torch.randn(B, H, L, E, dtype=dtype, device=DEV)
        k = torch.randn(B, Hkv, S, E, dtype=dtype, device=DEV)
        v = torch.randn(B, Hkv, S, Ev, dtype=dtype, device=DEV)
    mask = torch.randn(B, H, L, S, dtype=dtype, device=DEV) if masked else None
    return q, k, v, mask


ATTN = [
    # B, H, Hkv, L, S, E, Ev, causal, window, alignment, mask, layout
    (2, 4, 4, 128, 128, 64, 64, False, None, "top_left", False, "bhsd"),
    (1, 4, 2, 113, 1023, 128, 128, True, None, "bottom_right", False, "bhsd"),
    (3, 2, 2, 17, 33, 40, 40, False, (5, 3), "top_left", True, "bhsd"),
    (1, 2, 1, 1, 17, 256, 256, False, None, "top_left", False, "bshd"),
    (2, 2, 2, 200, 150, 111, 111, True, None, "top_left", True, "bhsd"),
    (1, 2, 2, 70, 33, 80, 80, True, None, "bottom_right", False, "bshd"),
    (1, 3, 1, 64, 257, 96, 64, False, (-1, 31), "top_left", False, "bhsd"),
]
TINY_ATTN = [(1, 2, 1, 33, 47, 64, 64, True, None, "bottom_right", True, "bhsd"),
             (1, 1, 1, 9, 20, 40, 40, False, None, "top_left", False, "bshd")]


def check_attention(rep: Report, cases, dtypes) -> None:
    ops = torch.ops.fastattn
    for dtype in dtypes:
        for c in cases:
            B, H, Hkv, L, S, E, Ev, causal, window, align, masked, layout = c
            name = (f"attention {str(dtype)[6:]} B{B} H{H}/{Hkv} L{L} S{S} E{E}/{Ev} "
                    f"{'causal ' if causal else ''}{window or ''} {align} "
                    f"{'mask ' if masked else ''}{layout}")
            q, k, v, mask = attn_inputs(B, H, Hkv, L, S, E, Ev, dtype, masked, layout)
            scale = 1.0 / math.sqrt(E)
            wl, wr, diag = window_args(L, S, causal, window, align)
            state = {}

            def fwd(q=q, k=k, v=v, mask=mask, scale=scale, wl=wl, wr=wr, diag=diag, causal=causal,
                    window=window, align=align, state=state):
                out, lse = ops.attention_fwd(q, k, v, mask, scale, wl, wr, diag, 0.0, 0)
                state["out"], state["lse"] = out, lse
                ref, ref_lse = reference.scaled_dot_product_attention(
                    q.double(), k.double(), v.double(),
                    mask.double() if mask is not None else None, is_causal=causal, scale=scale,
                    enable_gqa=True, window=window, causal_alignment=align, return_lse=True)
                assert_close_rule(out, ref, sdpa_lowp(q, k, v, mask, causal, window, align, scale))
                assert_close_rule(lse, ref_lse.float(), ref_lse.float(), eps=1e-3, name="lse")

            def bwd(q=q, k=k, v=v, mask=mask, scale=scale, wl=wl, wr=wr, diag=diag, causal=causal,
                    window=window, align=align, state=state):
                out, lse = state["out"], state["lse"]
                do = torch.randn_like(out)
                glse = torch.randn(lse.shape, device=DEV)
                got = ops.attention_bwd(do, q, k, v, out, lse, glse, mask, scale, wl, wr, diag, 0.0,
                                        0, mask is not None, True)
                again = ops.attention_bwd(do, q, k, v, out, lse, glse, mask, scale, wl, wr, diag,
                                          0.0, 0, mask is not None, True)
                assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True)), (
                    "attention_bwd is not bitwise repeatable")

                def grads(dt):
                    qq, kk, vv = (x.detach().to(dt).requires_grad_() for x in (q, k, v))
                    mm = mask.detach().to(dt).requires_grad_() if mask is not None else None
                    o, lse_ = reference.scaled_dot_product_attention(
                        qq, kk, vv, mm, is_causal=causal, scale=scale, enable_gqa=True,
                        window=window, causal_alignment=align, return_lse=True)
                    loss = (o * do.to(dt)).sum()
                    loss = loss + (torch.where(torch.isfinite(lse_), lse_, 0.0) * glse.to(dt)).sum()
                    ins = [qq, kk, vv] + ([mm] if mm is not None else [])
                    return torch.autograd.grad(loss, ins)

                for n, g, h, lo in zip(("dq", "dk", "dv", "dmask"), got, grads(torch.float64),
                                       grads(q.dtype), strict=False):
                    assert_close_rule(g, h, lo, factor=3.0, name=n)

            rep.check("fwd " + name, fwd)
            if "out" in state:
                rep.check("bwd " + name, bwd)


def check_public_api(rep: Report) -> None:
    """The public function with backend='cuda' (the op layer's registration and autograd)."""
    import fastattn

    def run():
        q, k, v, _ = attn_inputs(2, 4, 2, 77, 77, 64, 64, torch.bfloat16, False, "bhsd")
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                    backend="cuda")
        out.sum().backward()
        ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                     is_causal=True, enable_gqa=True)
        low = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        assert_close_rule(out, ref, low)
        assert q.grad is not None and torch.isfinite(q.grad).all()

    rep.check("public scaled_dot_product_attention(backend='cuda') fwd+bwd", run)


KV = [  # B, H, Hkv, Lq, capacity, E, seqlens, new tokens, causal
    (2, 8, 2, 1, 4096, 128, [4000, 17], True, True),
    (3, 6, 3, 4, 300, 80, [0, 150, 296], True, True),
    (1, 4, 4, 3, 64, 40, [20], False, False),
    (4, 32, 8, 1, 8192, 64, [8191, 1, 5000, 0], True, True),
]


def check_kvcache(rep: Report, cases, dtypes) -> None:
    for dtype in dtypes:
        for B, H, Hkv, Lq, cap, E, seqlens, new, causal in cases:
            def run(B=B, H=H, Hkv=Hkv, Lq=Lq, cap=cap, E=E, seqlens=seqlens, new=new,
                    causal=causal, dtype=dtype):
                q = torch.randn(B, H, Lq, E, dtype=dtype, device=DEV)
                kc = torch.randn(B, Hkv, cap, E, dtype=dtype, device=DEV)
                vc = torch.randn(B, Hkv, cap, E, dtype=dtype, device=DEV)
                kn = torch.randn(B, Hkv, Lq, E, dtype=dtype, device=DEV) if new else None
                vn = torch.randn(B, Hkv, Lq, E, dtype=dtype, device=DEV) if new else None
                sl = torch.tensor(seqlens, dtype=torch.int32, device=DEV)
                k0, v0 = kc.clone(), vc.clone()
                scale = 1.0 / math.sqrt(E)
                out = torch.ops.fastattn.attention_kvcache(q, kc, vc, sl, kn, vn, scale, causal)
                k1, v1 = k0.clone(), v0.clone()
                low = reference.attention_with_kvcache(q, k1, v1, sl, kn, vn, scale=scale,
                                                       causal=causal)
                assert torch.equal(kc, k1) and torch.equal(vc, v1), "cache update differs"
                hi = reference.attention_with_kvcache(
                    q.double(), k0.double(), v0.double(), sl, kn.double() if new else None,
                    vn.double() if new else None, scale=scale, causal=causal)
                assert_close_rule(out, hi, low)

            rep.check(f"kvcache {str(dtype)[6:]} B{B} H{H}/{Hkv} Lq{Lq} cap{cap} E{E} {seqlens} "
                      f"{'new ' if new else ''}{'causal' if causal else ''}", run)


LN = [  # M, N, rms, residual, float32 params, strided rows
    (64, 1024, False, False, False, False), (33, 4096, False, True, False, False),
    (17, 8192, True, False, True, False), (5, 32768, False, True, False, False),
    (9, 333, True, True, False, False), (7, 3000, False, False, False, True),
    (3, 65536, False, False, False, False),
]


def check_layer_norm(rep: Report, cases, dtypes) -> None:
    ops = torch.ops.fastattn
    for dtype in dtypes:
        for M, N, rms, residual, pf32, strided in cases:
            def run(M=M, N=N, rms=rms, residual=residual, pf32=pf32, strided=strided, dtype=dtype):
                eps = 1e-6 if rms else 1e-5
                x = torch.randn(M, N + (8 if strided else 0), dtype=dtype, device=DEV)[:, :N]
                r = torch.randn(M, N, dtype=dtype, device=DEV) if residual else None
                pdt = torch.float32 if pf32 else dtype
                w = torch.randn(N, dtype=pdt, device=DEV)
                b = None if rms else torch.randn(N, dtype=pdt, device=DEV)
                out, rout, mean, rstd = ops.layer_norm_fwd(x, w, b, r, eps, rms)
                xs = x + r if residual else x
                if residual:
                    assert torch.equal(rout, xs), "residual_out != input + residual"

                def norm(xx, ww, bb):
                    if xx.dtype == torch.float64:
                        return (reference.rms_norm(xx, (N,), ww, eps) if rms
                                else reference.layer_norm(xx, (N,), ww, bb, eps))
                    return (F.rms_norm(xx, (N,), ww, eps) if rms
                            else F.layer_norm(xx, (N,), ww, bb, eps))

                cast = lambda t, dt: t.to(dt) if t is not None else None  # noqa: E731
                hi = norm(xs.double(), cast(w, torch.float64), cast(b, torch.float64))
                assert_close_rule(out, hi, norm(xs, cast(w, dtype), cast(b, dtype)))
                g = torch.randn(M, N, dtype=dtype, device=DEV)
                gr = torch.randn(M, N, dtype=dtype, device=DEV) if residual else None
                xsaved = rout if residual else x
                gi, gw, gb = ops.layer_norm_bwd(g, gr, xsaved, w, b, mean, rstd, rms)
                gi2, gw2, gb2 = ops.layer_norm_bwd(g, gr, xsaved, w, b, mean, rstd, rms)
                assert torch.equal(gw, gw2) and torch.equal(gi, gi2), "not bitwise repeatable"

                def grads(dt):
                    xx = xsaved.detach().to(dt).requires_grad_()
                    ww = w.detach().to(dt).requires_grad_()
                    bb = b.detach().to(dt).requires_grad_() if b is not None else None
                    ins = [t for t in (xx, ww, bb) if t is not None]
                    gs = list(torch.autograd.grad((norm(xx, ww, bb) * g.to(dt)).sum(), ins))
                    if residual:
                        gs[0] = gs[0] + gr.to(dt)
                    return gs

                mine = [gi, gw] + ([gb] if b is not None else [])
                for n, got, h, lo in zip(("grad_input", "grad_weight", "grad_bias"), mine,
                                         grads(torch.float64), grads(dtype), strict=False):
                    assert_close_rule(got, h, lo, factor=3.0, name=n)

            rep.check(f"{'rms' if rms else 'layer'}_norm {str(dtype)[6:]} M{M} N{N}"
                      f"{' residual' if residual else ''}{' f32-params' if pf32 else ''}"
                      f"{' strided' if strided else ''}", run)


def check_int8(rep: Report, tiny: bool) -> None:
    ops = torch.ops.fastattn
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        def quant(dtype=dtype):
            x = torch.randn(37, 4096 if not tiny else 64, dtype=dtype, device=DEV) * 3
            x[1] = 0
            x[2, :4] = torch.tensor([1e-3, -2.5e-3, 0.0, 7.5e-4]).to(dtype)
            if dtype == torch.float32:  # subnormals that quantize to non-zero: no flush to zero
                x[3] = 0
                x[3, :4] = torch.tensor([4e-37, 1e-38, -6e-39, 2e-39])
            q, s = ops.quantize_per_token(x)
            qr, sr = reference.quantize_per_token(x)
            assert torch.equal(q, qr), f"{int((q.int() - qr.int()).abs().max())} off"
            assert torch.equal(s, sr), "scales differ"
        rep.check(f"quantize_per_token {str(dtype)[6:]} bit-exact", quant)
    shapes = [(5, 7, 64), (33, 17, 37)] if tiny else [(5, 7, 64), (130, 140, 200), (33, 17, 37),
                                                      (1024, 512, 4096), (1, 4096, 4096)]
    for M, N, K in shapes:
        def gemm(M=M, N=N, K=K):
            a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=DEV)
            b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=DEV)
            assert torch.equal(ops.int8_gemm(a, b, None, None, None, None),
                               reference.int8_gemm(a, b)), "int32 result not exact"
            sa = (torch.rand(M, device=DEV) + 0.1) * 0.01
            sb = (torch.rand(N, device=DEV) + 0.1) * 0.01
            bias = torch.randn(N, device=DEV)
            for od in (torch.float32, torch.bfloat16, torch.float16):
                got = ops.int8_gemm(a, b, sa, sb, bias, od)
                hi = reference.int8_gemm(a, b, sa.double(), sb.double(), bias.double(),
                                         out_dtype=torch.float64)
                assert_close_rule(got, hi, reference.int8_gemm(a, b, sa, sb, bias, out_dtype=od),
                                  name=f"out {od}")
        rep.check(f"int8_gemm M{M} N{N} K{K}", gemm)
    for M, N, K in ([(1, 33, 512), (3, 17, 37)] if tiny else [(1, 4096, 4096), (16, 1000, 512),
                                                               (3, 17, 37)]):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            def wo(M=M, N=N, K=K, dtype=dtype):
                x = torch.randn(M, K, dtype=dtype, device=DEV)
                w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=DEV)
                s, bias = torch.rand(N, device=DEV) * 0.02, torch.randn(N, device=DEV)
                got = ops.int8_weight_only_linear(x, w, s, bias)
                hi = (x.double() @ w.double().t()) * s.double() + bias.double()
                low = (x @ w.to(dtype).t()) * s.to(dtype) + bias.to(dtype)
                assert_close_rule(got, hi, low)
            rep.check(f"int8_weight_only_linear {str(dtype)[6:]} M{M} N{N} K{K}", wo)


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def bench(impls: dict, rounds: int = 15, warmup: int = 3) -> dict:
    """Median ms per implementation, rounds interleaved so clocks and caches treat all alike."""
    res = {}
    live = {}
    for name, fn in impls.items():
        try:
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
            live[name] = fn
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    times = {n: [] for n in live}
    for _ in range(rounds):
        for n, fn in live.items():
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            times[n].append((s, e))
    torch.cuda.synchronize()
    for n, ev in times.items():
        ms = sorted(s.elapsed_time(e) for s, e in ev)
        res[n] = {"ms": ms[len(ms) // 2], "min_ms": ms[0]}
    return res


def time_attention(rep: Report, B: int, H: int, L: int, E: int, causal: bool) -> None:
    ops, bf = torch.ops.fastattn, torch.bfloat16
    q, k, v = (torch.randn(B, H, L, E, dtype=bf, device=DEV) for _ in range(3))
    wr, scale = (0 if causal else -1), E**-0.5
    flops = 4 * B * H * L * L * E / (2 if causal else 1)
    tag = f"bf16 B{B} H{H} L{L} d{E}{' causal' if causal else ''}"
    r = bench({
        "fastattn.cuda": lambda: ops.attention_fwd(q, k, v, None, scale, -1, wr, 0, 0.0, 0),
        "F.scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(
            q, k, v, is_causal=causal),
    })
    ms = r.get("fastattn.cuda", {}).get("ms")
    rep.timing({"name": f"attention fwd {tag}", "impls": r,
                "rate": f"{flops / ms / 1e9:.0f} TFLOP/s" if ms else ""})
    out, lse = ops.attention_fwd(q, k, v, None, scale, -1, wr, 0, 0.0, 0)
    do = torch.randn_like(out)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    ref_out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
    r = bench({
        "fastattn.cuda": lambda: ops.attention_bwd(do, q, k, v, out, lse, None, None, scale, -1,
                                                   wr, 0, 0.0, 0, False, False),
        "SDPA backward": lambda: torch.autograd.grad(ref_out, (qg, kg, vg), do,
                                                     retain_graph=True),
    }, rounds=8)
    ms = r.get("fastattn.cuda", {}).get("ms")
    rep.timing({"name": f"attention bwd {tag}", "impls": r,
                "rate": f"{2.5 * flops / ms / 1e9:.0f} TFLOP/s" if ms else ""})


def time_decode(rep: Report) -> None:
    """One new token per sequence against an 8k-token cache."""
    ops, bf = torch.ops.fastattn, torch.bfloat16
    B, H, Hkv, cap, n, E = 8, 32, 8, 8192, 8000, 128
    q = torch.randn(B, H, 1, E, dtype=bf, device=DEV)
    kc = torch.randn(B, Hkv, cap, E, dtype=bf, device=DEV)
    vc = torch.randn(B, Hkv, cap, E, dtype=bf, device=DEV)
    sl = torch.full((B,), n, dtype=torch.int32, device=DEV)
    ks, vs = kc[:, :, :n], vc[:, :, :n]
    r = bench({
        "fastattn.cuda": lambda: ops.attention_kvcache(q, kc, vc, sl, None, None, E**-0.5, True),
        "SDPA on the cache": lambda: F.scaled_dot_product_attention(q, ks, vs, enable_gqa=True),
    })
    ms = r.get("fastattn.cuda", {}).get("ms")
    gb = 2 * B * Hkv * n * E * 2 / 1e9
    rep.timing({"name": f"decode bf16 B{B} H{H}/{Hkv} n{n} d{E}", "impls": r,
                "rate": f"{gb / ms * 1e3:.0f} GB/s (KV read)" if ms else ""})


def time_norm(rep: Report, M: int, N: int) -> None:
    ops, bf = torch.ops.fastattn, torch.bfloat16
    x = torch.randn(M, N, dtype=bf, device=DEV)
    res = torch.randn(M, N, dtype=bf, device=DEV)
    w, b = torch.randn(N, dtype=bf, device=DEV), torch.randn(N, dtype=bf, device=DEV)
    gb = 2 * M * N * 2 / 1e9
    r = bench({"fastattn.cuda": lambda: ops.layer_norm_fwd(x, w, b, None, 1e-5, False),
               "F.layer_norm": lambda: F.layer_norm(x, (N,), w, b)})
    ms = r.get("fastattn.cuda", {}).get("ms")
    rep.timing({"name": f"layer_norm fwd bf16 {M}x{N}", "impls": r,
                "rate": f"{gb / ms * 1e3:.0f} GB/s" if ms else ""})
    r = bench({"fastattn.cuda": lambda: ops.layer_norm_fwd(x, w, b, res, 1e-5, False),
               "F.layer_norm(x + r)": lambda: F.layer_norm(x + res, (N,), w, b)})
    rep.timing({"name": f"residual + layer_norm fwd bf16 {M}x{N}", "impls": r})
    r = bench({"fastattn.cuda": lambda: ops.layer_norm_fwd(x, w, None, None, 1e-6, True),
               "F.rms_norm": lambda: F.rms_norm(x, (N,), w, 1e-6)})
    rep.timing({"name": f"rms_norm fwd bf16 {M}x{N}", "impls": r})
    _, _, mean, rstd = ops.layer_norm_fwd(x, w, b, None, 1e-5, False)
    g = torch.randn_like(x)
    xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))
    y = F.layer_norm(xg, (N,), wg, bg)
    r = bench({"fastattn.cuda": lambda: ops.layer_norm_bwd(g, None, x, w, b, mean, rstd, False),
               "F.layer_norm backward": lambda: torch.autograd.grad(y, (xg, wg, bg), g,
                                                                    retain_graph=True)},
              rounds=10)
    rep.timing({"name": f"layer_norm bwd bf16 {M}x{N}", "impls": r})


def time_int8(rep: Report, M: int, N: int = 4096, K: int = 4096) -> None:
    """W8A8 (quantization included) for M > 16, weight-only below; both against bf16 matmul."""
    ops, bf = torch.ops.fastattn, torch.bfloat16
    w_int8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=DEV)
    w_scale = torch.rand(N, device=DEV) * 0.01
    w_bf = torch.randn(N, K, dtype=bf, device=DEV)
    x = torch.randn(M, K, dtype=bf, device=DEV)
    flops = 2 * M * N * K

    def w8a8():
        xq, xs = ops.quantize_per_token(x)
        return ops.int8_gemm(xq, w_int8, xs, w_scale, None, bf)

    def weight_only():
        return ops.int8_weight_only_linear(x, w_int8, w_scale, None)

    r = bench({"fastattn.cuda": w8a8 if M > 16 else weight_only,
               "bf16 matmul": lambda: torch.matmul(x, w_bf.t())})
    ms = r.get("fastattn.cuda", {}).get("ms")
    kind = "W8A8 linear (quantize + int8 GEMM)" if M > 16 else "weight-only int8 linear"
    rep.timing({"name": f"{kind} M{M} N{N} K{K}", "impls": r,
                "rate": f"{flops / ms / 1e9:.0f} TOP/s" if ms else ""})
    if M > 16:
        a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=DEV)
        r = bench({"fastattn.cuda": lambda: ops.int8_gemm(a, w_int8, None, None, None, None),
                   "torch._int_mm": lambda: torch._int_mm(a, w_int8.t())})
        ms = r.get("fastattn.cuda", {}).get("ms")
        rep.timing({"name": f"int8 GEMM int32 out M{M} N{N} K{K}", "impls": r,
                    "rate": f"{flops / ms / 1e9:.0f} TOP/s" if ms else ""})


def time_all(rep: Report, budget_end: float) -> None:
    cases = [
        (time_attention, (4, 16, 2048, 128, False)), (time_attention, (4, 16, 2048, 128, True)),
        (time_attention, (2, 16, 4096, 64, True)), (time_decode, ()),
        (time_norm, (16384, 1024)), (time_norm, (16384, 4096)), (time_norm, (4096, 8192)),
        (time_int8, (1,)), (time_int8, (16,)), (time_int8, (1024,)), (time_int8, (4096,)),
    ]
    for fn, args in cases:
        if time.time() > budget_end:
            rep.data.setdefault("skipped_timings", []).append(f"{fn.__name__}{args}")
            continue
        try:
            fn(rep, *args)
        except Exception as e:
            rep.data.setdefault("timing_errors", []).append(f"{fn.__name__}{args}: {e}"[:500])
        torch.cuda.empty_cache()
        rep.write()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "h200")
    ap.add_argument("--sanitize", action="store_true", help="tiny cases, no timing")
    ap.add_argument("--only", default="", help="comma list: attention,kvcache,norm,int8")
    ap.add_argument("--time-budget", type=float, default=90.0, help="seconds for the timings")
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args()
    rep = Report(args.out, args.sanitize)
    env = rep.data["env"]
    env["torch"] = torch.__version__
    env["cuda"] = torch.version.cuda
    if DEV == "cuda" and not torch.cuda.is_available():
        env["device"] = None
        rep.data["checks"].append({"name": "CUDA device", "status": "ERROR",
                                   "detail": "torch sees no CUDA device", "seconds": 0})
        rep.write()
        print("no CUDA device")
        return 2
    env["device"] = torch.cuda.get_device_name() if DEV == "cuda" else DEV
    try:
        import fastattn._C  # noqa: F401  registers the ops
    except ImportError as e:
        env["extension"] = f"fastattn._C does not import: {e}"
    missing = [op for op in OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{op}", KEY)]
    env["ops_without_cuda_kernel"] = missing
    if missing:
        rep.data["checks"].append({"name": f"{KEY} kernels registered", "status": "FAIL",
                                   "detail": f"no {KEY} kernel for {missing}", "seconds": 0})
        if len(missing) == len(OPS):
            rep.write()
            print(f"no {KEY} kernels registered: {env.get('extension', '')}")
            return 1
    only = set(filter(None, args.only.split(",")))
    want = lambda part: not only or part in only  # noqa: E731
    torch.manual_seed(0)
    tiny = args.sanitize
    dtypes = (torch.bfloat16,) if tiny else (torch.bfloat16, torch.float16, torch.float32)
    if want("attention"):
        check_attention(rep, TINY_ATTN if tiny else ATTN, dtypes)
        if not tiny:
            check_public_api(rep)
        rep.write()
    if want("kvcache"):
        check_kvcache(rep, KV[2:3] if tiny else KV, dtypes)
        rep.write()
    if want("norm"):
        check_layer_norm(rep, [LN[0], LN[4]] if tiny else LN, dtypes)
        rep.write()
    if want("int8"):
        check_int8(rep, tiny)
        rep.write()
    if not (tiny or args.no_timing or DEV != "cuda"):
        time_all(rep, time.time() + args.time_budget)
    rep.write()
    bad = [c["name"] for c in rep.data["checks"] if c["status"] != "ok"]
    print(f"{len(rep.data['checks']) - len(bad)}/{len(rep.data['checks'])} checks ok"
          + (f"; not ok: {bad}" if bad else ""))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
