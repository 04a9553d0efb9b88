"""attention_with_kvcache for serving: the paged cache (block_table), window, return_lse and
k_new/v_new holding any number of tokens (issue 16).

The paged cache is checked against the contiguous cache holding the same tokens with shuffled
blocks: the same output by the correctness rule (docs/design.md; float64 reference, the
reference in the test dtype as the low-precision result), and the same written tokens gathered
back. Unused blocks and slots hold NaN, so a kernel that reads them fails. lse is checked
against a float64 logsumexp of the explicit scores. Backends: the C++ CPU kernels (each ISA
build, FASTATTN_CPU_ISA), Triton through the interpreter, the reference itself.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastattn
from fastattn import reference
from tests.helpers import assert_close_rule, skip_unless_backend

BACKENDS = ("cpu", "triton")


def need(backend: str) -> None:
    skip_unless_backend(backend)
    from fastattn.ops._backend import availability

    why = availability(backend, "cpu", "attention_kvcache" if backend == "cpu" else None)
    if why is not None:
        pytest.skip(f"backend {backend!r} cannot run attention_kvcache here: {why}")


def paged_copy(kc: torch.Tensor, block_size: int, *, spare: int = 3, seed: int = 0):
    """The contiguous cache kc (B, Hkv, cap, E) as a NaN-filled paged pool of shuffled blocks
    (cap % block_size == 0): -> (pool (num_blocks, Hkv, block_size, E), block_table int32
    (B, cap // block_size)). `spare` blocks belong to no sequence."""
    B, Hkv, cap, E = kc.shape
    nb = cap // block_size
    num_blocks = B * nb + spare
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    table = perm[:B * nb].reshape(B, nb).to(torch.int32)
    pool = torch.full((num_blocks, Hkv, block_size, E), float("nan"), dtype=kc.dtype)
    for b in range(B):
        for x in range(nb):
            pool[table[b, x]] = kc[b, :, x * block_size:(x + 1) * block_size]
    return pool, table


def gather(pool: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """A paged pool back as the contiguous (B, Hkv, max_blocks * block_size, E) caches."""
    return torch.cat([pool[table[:, x].long()] for x in range(table.shape[1])], dim=2)


def nan_unused(kc: torch.Tensor, lens, new: int) -> torch.Tensor:
    """kc with NaN in every slot past each sequence's tokens after the append."""
    kc = kc.clone()
    for b, n in enumerate(lens):
        kc[b, :, n + new:] = float("nan")
    return kc


def run_case(backend, *, B=3, H=4, Hkv=2, E=32, Ev=None, Lq=1, Lnew=1, block_size=16,
             max_blocks=4, lens=(5, 20, 40), dtype=torch.float32, window=None, rotary=False,
             leftpad=None, causal=True, lse=True, softcap=None, sinks=False, alibi=False):
    """One paged call against the reference on the contiguous cache (float64 and dtype)."""
    Ev = E if Ev is None else Ev
    cap = max_blocks * block_size
    g = torch.Generator().manual_seed(1)
    rn = lambda *s: torch.randn(*s, generator=g).to(dtype)
    q = rn(B, H, Lq, E)
    kc = nan_unused(rn(B, Hkv, cap, E), lens, 0)
    vc = nan_unused(rn(B, Hkv, cap, Ev), lens, 0)
    kn = rn(B, Hkv, Lnew, E) if Lnew else None
    vn = rn(B, Hkv, Lnew, Ev) if Lnew else None
    seqlens = torch.tensor(lens, dtype=torch.int32)
    kw = dict(causal=causal, window=window, softcap=softcap)
    if rotary:
        ang = torch.outer(torch.arange(cap, dtype=torch.float64),
                          1.0 / 100 ** (torch.arange(E // 4, dtype=torch.float64) / (E // 4)))
        kw.update(rotary_cos=ang.cos().float(), rotary_sin=ang.sin().float())
    if leftpad is not None:
        kw["cache_leftpad"] = torch.tensor(leftpad, dtype=torch.int32)
    if sinks:
        kw["sinks"] = torch.randn(H, generator=g)
    if alibi:
        kw["alibi_slopes"] = torch.rand(H, generator=g)
    kpool, table = paged_copy(kc, block_size)
    vpool, _ = paged_copy(vc, block_size)
    got = fastattn.attention_with_kvcache(q, kpool, vpool, seqlens, kn, vn, return_lse=lse,
                                          block_table=table, backend=backend, **kw)
    refs = {}
    for d in (torch.float64, dtype):
        kr, vr = kc.to(d), vc.to(d)
        cv = lambda t, d=d: None if t is None else t.to(d)
        # (the float32 tables as the kernels get them; float64 for the float64 reference)
        rkw = {k: (v.double() if k.startswith("rotary") and d == torch.float64 else v)
               for k, v in kw.items()}
        refs[d] = reference.attention_with_kvcache(cv(q), kr, vr, seqlens, cv(kn), cv(vn),
                                                   return_lse=True, **rkw)
        refs[d] = (*refs[d], kr, vr)
    out, lse_out = got if lse else (got, None)
    assert out.shape == (B, H, Lq, Ev) and out.dtype == dtype
    hi, lo = refs[torch.float64], refs[dtype]
    assert_close_rule(out, hi[0], lo[0], name="out")
    if lse:
        assert lse_out.shape == (B, H, Lq) and lse_out.dtype == torch.float32
        assert_close_rule(lse_out, hi[1], lo[1].float(), name="lse")
    # the append wrote the same tokens, touched no other slot: copied exactly; rotated keys are
    # computed in float32 and rounded once, where an FMA or the order of the products moves the
    # result by a few float32 units of the inputs (|x| ~ 1) before that rounding
    total = [n + Lnew for n in lens]
    eps = torch.finfo(dtype).eps
    for b in range(B):
        for name, pool, ref in (("k", kpool, lo[2]), ("v", vpool, lo[3])):
            back = gather(pool, table)[b, :, :total[b]]
            atol, rtol = (4 * eps, 2 * eps) if rotary and name == "k" else (0.0, 0.0)
            torch.testing.assert_close(back, ref[b, :, :total[b]], atol=atol, rtol=rtol,
                                       equal_nan=True, msg=lambda m, n=name: f"{n}_cache: {m}")
            assert torch.isnan(gather(pool, table)[b, :, total[b]:]).all()
    spare = sorted(set(range(kpool.shape[0])) - set(table.flatten().tolist()))
    assert torch.isnan(kpool[spare]).all() and torch.isnan(vpool[spare]).all()
    return out, lse_out, hi


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [16, 32, 48])
@pytest.mark.parametrize("H,Hkv,Lq", [(2, 2, 1), (4, 2, 1), (8, 1, 3)])
def test_paged_matches_contiguous(backend, block_size, H, Hkv, Lq):
    need(backend)
    if backend == "triton" and block_size == 48:
        pytest.skip("the interpreter is slow: 16 and 32 cover the Triton table reads")
    run_case(backend, H=H, Hkv=Hkv, Lq=Lq, Lnew=Lq, block_size=block_size,
             lens=(0, 17, 3 * block_size))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_paged_low_precision_rotary(backend, dtype):
    need(backend)
    run_case(backend, dtype=dtype, Lq=2, Lnew=2, rotary=True, E=40, lens=(3, 30, 50))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [(4, 0), (0, 0), (7, -1), (20, 2)])
@pytest.mark.parametrize("paged", [True, False])
def test_window(backend, window, paged):
    """Sliding window inside the cache (bottom-right): against the reference, and for a causal
    (w, 0) window equal to the call on a cache holding only the last w + 1 keys."""
    need(backend)
    if paged:
        run_case(backend, window=window, Lq=3, Lnew=3, H=4, Hkv=2, lens=(2, 21, 40),
                 causal=window[1] == 0)
        return
    g = torch.Generator().manual_seed(3)
    B, H, Hkv, E, cap, Lq = 2, 4, 2, 32, 64, 2
    q = torch.randn(B, H, Lq, E, generator=g)
    kc, vc = torch.randn(B, Hkv, cap, E, generator=g), torch.randn(B, Hkv, cap, E, generator=g)
    lens = torch.tensor([9, 50], dtype=torch.int32)
    out = fastattn.attention_with_kvcache(q, kc, vc, lens, window=window, backend=backend,
                                          causal=window[1] == 0)
    want = reference.attention_with_kvcache(q.double(), kc.double(), vc.double(), lens,
                                            window=window, causal=window[1] == 0)
    low = reference.attention_with_kvcache(q, kc, vc, lens, window=window, causal=window[1] == 0)
    assert_close_rule(out, want, low)
    if window[1] == 0 and window[0] > 0:  # the last query sees exactly keys [n - 1 - w, n - 1]
        w = window[0]
        for b, n in enumerate(lens.tolist()):
            first = max(0, n - 1 - w)
            only = reference.attention_with_kvcache(
                q[b:b + 1, :, -1:].double(), kc[b:b + 1, :, first:n].double(),
                vc[b:b + 1, :, first:n].double(), torch.tensor([n - first], dtype=torch.int32))
            torch.testing.assert_close(out[b:b + 1, :, -1:].double(), only, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS + ("reference",))
def test_lse_against_float64_logsumexp(backend):
    """lse (B, H, Lq) float32 = logsumexp of the scaled visible scores, computed here from the
    explicit float64 scores (sdpa's return_lse layout); -inf for a row with no visible key."""
    if backend != "reference":
        need(backend)
    g = torch.Generator().manual_seed(4)
    B, H, Hkv, E, cap, Lq = 2, 4, 2, 32, 48, 2
    q = torch.randn(B, H, Lq, E, generator=g)
    kc, vc = torch.randn(B, Hkv, cap, E, generator=g), torch.randn(B, Hkv, cap, E, generator=g)
    lens = torch.tensor([1, 30], dtype=torch.int32)
    out, lse = fastattn.attention_with_kvcache(q, kc, vc, lens, return_lse=True, backend=backend)
    assert lse.shape == (B, H, Lq) and lse.dtype == torch.float32
    for b, n in enumerate(lens.tolist()):
        k = kc[b].double().repeat_interleave(H // Hkv, 0)[:, :n]  # (H, n, E)
        s = q[b].double() @ k.transpose(-1, -2) / math.sqrt(E)  # (H, Lq, n)
        qpos = n - Lq + torch.arange(Lq)
        s = s.masked_fill(torch.arange(n)[None, :] > qpos[:, None], float("-inf"))
        want = torch.logsumexp(s, dim=-1)  # -inf on the empty row (batch 0, query 0)
        assert torch.isneginf(want[:, 0]).all() == (b == 0)
        torch.testing.assert_close(lse[b].double(), want, atol=2e-5, rtol=1e-5)
        # out is the softmax of the same scores applied to the values
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        v = vc[b].double().repeat_interleave(H // Hkv, 0)[:, :n]
        torch.testing.assert_close(out[b].double(), p @ v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Lq,Lnew", [(1, 4), (3, 1), (2, 0), (4, 7)])
def test_lnew_differs_from_lq(backend, Lq, Lnew):
    """k_new/v_new of Lnew tokens with Lq queries, the queries being the last Lq positions after
    the append (flash_attn_with_kvcache's rule), with rotary positions following them; Lq > Lnew
    puts queries on tokens already in the cache."""
    need(backend)
    run_case(backend, Lq=Lq, Lnew=Lnew, rotary=Lnew > 0, lens=(4, 19, 33))


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_leftpad_and_score_mods(backend):
    """cache_leftpad works with block_table (the first visible token, any block), and softcap /
    sinks / ALiBi with the paged cache and a window."""
    need(backend)
    run_case(backend, leftpad=(2, 17, 0), lens=(5, 20, 40), Lq=2, Lnew=2, window=(9, 0),
             softcap=5.0, sinks=True, alibi=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gqa_blocked_path(backend):
    """Many query rows per kv head (the CPU's blocked path, a per-sequence gather of the paged
    keys), with a window and lse."""
    need(backend)
    run_case(backend, H=8, Hkv=1, Lq=5, Lnew=5, window=(11, 0), lens=(0, 14, 41), E=64, Ev=32)


def draw_paged_case(data, *, max_B: int, max_blocks: int, max_new: int, groups) -> dict:
    """run_case's keywords for a random paged call: batch, block size, table width, new-token
    and query counts, lengths, GQA group and window."""
    B = data.draw(st.integers(1, max_B), label="B")
    block_size = data.draw(st.sampled_from([16, 32]), label="block_size")
    blocks = data.draw(st.integers(1, max_blocks), label="max_blocks")
    cap = block_size * blocks
    Lnew = data.draw(st.integers(0, max_new), label="Lnew")
    Lq = data.draw(st.integers(1, max_new), label="Lq")
    lens = tuple(data.draw(st.integers(0, cap - Lnew), label=f"len{b}") for b in range(B))
    G = data.draw(st.sampled_from(groups), label="G")
    window = data.draw(st.sampled_from([None, (3, 0), (10, -1)]), label="window")
    return dict(B=B, H=2 * G, Hkv=2, Lq=Lq, Lnew=Lnew, block_size=block_size,
                max_blocks=blocks, lens=lens, window=window, causal=True, E=16)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_random_tables(data):
    """Random block tables (any permutation of a pool larger than needed), lengths, block sizes
    and new-token counts: the CPU kernel equals the reference on the contiguous cache, and the
    written tokens land where the table says."""
    skip_unless_backend("cpu")
    run_case("cpu", **draw_paged_case(data, max_B=3, max_blocks=4, max_new=3, groups=[1, 2, 4]))


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_random_tables_triton(data):
    """The same property for the Triton kernels (append, split and combine) under the
    interpreter: 10 examples of at most 2 sequences and 2 blocks (~15 s in all on 2 cores)."""
    need("triton")
    run_case("triton", **draw_paged_case(data, max_B=2, max_blocks=2, max_new=2, groups=[1, 2]))


# ---------------------------------------------------------------------------------------------
def _small_paged():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 1, 16, generator=g)
    kc, vc = torch.randn(6, 2, 16, 16, generator=g), torch.randn(6, 2, 16, 16, generator=g)
    table = torch.tensor([[4, 1], [0, 5]], dtype=torch.int32)
    lens = torch.tensor([3, 20], dtype=torch.int32)
    kn, vn = torch.randn(2, 2, 2, 16, generator=g), torch.randn(2, 2, 2, 16, generator=g)
    return q, kc, vc, lens, kn, vn, table


def test_opcheck():
    skip_unless_backend("cpu")
    q, kc, vc, lens, kn, vn, table = _small_paged()
    for op in (torch.ops.fastattn.attention_kvcache.default,
               torch.ops.fastattn.attention_kvcache_lse.default):
        torch.library.opcheck(op, (q, kc.clone(), vc.clone(), lens, kn, vn, 0.25, True, None,
                                   None, None, False, 0.0, None, None, table, 8, 0))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter mode only")
def test_opcheck_triton():
    skip_unless_backend("triton")
    q, kc, vc, lens, kn, vn, table = _small_paged()
    torch.library.opcheck(torch.ops.fastattn.triton_attention_kvcache_lse.default,
                          (q, kc.clone(), vc.clone(), lens, kn, vn, 0.25, True, None, None, None,
                           False, 0.0, None, None, table, 8, 0),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    skip_unless_backend("cpu")
    q, kc, vc, lens, kn, vn, table = _small_paged()
    fn = lambda q, kc, vc: fastattn.attention_with_kvcache(  # noqa: E731
        q, kc, vc, lens, kn, vn, block_table=table, window=(8, 0), return_lse=True)
    kc2, vc2 = kc.clone(), vc.clone()
    out, lse = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, kc, vc)
    want, want_lse = fastattn.attention_with_kvcache(q, kc2, vc2, lens, kn, vn,
                                                     block_table=table, window=(8, 0),
                                                     return_lse=True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_cpu_isa_builds():
    """Every ISA build the CPU kvcache kernels have runs the paged, windowed, lse case: this
    process runs the CPU's own level (every other test here), a child process each level below
    it (FASTATTN_CPU_ISA caps the choice; the AVX-512 builds run where the CPU has them)."""
    skip_unless_backend("cpu")
    levels = ("portable", "avx2", "avx512")
    from fastattn.ops import _backend

    own = _backend.NATIVE.cpu_isa()
    below = [isa for isa in levels if levels.index(isa) < levels.index(own)] if own in levels \
        else list(levels)
    code = ("import torch, fastattn; from tests.test_kv_cache_paged import run_case;"
            "print(fastattn._C.cpu_isa());"
            "run_case('cpu', window=(9, 0), Lq=2, Lnew=3, rotary=True, lens=(0, 17, 40));"
            "run_case('cpu', H=8, Hkv=2, Lq=3, Lnew=3, lens=(1, 17, 40), dtype=torch.bfloat16)")
    for isa in below:
        env = {**os.environ, "FASTATTN_CPU_ISA": isa}
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert r.returncode == 0, r.stdout + r.stderr[-3000:]
