"""Packed variable-length attention benchmark: ``fastattn.attention_varlen`` per fast backend on
a packed batch (sequences of different lengths, no padding) against the two ways plain PyTorch
runs the same batch:

* ``torch.sdpa loop``: ``F.scaled_dot_product_attention`` once per sequence on views of the
  packed tensors, each result copied into the packed output (what a padding-free training step
  without a varlen kernel does);
* ``torch.sdpa padded``: one ``F.scaled_dot_product_attention`` call on the batch padded to the
  longest sequence, a bool mask hiding the padding keys (and the future ones when causal). Its
  inputs and mask are padded once, outside the timed call: the figure is SDPA's alone.

The work (FLOPs) of a case is the packed batch's (sum over the sequences of L_b x S_b), so the
padded baseline's TFLOP/s count only its useful work: its speed-up is the FLOPs saved. The
issue's target case: 16 sequences with lengths spread geometrically over 32...1024.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastattn.bench.cases import DTYPES, Case, Impl, RunConfig, attention_flops, fastattn_impls

OP = "varlen"
FUNCTIONS = ("attention_varlen",)
DEFAULT_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("bf16",)}


def spread_lengths(n: int, lo: int, hi: int) -> list[int]:
    """n lengths spread geometrically from lo to hi (both included), in a shuffled but fixed
    order (a packed batch is not sorted by length)."""
    if n == 1:
        return [hi]
    lens = [round(lo * (hi / lo) ** (i / (n - 1))) for i in range(n)]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    return [lens[i] for i in order]


def _shapes(cfg: RunConfig) -> list[dict]:
    """Each: the sequence lengths (queries = keys), H, d, causal, mode."""
    if cfg.smoke:
        lens = [8, 40, 1, 23]
        return [dict(seqs=lens, H=2, d=32, causal=c, mode="fwd") for c in (False, True)] + [
            dict(seqs=lens, H=2, d=32, causal=True, mode="fwd+bwd")]
    lens = spread_lengths(16, 32, 1024)
    if not cfg.cuda:
        out = [dict(seqs=lens, H=8, d=64, causal=c, mode="fwd") for c in (False, True)]
        out.append(dict(seqs=lens, H=8, d=64, causal=True, mode="fwd+bwd"))
        if not cfg.quick:
            out += [dict(seqs=lens, H=8, d=128, causal=c, mode="fwd") for c in (False, True)]
        return out
    # CUDA: 16 sequences over 32...8192, model width 2048
    lens = spread_lengths(16, 32, 8192)
    return [dict(seqs=lens, H=2048 // d, d=d, causal=c, mode=mode)
            for mode in ("fwd", "fwd+bwd") for d in (64, 128) for c in (False, True)]


def _builder(cfg: RunConfig, shape: dict, dtype: torch.dtype):
    lens, H, d, causal, mode = (shape[k] for k in ("seqs", "H", "d", "causal", "mode"))
    dev = cfg.device
    backward = mode == "fwd+bwd"
    B, total, Lmax = len(lens), sum(lens), max(lens)

    def build():
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32,
                          device=dev)
        q = torch.randn(total, H, d, dtype=dtype, device=dev, requires_grad=backward)
        k = torch.randn(total, H, d, dtype=dtype, device=dev, requires_grad=backward)
        v = torch.randn(total, H, d, dtype=dtype, device=dev, requires_grad=backward)
        grad = torch.randn(total, H, d, dtype=dtype, device=dev) if backward else None
        starts = cu.tolist()

        def timed(fwd, inputs, g):
            if not backward:
                return fwd
            # autograd.grad instead of .backward(): no accumulation into .grad between calls
            return lambda: torch.autograd.grad(fwd(), inputs, g)

        impls = fastattn_impls(
            cfg, "attention_varlen",
            lambda f, be: timed(lambda: f(q, k, v, cu, cu, Lmax, Lmax, is_causal=causal,
                                          backend=be), (q, k, v), grad))

        def loop_call():
            out = torch.empty(total, H, d, dtype=dtype, device=dev)
            for b in range(B):
                rows = slice(starts[b], starts[b + 1])
                # (L_b, H, d) -> (1, H, L_b, d) views
                o = F.scaled_dot_product_attention(
                    q[rows].transpose(0, 1)[None], k[rows].transpose(0, 1)[None],
                    v[rows].transpose(0, 1)[None], is_causal=causal)
                out[rows] = o[0].transpose(0, 1)
            return out

        impls.append(Impl("torch.sdpa loop", "baseline", fn=timed(loop_call, (q, k, v), grad)))

        # padded: (B, H, Lmax, d), sequence b in rows [0, L_b); query i sees keys j < L_b
        # (and j <= i when causal)
        def pad(t):
            p = torch.zeros(B, Lmax, H, d, dtype=dtype, device=dev)
            for b in range(B):
                p[b, :lens[b]] = t.detach()[starts[b]:starts[b + 1]]
            return p.transpose(1, 2).contiguous().requires_grad_(backward)

        qp, kp, vp = pad(q), pad(k), pad(v)
        j = torch.arange(Lmax, device=dev)
        mask = j[None, None, :] < torch.tensor(lens, device=dev)[:, None, None]  # (B, 1, Lmax)
        mask = mask[:, None].expand(B, 1, Lmax, Lmax)
        if causal:
            mask = mask & (j[None, None, None, :] <= j[None, None, :, None])
        pad_grad = torch.randn_like(qp) if backward else None

        def padded_call():
            return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)

        impls.append(Impl("torch.sdpa padded", "baseline",
                          fn=timed(padded_call, (qp, kp, vp), pad_grad)))

        def check():  # the packed output of the per-sequence loop, in float32
            with torch.no_grad():
                out = torch.empty(total, H, d, dtype=torch.float32, device=dev)
                for b in range(B):
                    rows = slice(starts[b], starts[b + 1])
                    o = F.scaled_dot_product_attention(
                        *(t.detach()[rows].float().transpose(0, 1)[None] for t in (q, k, v)),
                        is_causal=causal)
                    out[rows] = o[0].transpose(0, 1)
                return out

        return impls, check

    return build


def cases(cfg: RunConfig) -> list[Case]:
    out = []
    for dtype in cfg.dtypes_for(DEFAULT_DTYPES[cfg.device]):
        for shape in _shapes(cfg):
            lens, H, d = shape["seqs"], shape["H"], shape["d"]
            flops = sum(attention_flops(1, H, n, n, d, causal=shape["causal"],
                                        mode=shape["mode"]) for n in lens)
            params = {"B": len(lens), "tokens": sum(lens), "Lmax": max(lens), "H": H, "d": d,
                      "causal": shape["causal"], "mode": shape["mode"]}
            out.append(Case(op=OP, params=params, dtype=dtype,
                            build=_builder(cfg, shape, DTYPES[dtype]), flops=flops,
                            bound="compute", x="tokens", series=("d", "causal", "mode")))
    return out
