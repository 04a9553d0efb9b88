"""Ahead-of-time compiles of the Triton kernels for a GPU target (no GPU needed): the jobs of
tests/test_triton_resources.py and the compiler's resource figures for each.

    python -m tests._triton_aot [--jobs N] [--filter SUBSTRING]

prints one JSON object per compiled kernel. Compiles run in worker processes (TRITON_INTERPRET=0
there: under the interpreter ``triton.jit`` returns no compilable function) with their own
Triton cache directory, so every run compiles from scratch as a clean checkout does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import sys
import tempfile
import time

# Opt-in shared memory per block (CUDA C Programming Guide, "Technical Specifications per
# Compute Capability"): 163 KB on sm_80 (A100), 227 KB on sm_90 (H100/H200). A launch asking for
# more fails; Triton raises OutOfResources before it.
SMEM_LIMIT = {80: 166_912, 90: 232_448}
# ptxas never assigns more than 255 registers a thread; what does not fit spills to local memory
MAX_REGISTERS = 255
ARCHES = (80, 90)

# the last-dimension strides of contiguous tensors are 1, which the JIT specialises to a
# constant; every other integer argument that is a multiple of 16 gets tt.divisibility 16
_UNIT_STRIDES = {
    "stride_qk", "stride_kk", "stride_vk", "stride_mn", "stride_ok", "stride_dok", "stride_dqk",
    "stride_dkk", "stride_dvk", "stride_dmn", "stride_knk", "stride_vnk", "stride_kck",
    "stride_vck", "stride_ak", "stride_bk", "stride_cn", "stride_xk", "stride_wk", "stride_on",
    "stride_ken",
}
# integer arguments named in capitals (the int8 and norm kernels' sizes); other capitals are
# pointers (in the attention kernels K is the key tensor)
_SIZES = {"M", "N", "G", "M_BUCKET"}
_FLOAT_SCALARS = {"qk_scale", "sm_scale", "dropout_p", "eps", "softcap2"}


@dataclasses.dataclass(frozen=True)
class Job:
    """One compile: ``module.kernel`` with ``constexprs`` for ``arch`` at (warps, stages).
    ``ptrs`` maps pointer arguments to their element type (others: ``default_ptr``)."""

    module: str
    kernel: str
    arch: int
    constexprs: tuple
    default_ptr: str
    ptrs: tuple
    warps: int
    stages: int
    label: str

    def as_dict(self) -> dict:
        return {"kernel": self.kernel, "arch": self.arch, "label": self.label,
                "constexprs": dict(self.constexprs), "warps": self.warps, "stages": self.stages}


def _job(module, kernel, arch, const, dt, warps, stages, label, **ptrs) -> Job:
    return Job(module, kernel, arch, tuple(sorted(const.items())), "*" + dt,
               tuple(sorted(ptrs.items())), warps, stages, label)


def attention_jobs() -> list[Job]:
    """Every candidate of every attention tuning list on the architecture that uses it, compiled
    with every feature the list serves switched on (window left and right, dropout, the mask
    where the list serves masked calls, atomic dQ and the stored mask gradient): each feature
    only adds code and live values, so the all-on variant bounds the resources of the others.
    bfloat16 stands for float16 (same element size, the same MMA shapes and layouts)."""
    from fastattn.triton import attention as A

    jobs = []
    seq = dict(CuSeqQ="*i32", CuSeqK="*i32")
    kernels = [
        ("_attention_fwd_kernel", A._FWD_TUNING, dict(SINKS=True),
         dict(Lse="*fp32", Slopes="*fp32", Sinks="*fp32", **seq)),
        ("_attention_bwd_dkdv_kernel", A._DKDV_TUNING, dict(ATOMIC_DQ=True, STORE_DMASK=True),
         dict(Lse="*fp32", Delta="*fp32", DQ="*fp32", Slopes="*fp32", **seq)),
        ("_attention_bwd_dq_kernel", A._DQ_TUNING, {},
         dict(Lse="*fp32", Delta="*fp32", Slopes="*fp32", **seq)),
    ]
    # the same kernels on packed sequences (VARLEN: offsets from cu_seqlens, no mask)
    varlen_kernels = [
        (name, table, {**extra, "STORE_DMASK": False} if "STORE_DMASK" in extra else extra,
         ptrs) for name, table, extra, ptrs in kernels]
    for arch in ARCHES:
        for dt in ("bf16", "fp32"):
            for name, table, extra, ptrs in kernels:
                for variant, has_mask in A.tuning_variants(dt == "fp32"):
                    for dclass, cands in A.tuning_list(table, arch // 10, variant).items():
                        for bm, bn, warps, stages in cands:
                            const = dict(HEAD_DIM=dclass, HEAD_DIM_V=dclass, HAS_MASK=has_mask,
                                         HAS_LEFT=True, HAS_RIGHT=True, DROPOUT=True,
                                         SOFTCAP=True, ALIBI=True, INTERP_BF16=False,
                                         VARLEN=False, BOTTOM_RIGHT=False,
                                         BLOCK_M=bm, BLOCK_N=bn,
                                         DOT_PRECISION=A._dot_precision(dt == "fp32"), **extra)
                            jobs.append(_job("fastattn.triton.attention", name, arch, const, dt,
                                             warps, stages, f"{variant} {dt} E<={dclass}",
                                             **ptrs))
            # packed variable-length attention (no mask: one list per dtype class)
            for name, table, extra, ptrs in varlen_kernels:
                variant = "_fp32" if dt == "fp32" else ""
                for dclass, cands in A.tuning_list(table, arch // 10, variant).items():
                    for bm, bn, warps, stages in cands:
                        const = dict(HEAD_DIM=dclass, HEAD_DIM_V=dclass, HAS_MASK=False,
                                     HAS_LEFT=True, HAS_RIGHT=True, DROPOUT=True,
                                     SOFTCAP=True, ALIBI=True, INTERP_BF16=False,
                                     VARLEN=True, BOTTOM_RIGHT=True, BLOCK_M=bm, BLOCK_N=bn,
                                     DOT_PRECISION=A._dot_precision(dt == "fp32"), **extra)
                        jobs.append(_job("fastattn.triton.attention", name, arch, const, dt,
                                         warps, stages, f"varlen{variant} {dt} E<={dclass}",
                                         **ptrs))
            # decoding: the largest M tile (the query rows of a kv group), every feature on
            variant = "_fp32" if dt == "fp32" else ""
            for dclass, cands in A.tuning_list(A._DECODE_TUNING, arch // 10, variant).items():
                for _, bn, warps, stages in cands:
                    const = dict(HEAD_DIM=dclass, HEAD_DIM_V=dclass, BLOCK_N=bn,
                                 BLOCK_M=A._decode_max_block_m(dt == "fp32", dclass),
                                 CAUSAL=True, SPLIT=True, HAS_LEFTPAD=True, INTERP_BF16=False,
                                 SOFTCAP=True, ALIBI=True, SINKS=True, PAGED=True, WINDOW=True,
                                 RETURN_LSE=True, DOT_PRECISION=A._dot_precision(dt == "fp32"))
                    ptrs = dict(SeqLens="*i32", LeftPad="*i32", OutPartial="*fp32",
                                LsePartial="*fp32", Slopes="*fp32", Sinks="*fp32",
                                BlockTable="*i32", Lse="*fp32")
                    jobs.append(_job("fastattn.triton.attention", "_kvcache_split_kernel", arch,
                                     const, dt, warps, stages, f"decode {dt} E<={dclass}",
                                     **ptrs))
                    # without the split the kernel stores the output and lse itself
                    jobs.append(_job("fastattn.triton.attention", "_kvcache_split_kernel", arch,
                                     {**const, "SPLIT": False}, dt, warps, stages,
                                     f"decode nosplit {dt} E<={dclass}", **ptrs))
        # the fixed-config kernels at their largest head dim (the dropout mask: no head dim)
        jobs.append(_job("fastattn.triton.attention", "_attention_dropout_mask_kernel", arch,
                         dict(VARLEN=True, BLOCK_M=32, BLOCK_N=64), "u8", 4, 1, "dropout mask",
                         CuSeqQ="*i32", CuSeqK="*i32"))
        for dt in ("bf16", "fp32"):
            jobs.append(_job("fastattn.triton.attention", "_attention_bwd_preprocess_kernel", arch,
                             dict(HEAD_DIM_V=256, HAS_GRAD_LSE=True, BLOCK_M=16), dt, 4, 1,
                             f"preprocess {dt}", GradLse="*fp32", Delta="*fp32"))
            # the largest tile with and without the rotary embedding (append_block_l)
            for rotary in (False, True):
                jobs.append(_job("fastattn.triton.attention", "_kvcache_append_kernel", arch,
                                 dict(HEAD_DIM=256, HEAD_DIM_V=256, HAS_LEFTPAD=True,
                                      BLOCK_L=A.append_block_l(16, 256, rotary), ROTARY=rotary,
                                      ROTARY_INTERLEAVED=False, PAGED=True), dt, 4, 1,
                                 f"append{' rotary' if rotary else ''} {dt}", SeqLens="*i32",
                                 LeftPad="*i32", Cos="*fp32", Sin="*fp32", BlockTable="*i32"))
            jobs.append(_job("fastattn.triton.attention", "_kvcache_combine_kernel", arch,
                             dict(HEAD_DIM_V=256, BLOCK_SPLITS=128, SINKS=True, RETURN_LSE=True),
                             dt, 4, 1, f"combine {dt}", OutPartial="*fp32", LsePartial="*fp32",
                             Sinks="*fp32", Lse="*fp32"))
    return jobs


def int8_jobs() -> list[Job]:
    """Every int8 GEMM and weight-only candidate that the pruning keeps on each architecture
    for some call (the prune drops what cannot fit there), every epilogue feature on."""
    from fastattn.triton import int8_gemm as G

    jobs = []
    for arch in ARCHES:
        for c in G.gemm_candidates(arch // 10):
            const = dict(HAS_A_SCALE=True, HAS_B_SCALE=True, HAS_BIAS=True, DEQUANT=True,
                         **c.kwargs)
            jobs.append(_job("fastattn.triton.int8_gemm", "_int8_gemm_kernel", arch, const, "i8",
                             c.num_warps, c.num_stages, "gemm", C="*bf16", AScale="*fp32",
                             BScale="*fp32", Bias="*fp32"))
        for fp32 in (False, True):
            dt = "fp32" if fp32 else "bf16"
            for c in G.weight_only_candidates(arch // 10, fp32):
                const = dict(HAS_BIAS=True, FP32=fp32, INTERP_BF16=False, BLOCK_M=32, **c.kwargs)
                jobs.append(_job("fastattn.triton.int8_gemm", "_int8_weight_only_kernel", arch,
                                 const, dt, c.num_warps, c.num_stages, f"weight-only {dt}",
                                 W="*i8", WScale="*fp32", Bias="*fp32"))
        for dt in ("bf16", "fp32"):
            for one_pass, block in ((True, G._QUANT_ONE_PASS_MAX), (False, G._QUANT_LOOP_BLOCK)):
                jobs.append(_job("fastattn.triton.int8_gemm", "_quantize_per_token_kernel", arch,
                                 dict(BLOCK_K=block, ONE_PASS=one_pass), dt,
                                 G._quant_warps(block), 3, f"quantize {dt}", Q="*i8",
                                 Scale="*fp32"))
    return jobs


def layer_norm_jobs() -> list[Job]:
    """The register-resident limits and the looping paths of LayerNorm/RMSNorm, every feature
    on (their warp counts are fixed per block size: no autotuning)."""
    from fastattn.triton import layer_norm as L

    fp32 = dict(Mean="*fp32", Rstd="*fp32", DW="*fp32", DB="*fp32")
    fwd = dict(HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=True, RMS=False)
    bwd = dict(HAS_DRES=True, HAS_WEIGHT=True, PARTIALS=True, RMS=False)
    jobs = []
    for arch in ARCHES:
        for dt in ("bf16", "fp32"):
            for kernel, flags, block, single, warps in (
                ("_layer_norm_fwd_kernel", fwd, L._MAX_FUSED_FWD, True, L._num_warps),
                ("_layer_norm_fwd_kernel", fwd, L._LOOP_BLOCK, False, L._num_warps),
                ("_layer_norm_bwd_kernel", bwd, L._MAX_FUSED_BWD, True, L._num_warps_bwd),
                ("_layer_norm_bwd_kernel", bwd, L._LOOP_BLOCK, False, L._num_warps_bwd),
            ):
                jobs.append(_job("fastattn.triton.layer_norm", kernel, arch,
                                 dict(flags, BLOCK_N=block, SINGLE_BLOCK=single), dt,
                                 warps(block), 3, f"{kernel[1:-7]} {dt} N<={block}", **fp32))
        jobs.append(_job("fastattn.triton.layer_norm", "_sum_partials_kernel", arch,
                         dict(BLOCK_N=1024), "fp32", 4, 3, "sum partials"))
    return jobs


def activation_jobs() -> list[Job]:
    """SiLU-and-mul forward and backward at their largest block (no autotuning: the block is
    min(next_pow2(I), MAX_BLOCK_N), the warps follow from it)."""
    from fastattn.triton import activation as A

    block, warps = A.block_config(A.MAX_BLOCK_N)
    jobs = []
    for arch in ARCHES:
        for dt in ("bf16", "fp32"):
            for kernel in ("_silu_mul_fwd_kernel", "_silu_mul_bwd_kernel"):
                jobs.append(_job("fastattn.triton.activation", kernel, arch,
                                 dict(BLOCK_N=block), dt, warps, 3,
                                 f"{kernel[1:-7]} {dt} I<={block}"))
    return jobs


def all_jobs() -> list[Job]:
    return attention_jobs() + int8_jobs() + layer_norm_jobs() + activation_jobs()


def _signature(fn, job: Job) -> tuple[dict, dict, dict]:
    sizes = _SIZES | ({"K"} if job.module.endswith("int8_gemm") else set())
    const = dict(job.constexprs)
    const.update({n: 1 for n in fn.arg_names if n in _UNIT_STRIDES})
    ptrs = dict(job.ptrs)
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        if n in const:
            sig[n] = "constexpr"
        elif n in ptrs or (n[0].isupper() and n not in sizes):
            sig[n] = ptrs.get(n, job.default_ptr)
        elif n in _FLOAT_SCALARS:
            sig[n] = "fp32"
        elif n == "seed":
            sig[n] = "i64"
        else:
            sig[n] = "i32"
        if sig[n].startswith("*") or (n.startswith("stride_") and sig[n] == "i32"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs


def compile_job(job: Job) -> dict:
    """Compile one job for its target; the resources ptxas reports for it."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(job.module), job.kernel)
    while not isinstance(fn, JITFunction):  # an Autotuner wraps the JITFunction
        fn = fn.fn
    sig, const, attrs = _signature(fn, job)
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(log):
        k = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs),
                           target=GPUTarget("cuda", job.arch, 32),
                           options=dict(num_warps=job.warps, num_stages=job.stages))
    text = log.getvalue()
    num = lambda pat: sum(int(x) for x in re.findall(pat, text))
    return {
        **job.as_dict(),
        "seconds": round(time.perf_counter() - t, 2),
        # dynamic shared memory Triton requests at launch + what ptxas allocates statically
        "shared": int(k.metadata.shared) + num(r"(\d+) bytes smem"),
        "registers": num(r"Used (\d+) registers"),
        "spill_stores": num(r"(\d+) bytes spill stores"),
        "stack": num(r"(\d+) bytes stack frame"),
    }


