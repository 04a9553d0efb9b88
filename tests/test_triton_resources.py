"""Every Triton autotune candidate fits the GPUs it is tuned for, checked without a GPU: the
kernels are compiled ahead of time for sm_80 (A100) and sm_90a (H100/H200) with
``triton.compile`` and a ``GPUTarget`` (tests/_triton_aot.py builds the jobs: each dtype class,
head-dim class and list variant, every optional feature switched on), and the compiler's figures
are held to the hardware's limits:

* shared memory (Triton's dynamic request + ptxas' static) <= the opt-in limit per block:
  166,912 B on sm_80, 232,448 B on sm_90 (a launch above it raises OutOfResources);
* registers <= 255 a thread;
* register spills <= SPILL_BOUND bytes a thread (below).

The pruning functions' shared-memory estimates are held to the compiler's figures: never below
them (else the pruning would keep a config that cannot launch) and not far above (else it would
drop configs that fit).

Compiles are slow (10-100 s of CPU each for the attention kernels): by default the CI set is
compiled (see ci_subset); FASTATTN_AOT_ALL=1 compiles every candidate (run it after changing a
tuning table). Parallel over os.cpu_count() processes (FASTATTN_AOT_JOBS overrides).
"""

from __future__ import annotations

import os
import shutil

import pytest

triton = pytest.importorskip("triton", reason="needs triton installed")

from tests import _triton_aot as aot  # noqa: E402

# Spill stores a thread may have, in bytes. Every job compiles the worst case of its tuning list
# at once: mask + dropout + both window edges (+ atomic dQ and the stored mask gradient for the
# dK/dV kernel), the extra live values of each feature adding up; the Philox state of dropout
# alone is ~16 words. Those combined variants spill up to ~270 B on sm_80 in the tuned lists
# (bf16 forward 192 B at E=64, fp32 dK/dV 272 B), i.e. a few dozen 4-byte values that stay in L1
# across a key block's two tensor-core products; the failures this test exists for are an order
# of magnitude larger (fp32 dK/dV at E=256: 22 KB a thread, 18-24 KB for 128-row fp32 tiles).
# The score modifiers (softcap, ALiBi, sinks) switched on as well took the bf16 forward at
# E<=256 (128x64 tile) on sm_90a from 484 B to 528 B (ALiBi's distance tile: 564 B without
# softcap, 464 B without ALiBi; register allocation moves by tens of bytes between variants) and
# the fp32 dK/dV at E<=128 on sm_80 to 544 B (the largest of the 74 attention jobs of the CI
# set), so the bound leaves that margin. The int8 GEMM / weight-only candidates spill nothing
# (all 161 of them, both architectures, after their K loops stopped carrying pointer tensors).
SPILL_BOUND = 640


def ci_subset(jobs: list[aot.Job]) -> list[aot.Job]:
    """The CI set: for each tuning list (kernel, architecture, dtype class, variant, head-dim
    class), its first candidate (the one FASTATTN_TRITON_AUTOTUNE=0 pins, as the GPU check runs)
    and the candidates with the largest shared-memory and register models (the two resources
    bounded here: a list whose extremes fit has a middle that fits, tiles growing monotonically in
    both); the fixed-config kernels all. About half the full set."""
    from fastattn.triton import attention as A
    from fastattn.triton import int8_gemm as G

    models = {"_attention_fwd_kernel": A._FWD, "_attention_bwd_dkdv_kernel": A._DKDV,
              "_attention_bwd_dq_kernel": A._DQ, "_kvcache_split_kernel": A._DECODE}
    groups: dict[tuple, list[aot.Job]] = {}
    keep = []
    for job in jobs:
        c = dict(job.constexprs)
        if job.kernel in models:
            key = (job.kernel, job.arch, job.label)
            groups.setdefault(key, []).append(job)
        elif job.kernel == "_int8_gemm_kernel":
            groups.setdefault((job.kernel, job.arch, c["BLOCK_K"] >= 256), []).append(job)
        elif job.kernel == "_int8_weight_only_kernel":
            groups.setdefault((job.kernel, job.arch, job.label), []).append(job)
        else:
            keep.append(job)

    def model(job):
        c = dict(job.constexprs)
        if job.kernel in models:
            d = c["HEAD_DIM"]
            tiles, acc = models[job.kernel].footprint(c["BLOCK_M"], c["BLOCK_N"], job.stages, d, d,
                                                      "fp32" in job.label)
            return tiles, acc / job.warps
        if job.kernel == "_int8_gemm_kernel":
            return G._gemm_smem_kw(c, job.stages), c["BLOCK_M"] * c["BLOCK_N"] / job.warps
        return c["BLOCK_K"] * (32 + c["BLOCK_N"]) * job.stages, 32 * c["BLOCK_N"] / job.warps

    for group in groups.values():
        picked = {group[0], max(group, key=lambda j: model(j)[0]),
                  max(group, key=lambda j: model(j)[1])}
        keep += [j for j in group if j in picked]
    return keep


@pytest.fixture(scope="module")
def compiled():
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas) and shutil.which("ptxas") is None:
        pytest.skip("triton's bundled ptxas is missing")
    jobs = aot.all_jobs()
    if os.environ.get("FASTATTN_AOT_ALL") != "1":
        jobs = ci_subset(jobs)
    return list(aot.compile_all(jobs))


def _table(rows: list[dict]) -> str:
    return "\n".join(
        f"  sm_{r['arch']} {r['kernel']} [{r['label']}] {r['constexprs'].get('BLOCK_M')}x"
        f"{r['constexprs'].get('BLOCK_N')} w{r['warps']} s{r['stages']}: {r['shared']} B smem, "
        f"{r['registers']} regs, {r['spill_stores']} B spilled" for r in rows)


def test_shared_memory_within_the_limit(compiled):
    over = [r for r in compiled if r["shared"] > aot.SMEM_LIMIT[r["arch"]]]
    assert not over, "shared memory above the per-block limit:\n" + _table(over)


def _spilling(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["registers"] > aot.MAX_REGISTERS
            or r["spill_stores"] > SPILL_BOUND]


def test_registers_and_spills_within_bounds(compiled):
    bad = _spilling(compiled)
    assert not bad, f"more than {SPILL_BOUND} B spilled a thread:\n" + _table(bad)


def test_silu_mul_kernels_fit():
    """The SiLU-and-mul kernels on their own (a few seconds: `-k silu` after changing them):
    within the shared-memory, register and spill bounds above on sm_80 and sm_90."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas) and shutil.which("ptxas") is None:
        pytest.skip("triton's bundled ptxas is missing")
    rows = list(aot.compile_all(aot.activation_jobs()))
    assert len(rows) == 8
    over = [r for r in rows if r["shared"] > aot.SMEM_LIMIT[r["arch"]]]
    assert not over, "shared memory above the per-block limit:\n" + _table(over)
    bad = [r for r in rows if r["registers"] > aot.MAX_REGISTERS or r["spill_stores"] > 0]
    assert not bad, "registers or spills:\n" + _table(bad)


def test_pruning_estimates_bound_the_compiler(compiled):
    """The pruning keeps a config when its estimate fits the device: the estimate must be at
    least the compiler's figure. It may exceed it (Triton keeps some operands in registers and
    multi-buffers fewer stages than num_stages for some tiles), for attention by at most 4x
    plus 16 KB."""
    from fastattn.triton import attention as A
    from fastattn.triton import int8_gemm as G

    models = {"_attention_fwd_kernel": A._FWD, "_attention_bwd_dkdv_kernel": A._DKDV,
              "_attention_bwd_dq_kernel": A._DQ, "_kvcache_split_kernel": A._DECODE}
    bad = []
    for r in compiled:
        c = r["constexprs"]
        if r["kernel"] in models:
            elem = 4 if "fp32" in r["label"] else 2
            est = models[r["kernel"]].smem_bytes(c["BLOCK_M"], c["BLOCK_N"], r["stages"],
                                                 c["HEAD_DIM"], c["HEAD_DIM_V"], elem,
                                                 c.get("HAS_MASK", False))
        elif r["kernel"] == "_int8_gemm_kernel":
            est = G._gemm_smem_kw(c, r["stages"])
        elif r["kernel"] == "_int8_weight_only_kernel":
            est = G._weight_only_smem_kw(c, r["stages"], 4 if c["FP32"] else 2)
        else:
            continue
        # the decoding and int8 models count every pipeline stage; Triton often allocates
        # fewer for their deep (3-5 stage) rings, so they are only held to the lower bound
        calibrated = r["kernel"] in models and r["kernel"] != "_kvcache_split_kernel"
        cap = 4 * r["shared"] + 16384 if calibrated else est
        if not r["shared"] <= est <= cap:
            bad.append(f"  sm_{r['arch']} {r['kernel']} [{r['label']}] {c.get('BLOCK_M')}x"
                       f"{c.get('BLOCK_N')} s{r['stages']}: estimate {est} B, compiler "
                       f"{r['shared']} B")
    assert not bad, "pruning estimates off the compiler's figures:\n" + "\n".join(bad)