def _worker_init(cache_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def compile_all(jobs: list[Job], workers: int | None = None):
    """Compile the jobs in parallel worker processes (spawned: they import triton with
    TRITON_INTERPRET=0 whatever this process runs under); yields the results as they finish."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    workers = workers or int(os.environ.get("FASTATTN_AOT_JOBS", 0)) or os.cpu_count() or 1
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    old = os.environ.get("TRITON_INTERPRET"), os.environ.get("PYTHONPATH")
    os.environ["TRITON_INTERPRET"] = "0"  # read by the children's import of triton
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, old[1]) if p)
    try:
        with tempfile.TemporaryDirectory() as cache, ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init, initargs=(cache,)) as pool:
            for fut in as_completed([pool.submit(compile_job, j) for j in jobs]):
                yield fut.result()
    finally:
        for key, value in zip(("TRITON_INTERPRET", "PYTHONPATH"), old, strict=True):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--filter", default="")
    args = p.parse_args(argv)
    jobs = [j for j in all_jobs() if args.filter in f"{j.kernel} {j.arch} {j.label}"]
    t = time.perf_counter()
    for r in compile_all(jobs, args.jobs):
        print(json.dumps(r), flush=True)
    print(f"# {len(jobs)} compiles in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"
    sys.exit(main(sys.argv[1:]))
