"""The CUDA kernels of csrc/cuda, checked without a GPU.

1. nvcc compiles every .cu for sm_80 and sm_90a (``-Xptxas -v``, the extension's flags); a
   compile error or a register spill in any kernel fails, and the register count of each kernel
   is reported (and written next to the build logs).
2. The torch bindings (csrc/cuda/*.cpp) pass ``g++ -fsyntax-only`` against this torch's headers.
   This torch is a CPU build without c10/cuda headers, so the three torch CUDA entry points the
   bindings use (current stream, device guard, SM count) are declared instead of included
   (FASTATTN_CUDA_SYNTAX_CHECK); everything else in the bindings is checked.
3. The same kernel sources are compiled for the host emulator in csrc/cuda/emulation (a fiber
   per CUDA thread, the PTX fragment layouts of mma.sync / ldmatrix, deferred cp.async,
   warp-by-warp scheduling that exposes missing barriers) and run through ctypes against
   fastattn.reference with the correctness rule (docs/design.md), launch planning included.

Each compile job is cached in build/cuda_check/ under the hash of its inputs (its sources, the
headers, flags and compiler versions); FASTATTN_CUDA_CHECK_NO_CACHE=1 rebuilds everything.
Everything skips cleanly when nvcc is not on PATH.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastattn import reference
from tests.helpers import assert_close_rule, nan_padded

REPO = Path(__file__).resolve().parents[1]
CUDA_DIR = REPO / "csrc" / "cuda"
KERNEL_FILES = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
BINDING_FILES = sorted(p.name for p in CUDA_DIR.glob("*.cpp"))
ARCHS = {"sm_80": "arch=compute_80,code=sm_80", "sm_90a": "arch=compute_90a,code=sm_90a"}
# torch.utils.cpp_extension's nvcc flags plus setup.py's, so the kernels compile as in the build
NVCC_FLAGS = [
    "-std=c++17", "-O3", "-Xptxas", "-v", "--use_fast_math", "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
]
# head-dim buckets compiled here (bit i = kHeadDimBuckets[i]); the package build compiles all 8
NVCC_HEAD_DIMS = 0x8A  # 64, 128, 256: the common ones and the register-heaviest
EMU_HEAD_DIMS = 0x8E  # 64, 96, 128, 256: the buckets of the head dims tested below
EMU_FLAGS = ["-std=c++17", "-O1", "-fPIC", "-DFASTATTN_EMULATE", "-ffp-contract=off",
             "-fno-strict-aliasing", "-w", f"-DFASTATTN_HEAD_DIM_MASK={EMU_HEAD_DIMS}"]
JOBS = 2

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------
def _cuda_include() -> Path | None:
    """The toolkit's include directory, from nvcc itself (it may be a wrapper script)."""
    out = subprocess.run([NVCC, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    m = re.search(r"_HERE_=(\S+)", out)
    roots = [Path(m.group(1)).parent] if m else []
    roots += [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    roots.append(Path("/usr/local/cuda"))
    for root in roots:
        for inc in (root / "include", root / "targets" / "x86_64-linux" / "include"):
            if (inc / "cuda_bf16.h").exists():
                return inc
    return None


def _tool_version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout
    except OSError:
        return ""


def _torch_includes() -> list[Path]:
    root = Path(torch.__file__).parent / "include"
    return [root, root / "torch" / "csrc" / "api" / "include"]


def _run(cmd: list[str], log: Path) -> int:
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    log.write_text(f"{r.returncode}\n$ {' '.join(cmd)}\n{r.stdout}{r.stderr}")
    return r.returncode


def _read_log(log: Path) -> tuple[int, str]:
    rc, _, text = log.read_text().partition("\n")
    return int(rc), text


class _Job:
    """A compile command cached under a hash of its inputs: the headers of csrc/cuda, its own
    sources, its flags and the compiler versions."""

    def __init__(self, cache: Path, name: str, sources: list[Path], make_cmd, salt: str):
        h = hashlib.sha256(salt.encode() + name.encode())
        for p in sources:
            h.update(str(p).encode() + p.read_bytes())
        self.key = h.hexdigest()[:16]
        self.name = name
        self.out = cache / f"{name}.{self.key}.o"
        self.log = cache / f"{name}.{self.key}.log"
        self.cmd = make_cmd(self.out)


@pytest.fixture(scope="module")
def builds():
    """Runs the compile jobs (nvcc per file and arch, the emulator objects and library, the
    binding syntax check) on JOBS workers, each cached by the hash of its inputs. Returns the
    logs by job name and the emulator library."""
    inc = _cuda_include()
    if inc is None:
        pytest.skip("nvcc found but not the CUDA headers (cuda_bf16.h)")
    if os.environ.get("FASTATTN_CUDA_CHECK_NO_CACHE") == "1":
        cache = Path(tempfile.mkdtemp(prefix="fastattn_cuda_check_"))
    else:
        cache = REPO / "build" / "cuda_check"
        cache.mkdir(parents=True, exist_ok=True)
    headers = sorted(p for p in CUDA_DIR.rglob("*") if p.suffix in (".h", ".cuh"))
    salt = json.dumps([NVCC_FLAGS, NVCC_HEAD_DIMS, EMU_FLAGS, torch.__version__, str(inc)])
    salt += _tool_version([NVCC, "--version"]) + _tool_version(["g++", "--version"])

    def nvcc_cmd(src: Path, gencode: str):
        return lambda o: [NVCC, *NVCC_FLAGS, f"-DFASTATTN_HEAD_DIM_MASK={NVCC_HEAD_DIMS}",
                          "-gencode", gencode, "-c", str(src), "-o", str(o)]

    def emu_cmd(src: Path):
        return lambda o: ["g++", *EMU_FLAGS, "-I", str(CUDA_DIR), "-I", str(inc), "-x", "c++",
                          "-c", str(src), "-o", str(o)]

    jobs: list[_Job] = []
    for f in KERNEL_FILES:
        for arch, gencode in ARCHS.items():
            src = CUDA_DIR / f
            jobs.append(_Job(cache, f"nvcc.{f}.{arch}", headers + [src], nvcc_cmd(src, gencode),
                             salt))
    emu_jobs = []
    for f in KERNEL_FILES + ["emulation/emu_api.cc"]:
        src = CUDA_DIR / f
        emu_jobs.append(_Job(cache, f"emu.{src.name}", headers + [src], emu_cmd(src), salt))
    jobs += emu_jobs
    torch_inc = _torch_includes()
    if all(p.exists() for p in torch_inc):
        bindings = [CUDA_DIR / f for f in BINDING_FILES]
        all_cpp = cache / "bindings_all.cpp"
        all_cpp.write_text("".join(f'#include "{f}"\n' for f in BINDING_FILES))
        jobs.append(_Job(cache, "bindings", headers + bindings, lambda o: [
            "g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
            "-DFASTATTN_CUDA_SYNTAX_CHECK", "-DFASTATTN_WITH_CUDA",
            *[a for p in torch_inc for a in ("-isystem", str(p))], "-isystem", str(inc),
            "-I", str(CUDA_DIR), str(all_cpp)], salt))

    todo = [j for j in jobs if not j.log.exists()]
    with concurrent.futures.ThreadPoolExecutor(JOBS) as pool:
        for fut in [pool.submit(_run, j.cmd, j.log.with_suffix(".tmp")) for j in todo]:
            fut.result()
    for j in todo:
        j.log.with_suffix(".tmp").replace(j.log)
    link_key = hashlib.sha256("".join(j.key for j in emu_jobs).encode()).hexdigest()[:16]
    lib = cache / f"libfastattn_cuda_emu.{link_key}.so"
    link_log = cache / f"emu.link.{link_key}.log"
    if not link_log.exists() and all(_read_log(j.log)[0] == 0 for j in emu_jobs):
        _run(["g++", "-shared", "-o", str(lib), *(str(j.out) for j in emu_jobs)], link_log)
    keep = {p.name for j in jobs for p in (j.out, j.log)} | {lib.name, link_log.name,
                                                             "bindings_all.cpp"}
    for p in cache.iterdir():  # outputs of older sources
        if p.is_file() and p.name not in keep and not p.name.startswith("registers."):
            p.unlink()
    return {"dir": cache, "logs": {j.name: j.log for j in jobs}, "lib": lib,
            "link_log": link_log}


# ---------------------------------------------------------------------------------------------
# 1. nvcc + ptxas
# ---------------------------------------------------------------------------------------------
def _demangle(names: list[str]) -> list[str]:
    if not names or shutil.which("c++filt") is None:
        return names
    r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    out = r.stdout.splitlines()
    return out if len(out) == len(names) else names


def parse_ptxas(text: str) -> list[dict]:
    """One entry per compiled kernel: name, registers, spill stores/loads (bytes), stack frame."""
    kernels: list[dict] = []
    cur = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            cur = {"mangled": m.group(1), "registers": None, "spill_stores": 0, "spill_loads": 0,
                   "stack": 0}
            kernels.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
    for k, name in zip(kernels, _demangle([k["mangled"] for k in kernels]), strict=True):
        k["name"] = re.sub(r"fastattn::cuda::(detail::)?", "", name.split("(fastattn")[0])
    return kernels


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("source", KERNEL_FILES)
def test_nvcc_compiles_without_spills(builds, source, arch):
    rc, text = _read_log(builds["logs"][f"nvcc.{source}.{arch}"])
    assert rc == 0, f"nvcc failed for {source} ({arch}):\n{text[-6000:]}"
    assert "warning" not in text.lower(), f"nvcc warnings for {source} ({arch}):\n{text[-4000:]}"
    kernels = parse_ptxas(text)
    assert kernels, f"no kernel compiled from {source}"
    report = builds["dir"] / f"registers.{source}.{arch}.json"
    report.write_text(json.dumps(kernels, indent=1))
    print(f"\n{source} ({arch}): registers per kernel")
    for k in kernels:
        print(f"  {k['registers']:4d} regs  {k['spill_stores']:4d}/{k['spill_loads']:<4d} spill B  "
              f"{k['name']}")
    spilling = [k["name"] for k in kernels if k["spill_stores"] or k["spill_loads"]]
    assert not spilling, f"register spills in {source} ({arch}): {spilling}"
    assert all(k["registers"] is not None and k["registers"] <= 255 for k in kernels)


def test_bindings_syntax(builds):
    log = builds["logs"].get("bindings")
    if log is None:
        pytest.skip("this torch has no C++ headers")
    rc, text = _read_log(log)
    assert rc == 0, f"g++ -fsyntax-only of csrc/cuda/*.cpp failed:\n{text[-6000:]}"


# ---------------------------------------------------------------------------------------------
# 2. the host emulator
# ---------------------------------------------------------------------------------------------
DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
OUT_TYPE = {None: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
SMS = 132  # H200


class Emu:
    """ctypes front of emulation/emu_api.cc; the wrappers allocate what the bindings allocate."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.fa_emu_message.restype = ctypes.c_char_p
        self.lib.fa_emu_collectives.restype = ctypes.c_longlong
        self.lib.fa_emu_smem_bytes.restype = ctypes.c_longlong

    def check(self, rc: int) -> None:
        if rc != 0:
            msg = self.lib.fa_emu_message().decode()
            raise RuntimeError(f"emulated launch failed ({rc}): {msg}")

    def configure(self, order: int = 4, eager: bool = False) -> None:
        self.lib.fa_emu_configure(order, int(eager))


def _p(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def _fp(t):
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float)) if t is not None else None


def _i64(xs):
    return (ctypes.c_int64 * len(xs))(*xs)


def _i32(xs):
    return (ctypes.c_int * len(xs))(*xs)


def _sentinel(dtype):
    return 1234.5 if dtype.is_floating_point else -99


def guarded(shape, dtype, fill=float("nan")):
    """An output buffer inside a larger one whose margins hold a sentinel: writes past the end
    of the output show up in check_guard."""
    n = math.prod(shape)
    big = torch.full((n + 64,), _sentinel(dtype), dtype=dtype)
    view = big[32:32 + n].view(shape)
    view.fill_(fill if dtype.is_floating_point else -7)
    return view, big


def check_guard(big):
    expect = _sentinel(big.dtype)
    assert bool((big[:32] == expect).all()) and bool((big[-32:] == expect).all()), (
        "kernel wrote outside its output")


@pytest.fixture(scope="module")
def emu(builds):
    rc, text = _read_log(builds["link_log"]) if builds["link_log"].exists() else (1, "")
    if rc != 0:
        logs = "\n".join(p.read_text()[-3000:] for n, p in builds["logs"].items()
                         if n.startswith("emu.") and p.exists())
        pytest.fail(f"the emulator library did not build:\n{logs}")
    e = Emu(builds["lib"])
    e.configure()
    return e


def test_emulator_exposes_races_and_divergence(emu):
    """The emulator's own check: a cross-warp shared-memory exchange is right with a barrier and
    wrong without one (warps run one at a time), and shuffles in divergent branches are refused.
    """
    out = torch.zeros(64, dtype=torch.int32)
    emu.check(emu.lib.fa_emu_selftest(0, _p(out), 64))
    assert torch.equal(out, (torch.arange(64) + 32) % 64)
    emu.check(emu.lib.fa_emu_selftest(1, _p(out), 64))
    assert not torch.equal(out, (torch.arange(64) + 32) % 64), "the missing barrier went unseen"
    with pytest.raises(RuntimeError, match="divergence"):
        emu.check(emu.lib.fa_emu_selftest(2, _p(out), 32))


def test_launchers_reject_bad_sizes(emu):
    q = torch.randn(1, 3, 4, 300)
    kv = torch.randn(1, 3, 4, 300)
    with pytest.raises(RuntimeError, match="launcher returned error"):  # head dim > 256
        attention_fwd(emu, q, kv, kv, None, 0.1, -1, -1, 0)
    q, kv = torch.randn(1, 3, 4, 64), torch.randn(1, 2, 4, 64)
    with pytest.raises(RuntimeError, match="launcher returned error"):  # 3 % 2 heads
        attention_fwd(emu, q, kv, kv, None, 0.1, -1, -1, 0)


# ---- launch parameters (pure C++ in launch_params.h) ------------------------------------------
def test_launch_params(emu):
    lib = emu.lib
    buckets = [32, 64, 96, 128, 160, 192, 224, 256]
    for d in range(1, 300):
        b = lib.fa_emu_head_dim_bucket(d)
        assert b == (min(x for x in buckets if x >= d) if d <= 256 else -1), d
    out5 = (ctypes.c_int * 5)()
    for d in buckets:
        lib.fa_emu_attn_fwd_tile(d, out5)
        n_warps, m_tiles, block_m, block_n, _ = list(out5)
        assert block_m == 16 * m_tiles * n_warps and block_n % 16 == 0
        for which in range(7):  # every tile fits the 227 KB of shared memory per block
            assert 0 < lib.fa_emu_smem_bytes(which, d) <= 227 * 1024, (which, d)
    assert 0 < lib.fa_emu_smem_bytes(7, 0) <= 227 * 1024
    out2 = (ctypes.c_longlong * 2)()
    for blocks in (1, 3, 64, 1000, 10**6):
        for max_keys in (0, 1, 31, 127, 128, 4096, 100_003, 1 << 20):
            for sms in (1, 108, 132):
                lib.fa_emu_kvcache_split(blocks, max_keys, sms, out2)
                splits, length = out2[0], out2[1]
                assert 1 <= splits <= 64 and length % 32 == 0 and length > 0
                assert splits * length >= max_keys and (splits - 1) * length < max(max_keys, 1)
                if blocks >= 2 * sms or max_keys <= 128:
                    assert splits == 1
    last = -1
    for n in (1, 256, 257, 1024, 4096, 8192, 16384, 32768, 32769):
        idx = lib.fa_emu_norm_config_index(n, 2)
        assert idx == -1 or idx >= last
        last = idx if idx >= 0 else last
    assert lib.fa_emu_norm_config_index(32768, 2) == 5
    assert lib.fa_emu_norm_config_index(32769, 2) == -1
    assert lib.fa_emu_norm_bwd_blocks(0, 4, 132) == 1
    assert lib.fa_emu_norm_bwd_blocks(10, 4, 132) == 3
    assert lib.fa_emu_norm_bwd_blocks(10**6, 1, 132) == 264
    assert lib.fa_emu_int8_gemm_use_large(4096, 4096, 132) == 1
    assert lib.fa_emu_int8_gemm_use_large(16, 4096, 132) == 0


# ---- attention forward -----------------------------------------------------------------------
def attention_fwd(emu, q, k, v, mask, scale, wl, wr, diag):
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[-1]
    out, big_out = guarded((B, H, L, Ev), q.dtype)
    lse, big_lse = guarded((B, H, L), torch.float32)
    mst = list(mask.stride()) if mask is not None else [0] * 4
    st = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mst, *out.stride()[:3],
          *lse.stride()[:2]]
    emu.check(emu.lib.fa_emu_attention_fwd(
        DT[q.dtype], _p(q), _p(k), _p(v), _p(mask), _p(out), _fp(lse), _i64(st),
        _i32([B, H, Hkv, L, S, E, Ev]), ctypes.c_float(scale), ctypes.c_int64(wl),
        ctypes.c_int64(wr), ctypes.c_int64(diag)))
    check_guard(big_out)
    check_guard(big_lse)
    return out, lse


def window_args(L, S, causal, window, align):
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right, (0 if align == "top_left" else S - L)


def sdpa_lowp(q, k, v, mask, causal, window, align, scale):
    """Plain PyTorch in the kernel's dtype: SDPA with the window folded into the mask."""
    L, S = q.shape[2], k.shape[2]
    vis = reference.visible_keys(L, S, is_causal=causal, window=window, causal_alignment=align)
    m = mask
    if vis is not None:
        add = torch.zeros(L, S, dtype=q.dtype).masked_fill(~vis, float("-inf"))
        m = add if m is None else m + add
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=True)


ATTN_CASES = {
    # id: (B, H, Hkv, L, S, E, Ev, dtype, causal, window, alignment, mask, strided)
    "bf16-d64": (1, 2, 2, 128, 128, 64, 64, torch.bfloat16, False, None, "top_left", False, False),
    "fp16-d40-gqa-causal-br": (1, 4, 2, 17, 113, 40, 40, torch.float16, True, None,
                               "bottom_right", False, False),
    "bf16-d80-window-mask": (3, 2, 2, 70, 33, 80, 80, torch.bfloat16, False, (5, 3), "top_left",
                             True, False),
    "bf16-one-token": (1, 1, 1, 1, 1, 64, 64, torch.bfloat16, False, None, "top_left", False,
                       False),
    "fp32-d111-causal": (1, 2, 2, 33, 70, 111, 111, torch.float32, True, None, "top_left", False,
                         False),
    "bf16-d256-strided": (1, 2, 1, 40, 200, 256, 256, torch.bfloat16, True, None, "bottom_right",
                          False, True),
    "fp16-d128-ev64": (2, 2, 2, 200, 150, 128, 64, torch.float16, False, None, "top_left", False,
                       False),
    "bf16-empty-rows": (1, 2, 2, 70, 33, 64, 64, torch.bfloat16, True, None, "bottom_right",
                        False, False),
    "fp32-gqa-mask-strided": (2, 4, 2, 20, 45, 64, 64, torch.float32, False, (-1, 7), "top_left",
                              True, True),
}


def make_attention_inputs(case):
    B, H, Hkv, L, S, E, Ev, dtype, causal, window, align, masked, strided = case
    q = torch.randn(B, H, L, E, dtype=dtype)
    k = torch.randn(B, Hkv, S, E, dtype=dtype)
    v = torch.randn(B, Hkv, S, Ev, dtype=dtype)
    if strided:  # unaligned views carved out of NaN storage: out-of-bounds reads show as NaN
        q, k, v = nan_padded(q), nan_padded(k), nan_padded(v)
    mask = torch.randn(B, 1, L, S, dtype=dtype).expand(B, H, L, S) if masked else None
    return q, k, v, mask


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_fwd(emu, case):
    cfg = ATTN_CASES[case]
    causal, window, align = cfg[8], cfg[9], cfg[10]
    q, k, v, mask = make_attention_inputs(cfg)
    scale = 1.0 / math.sqrt(q.shape[-1])
    wl, wr, diag = window_args(q.shape[2], k.shape[2], causal, window, align)
    out, lse = attention_fwd(emu, q, k, v, mask, scale, wl, wr, diag)
    ref, ref_lse = reference.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), mask.double() if mask is not None else None,
        is_causal=causal, scale=scale, enable_gqa=True, window=window, causal_alignment=align,
        return_lse=True)
    assert_close_rule(out, ref, sdpa_lowp(q, k, v, mask, causal, window, align, scale))
    assert_close_rule(lse, ref_lse.float(), ref_lse.float(), eps=1e-4, name="lse")


def test_attention_fwd_schedules(emu):
    """cp.async landing at issue instead of at the wait, and other thread orders: same bits."""
    q, k, v, mask = make_attention_inputs(ATTN_CASES["bf16-d80-window-mask"])
    args = (q, k, v, mask, 0.125, 5, 3, 0)
    base = attention_fwd(emu, *args)
    try:
        for order, eager in ((4, True), (3, False), (2, False)):
            emu.configure(order, eager)
            again = attention_fwd(emu, *args)
            assert all(torch.equal(a, b) for a, b in zip(base, again, strict=True)), (order, eager)
    finally:
        emu.configure()


# ---- attention backward ----------------------------------------------------------------------
def attention_bwd(emu, do, q, k, v, out, lse, glse, mask, scale, wl, wr, diag, want_dmask):
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[-1]
    dq, bq = guarded((B, H, L, E), q.dtype)
    dk, bk = guarded((B, Hkv, S, E), q.dtype)
    dv, bv = guarded((B, Hkv, S, Ev), q.dtype)
    dmask, bm = guarded((B, H, L, S), q.dtype, fill=0.0) if want_dmask else (None, None)
    z = [0] * 4
    st = [*do.stride()[:3], *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
          *lse.stride()[:2], *(glse.stride()[:2] if glse is not None else (0, 0)),
          *(mask.stride() if mask is not None else z), *dq.stride()[:3], *dk.stride()[:3],
          *dv.stride()[:3], *(dmask.stride() if dmask is not None else z)]
    emu.check(emu.lib.fa_emu_attention_bwd(
        DT[q.dtype], _p(do), _p(q), _p(k), _p(v), _p(out), _fp(lse), _fp(glse), _p(mask), _p(dq),
        _p(dk), _p(dv), _p(dmask), _i64(st), _i32([B, H, Hkv, L, S, E, Ev]),
        ctypes.c_float(scale), ctypes.c_int64(wl), ctypes.c_int64(wr), ctypes.c_int64(diag)))
    for big in (bq, bk, bv) + ((bm,) if want_dmask else ()):
        check_guard(big)
    return dq, dk, dv, dmask


BWD_CASES = {
    # id: (B, H, Hkv, L, S, E, Ev, dtype, causal, window, alignment, mask, strided, grad_lse)
    "bf16-d64": (1, 2, 2, 40, 50, 64, 64, torch.bfloat16, False, None, "top_left", False, False,
                 False),
    "fp16-d40-gqa-causal-br": (1, 4, 2, 37, 70, 40, 40, torch.float16, True, None,
                               "bottom_right", False, False, False),
    "bf16-d80-window-mask-glse": (2, 2, 1, 70, 33, 80, 80, torch.bfloat16, False, (5, 3),
                                  "top_left", True, False, True),
    "fp32-d111-causal-mask": (1, 2, 2, 33, 50, 111, 111, torch.float32, True, None, "top_left",
                              True, False, False),
    "bf16-d256-simt-glse": (1, 2, 1, 33, 40, 256, 256, torch.bfloat16, True, None, "top_left",
                            False, False, True),
    "bf16-empty-rows-strided": (1, 2, 2, 70, 33, 64, 64, torch.bfloat16, True, None,
                                "bottom_right", False, True, True),
}


def run_bwd_case(emu, cfg):
    B, H, Hkv, L, S, E, Ev, dtype, causal, window, align, masked, strided, with_glse = cfg
    q, k, v, mask = make_attention_inputs(cfg[:13])
    if masked:
        mask = torch.randn(B, H, L, S, dtype=dtype)  # a full mask: its gradient is dmask
    scale = 1.0 / math.sqrt(E)
    wl, wr, diag = window_args(L, S, causal, window, align)
    out, lse = attention_fwd(emu, q, k, v, mask, scale, wl, wr, diag)
    do = torch.randn_like(out)
    glse = torch.randn(B, H, L) if with_glse else None
    got = attention_bwd(emu, do, q, k, v, out, lse, glse, mask, scale, wl, wr, diag, masked)
    return (q, k, v, mask, do, glse, scale), got


@pytest.mark.parametrize("case", list(BWD_CASES))
def test_attention_bwd(emu, case):
    cfg = BWD_CASES[case]
    causal, window, align, masked = cfg[8], cfg[9], cfg[10], cfg[11]
    (q, k, v, mask, do, glse, scale), (dq, dk, dv, dmask) = run_bwd_case(emu, cfg)

    def grads(dtype, fn):
        qq, kk, vv = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
        mm = mask.detach().to(dtype).requires_grad_() if masked else None
        o, lse_ = fn(qq, kk, vv, mm)
        loss = (o * do.to(dtype)).sum()
        if glse is not None:
            loss = loss + (torch.where(torch.isfinite(lse_), lse_, 0.0) * glse.to(dtype)).sum()
        return torch.autograd.grad(loss, [qq, kk, vv] + ([mm] if masked else []))

    def ref(qq, kk, vv, mm):
        return reference.scaled_dot_product_attention(
            qq, kk, vv, mm, is_causal=causal, scale=scale, enable_gqa=True, window=window,
            causal_alignment=align, return_lse=True)

    hi = grads(torch.float64, ref)
    lo = grads(q.dtype, ref)
    # dmask only when the mask takes part (hi/lo have 3 or 4 entries)
    for name, got, h, low in zip(("dq", "dk", "dv", "dmask"), (dq, dk, dv, dmask), hi, lo,
                                 strict=False):
        assert_close_rule(got, h, low, factor=3.0, name=name)


def test_attention_bwd_deterministic(emu):
    """Another thread schedule gives the same bits: the backward has no order-dependent sums."""
    cfg = BWD_CASES["bf16-d80-window-mask-glse"]
    torch.manual_seed(1)
    _, first = run_bwd_case(emu, cfg)
    try:
        emu.configure(2)
        torch.manual_seed(1)
        _, second = run_bwd_case(emu, cfg)
    finally:
        emu.configure()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


# ---- packed variable-length sequences ----------------------------------------------------------
def attention_varlen_fwd(emu, q, k, v, cu_q, cu_k, max_q, max_k, scale, wl, wr, bottom_right):
    """The binding's launch on the emulator: q (total_q, H, E), k/v (total_k, Hkv, E/Ev) -> out
    (total_q, H, Ev), lse (H, total_q), both guarded against writes past their end."""
    total_q, H, E = q.shape
    total_k, Hkv, Ev = k.shape[0], k.shape[1], v.shape[-1]
    out, big_out = guarded((total_q, H, Ev), q.dtype)
    lse, big_lse = guarded((H, total_q), torch.float32)
    st = [*q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2], lse.stride(0)]
    emu.check(emu.lib.fa_emu_attention_varlen_fwd(
        DT[q.dtype], _p(q), _p(k), _p(v), _p(out), _fp(lse), _i64(st),
        _i32([len(cu_q) - 1, H, Hkv, max_q, max_k, E, Ev]), _p(cu_q), _p(cu_k),
        _i64([total_q, total_k]), ctypes.c_float(scale), ctypes.c_int64(wl), ctypes.c_int64(wr),
        int(bottom_right)))
    check_guard(big_out)
    check_guard(big_lse)
    return out, lse


VARLEN_CASES = {
    # id: (query lengths, key lengths, H, Hkv, E, Ev, dtype, causal, window, alignment, strided)
    # sequences of 0 and 1 rows, L != S both ways, GQA
    "bf16-gqa-causal-br": ([0, 1, 37, 5, 70], [3, 0, 50, 9, 70], 4, 2, 64, 64, torch.bfloat16,
                           True, None, "bottom_right", False),
    "fp16-window-tl-strided": ([17, 130, 1], [40, 100, 1], 2, 2, 128, 128, torch.float16, False,
                               (8, 4), "top_left", True),
    "fp32-d40-gqa3-causal-tl": ([5, 0, 33], [7, 4, 20], 3, 1, 40, 40, torch.float32, True, None,
                                "top_left", False),
    "bf16-d256-causal-window-br": ([64, 3], [80, 10], 2, 1, 256, 256, torch.bfloat16, True,
                                   (16, -1), "bottom_right", True),
    "fp16-d96-ev64-window-br": ([20, 9, 0], [9, 31, 0], 4, 4, 96, 64, torch.float16, False,
                                (-1, 2), "bottom_right", False),
}


def make_varlen_inputs(case):
    lq, lk, H, Hkv, E, Ev, dtype, causal, window, align, strided = case
    cu_q = torch.tensor([0, *itertools.accumulate(lq)], dtype=torch.int32)
    cu_k = torch.tensor([0, *itertools.accumulate(lk)], dtype=torch.int32)
    q = torch.randn(sum(lq), H, E, dtype=dtype)
    k = torch.randn(sum(lk), Hkv, E, dtype=dtype)
    v = torch.randn(sum(lk), Hkv, Ev, dtype=dtype)
    if strided:  # NaN around every row: reads outside a sequence's rows show as NaN
        q, k, v = nan_padded(q), nan_padded(k), nan_padded(v)
    # the grid is sized by the maxima, which only bound the lengths
    return q, k, v, cu_q, cu_k, max(lq) + 3, max(lk) + 17


@pytest.mark.parametrize("case", list(VARLEN_CASES))
def test_attention_varlen_fwd(emu, case):
    cfg = VARLEN_CASES[case]
    causal, window, align = cfg[7], cfg[8], cfg[9]
    q, k, v, cu_q, cu_k, max_q, max_k = make_varlen_inputs(cfg)
    scale = 1.0 / math.sqrt(q.shape[-1])
    wl, wr, _ = window_args(0, 0, causal, window, align)
    out, lse = attention_varlen_fwd(emu, q, k, v, cu_q, cu_k, max_q, max_k, scale, wl, wr,
                                    align == "bottom_right")
    kw = dict(is_causal=causal, scale=scale, window=window, causal_alignment=align,
              return_lse=True)
    hi, hi_lse = reference.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, **kw)
    low, low_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, **kw)
    assert_close_rule(out, hi, low)
    assert_close_rule(lse, hi_lse, low_lse.float(), name="lse")
    empty = (cu_q[1:] - cu_q[:-1] > 0) & (cu_k[1:] == cu_k[:-1])
    for b in empty.nonzero().flatten().tolist():  # a sequence without keys: zeros, lse -inf
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        assert torch.equal(out[rows], torch.zeros_like(out[rows]))
        assert bool((lse[:, rows] == float("-inf")).all())


def attention_varlen_bwd(emu, do, q, k, v, out, lse, glse, cu_q, cu_k, max_q, max_k, scale, wl,
                         wr, bottom_right):
    """-> dq (total_q, H, E), dk (total_k, Hkv, E), dv (total_k, Hkv, Ev), NaN-initialised and
    guarded: every row must be written, and nothing past them."""
    total_q, H, E = q.shape
    total_k, Hkv, Ev = k.shape[0], k.shape[1], v.shape[-1]
    dq, big_dq = guarded((total_q, H, E), q.dtype)
    dk, big_dk = guarded((total_k, Hkv, E), q.dtype)
    dv, big_dv = guarded((total_k, Hkv, Ev), q.dtype)
    st = [*do.stride()[:2], *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2],
          lse.stride(0), glse.stride(0) if glse is not None else 0, *dq.stride()[:2],
          *dk.stride()[:2], *dv.stride()[:2]]
    emu.check(emu.lib.fa_emu_attention_varlen_bwd(
        DT[q.dtype], _p(do), _p(q), _p(k), _p(v), _p(out), _fp(lse), _fp(glse), _p(dq), _p(dk),
        _p(dv), _i64(st), _i32([len(cu_q) - 1, H, Hkv, max_q, max_k, E, Ev]), _p(cu_q), _p(cu_k),
        _i64([total_q, total_k]), ctypes.c_float(scale), ctypes.c_int64(wl), ctypes.c_int64(wr),
        int(bottom_right)))
    for big in (big_dq, big_dk, big_dv):
        check_guard(big)
    return dq, dk, dv


# backward: the forward cases, with grad_lse on some
VARLEN_BWD_CASES = {
    "bf16-gqa-causal-br-glse": ("bf16-gqa-causal-br", True),
    "fp16-window-tl-strided": ("fp16-window-tl-strided", False),
    "fp32-d40-gqa3-causal-tl-glse": ("fp32-d40-gqa3-causal-tl", True),
    "bf16-d256-causal-window-br": ("bf16-d256-causal-window-br", False),
    "fp16-d96-ev64-window-br-glse": ("fp16-d96-ev64-window-br", True),
}


@pytest.mark.parametrize("case", list(VARLEN_BWD_CASES))
def test_attention_varlen_bwd(emu, case):
    fwd_case, with_glse = VARLEN_BWD_CASES[case]
    cfg = VARLEN_CASES[fwd_case]
    causal, window, align = cfg[7], cfg[8], cfg[9]
    q, k, v, cu_q, cu_k, max_q, max_k = make_varlen_inputs(cfg)
    scale = 1.0 / math.sqrt(q.shape[-1])
    wl, wr, _ = window_args(0, 0, causal, window, align)
    br = align == "bottom_right"
    out, lse = attention_varlen_fwd(emu, q, k, v, cu_q, cu_k, max_q, max_k, scale, wl, wr, br)
    do = torch.randn_like(out)
    glse = torch.randn(lse.shape) if with_glse else None
    got = attention_varlen_bwd(emu, do, q, k, v, out, lse, glse, cu_q, cu_k, max_q, max_k, scale,
                               wl, wr, br)

    def grads(dtype):
        qq, kk, vv = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
        o, lse_ = reference.attention_varlen(qq, kk, vv, cu_q, cu_k, is_causal=causal,
                                             scale=scale, window=window, causal_alignment=align,
                                             return_lse=True)
        loss = (o * do.to(dtype)).sum()
        if glse is not None:
            loss = loss + (torch.where(torch.isfinite(lse_), lse_, 0.0) * glse.to(dtype)).sum()
        return torch.autograd.grad(loss, [qq, kk, vv])

    for name, g, h, low in zip(("dq", "dk", "dv"), got, grads(torch.float64), grads(q.dtype),
                               strict=True):
        assert_close_rule(g, h, low, factor=3.0, name=name)


# ---- decoding with a KV cache ----------------------------------------------------------------
KV_CASES = {
    # id: (B, H, Hkv, Lq, capacity, E, dtype, seqlens, new tokens, causal, SMs, leftpad)
    "bf16-decode-gqa": (2, 4, 2, 1, 100, 64, torch.bfloat16, [37, 99], True, True, SMS, None),
    "fp16-splits-lq3": (2, 8, 2, 3, 300, 128, torch.float16, [0, 250], True, True, SMS, None),
    "fp32-no-new": (1, 2, 2, 5, 64, 40, torch.float32, [20], False, True, SMS, None),
    "bf16-noncausal-splits": (3, 6, 3, 2, 500, 80, torch.bfloat16, [5, 300, 498], True, False, 8,
                              None),
    "bf16-d256-group16": (1, 16, 1, 2, 90, 256, torch.bfloat16, [60], True, True, SMS, None),
    # left-padded sequences: whole splits before the first token, a split starting inside one,
    # and a causal row that sees no key (leftpad past its last visible key)
    "bf16-leftpad-splits": (3, 4, 2, 2, 400, 64, torch.bfloat16, [10, 300, 390], True, True, 8,
                            [0, 170, 391]),
}
# rotary embedding: case id -> (rotary_dim, interleaved, float32 tables)
KV_ROTARY = {
    "bf16-rotary-leftpad-splits": ("bf16-leftpad-splits", 64, False, True),
    "fp16-rotary-interleaved-partial": ("fp16-splits-lq3", 96, True, False),
    "fp32-rotary-d40-partial": ("bf16-decode-gqa", 32, False, True),
}


def rotary_tables(max_pos, rotary_dim, dtype=torch.float32):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def attention_kvcache(emu, q, kc, vc, sl, lp, kn, vn, scale, causal, sms=SMS, rotary_cos=None,
                      rotary_sin=None, rotary_interleaved=False, window=(-1, -1),
                      return_lse=False, block_table=None):
    """The binding's launch on the emulator: -> (out, number of splits), or (out, lse, number of
    splits) with return_lse. kc/vc are updated in place (with block_table: the paged pool
    (num_blocks, Hkv, block_size, E)); the outputs are guarded against writes past their end."""
    B, H, Lq, E = q.shape
    Hkv, cap = kc.shape[1], kc.shape[2]
    out, big = guarded((B, H, Lq, E), q.dtype)
    lse, big_lse = guarded((B, H, Lq), torch.float32) if return_lse else (None, None)
    bt = block_table.contiguous() if block_table is not None else None
    ext = [kn.shape[2] if kn is not None else 0, window[0], window[1],
           *(lse.stride()[:2] if lse is not None else (0, 0)),
           *((bt.stride(0), bt.shape[1], kc.shape[0], kc.shape[2]) if bt is not None
             else (0, 0, 0, 0))]
    z = [0, 0, 0]
    st = [*q.stride()[:3], *kc.stride()[:3], *vc.stride()[:3],
          *(kn.stride()[:3] if kn is not None else z), *(vn.stride()[:3] if vn is not None else z),
          *out.stride()[:3]]
    if rotary_cos is not None:
        rargs = (_p(rotary_cos), _p(rotary_sin), _i64([*rotary_cos.stride(), *rotary_sin.stride()]),
                 rotary_cos.shape[0], rotary_cos.shape[1], int(rotary_interleaved),
                 int(rotary_cos.dtype == torch.float32))
    else:
        rargs = (_p(None), _p(None), _i64([0, 0, 0, 0]), 0, 0, 0, 1)
    splits = ctypes.c_int(0)
    emu.check(emu.lib.fa_emu_attention_kvcache(
        DT[q.dtype], _p(q), _p(kc), _p(vc), _p(sl), _p(lp), _p(kn), _p(vn), _p(out), _i64(st),
        _i32([B, H, Hkv, Lq, cap, E]), ctypes.c_float(scale), int(causal), sms,
        ctypes.byref(splits), *rargs, _fp(lse), _p(bt), _i64(ext)))
    check_guard(big)
    if return_lse:
        check_guard(big_lse)
        return out, lse, splits.value
    return out, splits.value


@pytest.mark.parametrize("case", list(KV_CASES) + list(KV_ROTARY))
def test_attention_kvcache(emu, case):
    rot = KV_ROTARY.get(case)
    B, H, Hkv, Lq, cap, E, dtype, seqlens, new, causal, sms, leftpad = KV_CASES[
        rot[0] if rot else case]
    if case == "fp32-rotary-d40-partial":
        dtype, E = torch.float32, 40
    q = torch.randn(B, H, Lq, E, dtype=dtype)
    kc = torch.randn(B, Hkv, cap, E, dtype=dtype)
    vc = torch.randn(B, Hkv, cap, E, dtype=dtype)
    kn = torch.randn(B, Hkv, Lq, E, dtype=dtype) if new else None
    vn = torch.randn(B, Hkv, Lq, E, dtype=dtype) if new else None
    sl = torch.tensor(seqlens, dtype=torch.int32)
    lp = None if leftpad is None else torch.tensor(leftpad, dtype=torch.int32)
    k0, v0 = kc.clone(), vc.clone()
    scale = 1.0 / math.sqrt(E)
    rkw = {}
    if rot:  # a strided cos table (a column slice), sin contiguous
        _, rdim, inter, f32 = rot
        cos, sin = rotary_tables(cap + 1, rdim, torch.float32 if f32 else dtype)
        cos = torch.cat([cos, cos], dim=1)[:, :rdim // 2]
        rkw = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=inter)
    q0, kn0 = q.clone(), None if kn is None else kn.clone()
    out, splits = attention_kvcache(emu, q, kc, vc, sl, lp, kn, vn, scale, causal, sms, **rkw)
    assert torch.equal(q, q0) and (kn is None or torch.equal(kn, kn0)), "inputs modified"
    k_ref, v_ref = k0.clone(), v0.clone()
    low = reference.attention_with_kvcache(q, k_ref, v_ref, sl, kn, vn, scale=scale, causal=causal,
                                           cache_leftpad=lp, **rkw)
    if rot:  # the rotation is computed in float32 by both: equal up to the rounding to dtype
        torch.testing.assert_close(kc, k_ref, atol=1e-6,
                                   rtol=2 ** -7 if dtype != torch.float32 else 1e-6)
        torch.testing.assert_close(vc, v_ref, atol=0, rtol=0)
    else:
        assert torch.equal(kc, k_ref) and torch.equal(vc, v_ref), "k_new/v_new written elsewhere"
    hi = reference.attention_with_kvcache(
        q.double(), k0.double(), v0.double(), sl, kn.double() if new else None,
        vn.double() if new else None, scale=scale, causal=causal, cache_leftpad=lp,
        **{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in rkw.items()})
    assert_close_rule(out, hi, low)
    if lp is not None:  # the row that sees no key is zero, not NaN
        assert torch.equal(out[2, :, 0], torch.zeros_like(out[2, :, 0]))
    if case in ("fp16-splits-lq3", "bf16-noncausal-splits", "bf16-leftpad-splits",
                "bf16-rotary-leftpad-splits"):
        assert splits > 1, "the split-K path was not exercised"


# the serving options: paged cache, window, lse, Lnew != Lq
KV_SERVING = {
    # id: (B, H, Hkv, Lq, Lnew, E, dtype, seqlens, leftpad, causal, window, block_size,
    #      max_blocks, SMs, rotary_dim)
    "bf16-paged16-decode-splits": (3, 4, 2, 1, 1, 64, torch.bfloat16, [5, 150, 400], None, True,
                                   (-1, -1), 16, 26, 8, 0),
    "fp16-paged48-lnew5-lq3-window": (2, 8, 2, 3, 5, 128, torch.float16, [0, 200], None, True,
                                      (37, -1), 48, 6, 8, 0),
    "fp32-paged32-nonew-window-noncausal": (2, 2, 1, 4, 0, 40, torch.float32, [70, 9], None,
                                            False, (5, 3), 32, 3, SMS, 0),
    "bf16-paged16-leftpad-rotary-lnew4-lq2": (3, 4, 2, 2, 4, 64, torch.bfloat16, [10, 300, 390],
                                             [0, 170, 391], True, (100, -1), 16, 25, 8, 64),
    "bf16-contiguous-lnew1-lq3-window-lse": (2, 4, 4, 3, 1, 256, torch.bfloat16, [60, 2], None,
                                             True, (20, 0), 0, 100, SMS, 0),
    "fp16-contiguous-lnew6-lq1-splits": (2, 4, 1, 1, 6, 64, torch.float16, [250, 31], None,
                                         True, (-1, -1), 0, 300, 8, 32),
    # window sides near 2^63 are unbounded in effect, not an overflow
    "bf16-paged16-huge-window-noncausal-splits": (2, 4, 2, 2, 3, 64, torch.bfloat16, [200, 7],
                                                  None, False, (2**63 - 1, 2**63 - 1), 16, 14, 8,
                                                  0),
}


@pytest.mark.parametrize("case", list(KV_SERVING))
def test_attention_kvcache_serving(emu, case):
    """The paged cache (shuffled blocks, NaN in every unused block and slot) against the
    contiguous cache with the same tokens, windows, lse and k_new/v_new of another length than
    q, all against the reference."""
    from tests.test_kv_cache_paged import gather, nan_unused, paged_copy

    (B, H, Hkv, Lq, Lnew, E, dtype, seqlens, leftpad, causal, window, bs, max_blocks, sms,
     rdim) = KV_SERVING[case]
    cap = max_blocks * (bs or 1)
    q = torch.randn(B, H, Lq, E, dtype=dtype)
    kc = nan_unused(torch.randn(B, Hkv, cap, E, dtype=dtype), seqlens, 0)
    vc = nan_unused(torch.randn(B, Hkv, cap, E, dtype=dtype), seqlens, 0)
    kn = torch.randn(B, Hkv, Lnew, E, dtype=dtype) if Lnew else None
    vn = torch.randn(B, Hkv, Lnew, E, dtype=dtype) if Lnew else None
    sl = torch.tensor(seqlens, dtype=torch.int32)
    lp = None if leftpad is None else torch.tensor(leftpad, dtype=torch.int32)
    rkw = {}
    if rdim:
        cos, sin = rotary_tables(cap + Lnew + 1, rdim)
        rkw = dict(rotary_cos=cos, rotary_sin=sin)
    scale = 1.0 / math.sqrt(E)
    # sides past any cache are the reference's unbounded window (its int64 positions would
    # overflow at i + 2^63 - 1)
    win = None if window == (-1, -1) or min(window) >= 2**62 else window
    k0, v0 = kc.clone(), vc.clone()
    out_c, lse_c, splits = attention_kvcache(emu, q, kc, vc, sl, lp, kn, vn, scale, causal, sms,
                                             window=window, return_lse=True, **rkw)
    if bs:
        pool_k, table = paged_copy(k0, bs, seed=3)
        pool_v, _ = paged_copy(v0, bs, seed=3)
        out, lse, splits_paged = attention_kvcache(emu, q, pool_k, pool_v, sl, lp, kn, vn, scale,
                                                   causal, sms, window=window, return_lse=True,
                                                   block_table=table, **rkw)
        assert splits_paged == splits
        # the appended tokens landed where the table says, the rest of the pool is untouched
        same = lambda a, b: torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))  # noqa: E731
        assert same(gather(pool_k, table), kc) and same(gather(pool_v, table), vc)
        used = torch.zeros(pool_k.shape[0], dtype=torch.bool)
        used[table.flatten().long()] = True
        assert bool(pool_k[~used].isnan().all()), "a block outside the table was written"
        # the same kernel on the same tokens: the paged gather changes no bit of the result
        assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    else:
        out, lse = out_c, lse_c
    k_ref, v_ref = k0.clone(), v0.clone()
    low, low_lse = reference.attention_with_kvcache(
        q, k_ref, v_ref, sl, kn, vn, scale=scale, causal=causal, cache_leftpad=lp, window=win,
        return_lse=True, **rkw)
    if rdim:
        torch.testing.assert_close(kc.nan_to_num(7.0), k_ref.nan_to_num(7.0), atol=1e-6,
                                   rtol=2 ** -7 if dtype != torch.float32 else 1e-6)
    else:
        assert torch.equal(kc.nan_to_num(7.0), k_ref.nan_to_num(7.0))
    assert torch.equal(vc.nan_to_num(7.0), v_ref.nan_to_num(7.0))
    d = lambda t: None if t is None else t.double()  # noqa: E731
    hi, hi_lse = reference.attention_with_kvcache(
        d(q), d(k0), d(v0), sl, d(kn), d(vn), scale=scale, causal=causal, cache_leftpad=lp,
        window=win, return_lse=True, **{k: d(v) for k, v in rkw.items()})
    assert_close_rule(out, hi, low)
    assert_close_rule(lse, hi_lse, low_lse.float(), name="lse")
    if sms == 8:
        assert splits > 1, "the split-K path was not exercised"


# ---- layer norm ------------------------------------------------------------------------------
LN_CASES = {
    # id: (M, N, dtype, rms, residual, weight, bias, float32 params, strided rows, SMs)
    "bf16-256": (7, 256, torch.bfloat16, False, False, True, True, False, False, SMS),
    "fp16-1000-residual": (5, 1000, torch.float16, False, True, True, True, False, False, SMS),
    "bf16-rms-1024-f32params": (9, 1024, torch.bfloat16, True, False, True, False, True, False,
                                SMS),
    "bf16-4096-residual": (3, 4096, torch.bfloat16, False, True, True, True, False, False, 2),
    "bf16-8192": (3, 8192, torch.bfloat16, False, True, True, True, False, False, SMS),
    "bf16-rms-16384": (2, 16384, torch.bfloat16, True, False, True, False, False, False, SMS),
    "fp16-24576-f32params": (2, 24576, torch.float16, False, False, True, True, True, False, SMS),
    "fp32-3000-strided": (4, 3000, torch.float32, False, False, True, True, False, True, SMS),
    "bf16-333-rms-residual": (6, 333, torch.bfloat16, True, True, True, False, False, False, SMS),
    "fp32-20000-generic": (2, 20000, torch.float32, False, False, True, True, False, False, SMS),
    "fp32-64-no-affine": (10, 64, torch.float32, False, False, False, False, False, False, SMS),
    "bf16-256-many-rows": (40, 256, torch.bfloat16, False, False, True, True, False, False, 2),
}


@pytest.mark.parametrize("case", list(LN_CASES))
def test_layer_norm(emu, case):
    M, N, dtype, rms, residual, affine, with_bias, pf32, strided, sms = LN_CASES[case]
    eps = 1e-6 if rms else 1e-5
    x = torch.randn(M, N + (5 if strided else 0), dtype=dtype)[:, :N]
    r = torch.randn(M, N, dtype=dtype) if residual else None
    pdt = torch.float32 if pf32 else dtype
    w = torch.randn(N, dtype=pdt) if affine else None
    b = torch.randn(N, dtype=pdt) if with_bias else None
    out, b_out = guarded((M, N), dtype)
    rout, b_rout = guarded((M, N), dtype) if residual else (None, None)
    mean, rstd = torch.empty(M), torch.empty(M)
    st = [x.stride(0), r.stride(0) if residual else 0, out.stride(0), N if residual else 0]
    emu.check(emu.lib.fa_emu_layer_norm_fwd(
        DT[dtype], _p(x), _p(r), _p(w), _p(b), _p(out), _p(rout), _fp(mean), _fp(rstd),
        ctypes.c_longlong(M), ctypes.c_longlong(N), _i64(st), ctypes.c_float(eps), int(rms),
        int(pf32)))
    check_guard(b_out)
    xs = x + r if residual else x
    if residual:
        check_guard(b_rout)
        assert torch.equal(rout, xs), "residual_out must be input + residual rounded to the dtype"

    def norm(xx, ww, bb, dt):
        if dt == torch.float64:
            if rms:
                return reference.rms_norm(xx, (N,), ww, eps)
            return reference.layer_norm(xx, (N,), ww, bb, eps)
        if rms:
            return F.rms_norm(xx, (N,), ww, eps)
        return F.layer_norm(xx, (N,), ww, bb, eps)

    cast = lambda t, dt: t.to(dt) if t is not None else None  # noqa: E731
    hi = norm(xs.double(), cast(w, torch.float64), cast(b, torch.float64), torch.float64)
    assert_close_rule(out, hi, norm(xs, cast(w, dtype), cast(b, dtype), dtype))

    # backward from the saved statistics
    g = torch.randn(M, N, dtype=dtype)
    gr = torch.randn(M, N, dtype=dtype) if residual else None
    xsaved = rout if residual else x
    gi, b_gi = guarded((M, N), dtype)
    gw = torch.full((N,), float("nan"), dtype=pdt) if affine else None
    gb = torch.full((N,), float("nan"), dtype=pdt) if with_bias else None
    st2 = [g.stride(0), gr.stride(0) if residual else 0, xsaved.stride(0), gi.stride(0)]
    emu.check(emu.lib.fa_emu_layer_norm_bwd(
        DT[dtype], _p(g), _p(gr), _p(xsaved), _p(w), _fp(mean), _fp(rstd), _p(gi), _p(gw), _p(gb),
        ctypes.c_longlong(M), ctypes.c_longlong(N), _i64(st2), int(rms), int(pf32), sms))
    check_guard(b_gi)

    def grads(dt):
        xx = xsaved.detach().to(dt).requires_grad_()
        ww = w.detach().to(dt).requires_grad_() if affine else None
        bb = b.detach().to(dt).requires_grad_() if with_bias else None
        ins = [t for t in (xx, ww, bb) if t is not None]
        gs = list(torch.autograd.grad((norm(xx, ww, bb, dt) * g.to(dt)).sum(), ins))
        if residual:
            gs[0] = gs[0] + gr.to(dt)
        return gs

    mine = [t for t in (gi, gw, gb) if t is not None]
    for name, got, h, low in zip(("grad_input", "grad_weight", "grad_bias"), mine,
                                 grads(torch.float64), grads(dtype), strict=False):
        assert_close_rule(got, h, low, factor=3.0, name=name)


# ---- int8 ------------------------------------------------------------------------------------
def quantize(emu, x):
    M, K = x.shape
    q, big_q = guarded((M, K), torch.int8)
    s, big_s = guarded((M,), torch.float32)
    emu.check(emu.lib.fa_emu_quantize_per_token(
        DT[x.dtype], _p(x), _p(q), _fp(s), ctypes.c_longlong(M), ctypes.c_longlong(K),
        ctypes.c_longlong(x.stride(0)), ctypes.c_longlong(q.stride(0))))
    check_guard(big_q)
    check_guard(big_s)
    return q, s


@pytest.mark.parametrize("dtype,M,K,strided", [
    (torch.bfloat16, 7, 256, False), (torch.float16, 5, 100, False), (torch.float32, 9, 64, False),
    (torch.float32, 3, 37, True), (torch.bfloat16, 4, 40, True)])
def test_quantize_per_token_bit_exact(emu, dtype, M, K, strided):
    x = torch.randn(M, K + (3 if strided else 0), dtype=dtype)[:, :K] * 3
    x[1] = 0  # a zero row: q = 0, scale = 0
    x[2, :4] = torch.tensor([1e-3, -2.5e-3, 0.0, 7.5e-4]).to(dtype)  # ties and tiny values
    if dtype == torch.float32:  # subnormal entries that quantize to non-zero values
        x[min(3, M - 1)] = 0
        x[min(3, M - 1), :4] = torch.tensor([4e-37, 1e-38, -6e-39, 2e-39])
    q, s = quantize(emu, x)
    q_ref, s_ref = reference.quantize_per_token(x)
    assert torch.equal(q, q_ref), f"{(q.int() - q_ref.int()).abs().max()} off"
    assert torch.equal(s, s_ref)


def int8_gemm(emu, a, b, sa=None, sb=None, bias=None, out_dtype=None, sms=SMS):
    M, K = a.shape
    N = b.shape[0]
    out, big = guarded((M, N), out_dtype or torch.int32)
    emu.check(emu.lib.fa_emu_int8_gemm(
        _p(a), _p(b), _fp(sa), _fp(sb), _fp(bias), _p(out), _i64([M, N, K]),
        _i64([a.stride(0), b.stride(0), out.stride(0)]), OUT_TYPE[out_dtype], sms))
    check_guard(big)
    return out


@pytest.mark.parametrize("M,N,K,sms,strided", [
    (5, 7, 64, SMS, False), (70, 130, 96, 1, False), (130, 140, 200, 1, True),
    (33, 17, 37, SMS, False), (3, 20, 0, SMS, False), (1, 64, 4096, SMS, False)])
def test_int8_gemm(emu, M, N, K, sms, strided):
    pad = 5 if strided else 0
    a = torch.randint(-127, 128, (M, K + pad), dtype=torch.int8)[:, :K]
    b = torch.randint(-127, 128, (N, K + pad), dtype=torch.int8)[:, :K]
    assert torch.equal(int8_gemm(emu, a, b, sms=sms), reference.int8_gemm(a, b))  # exact
    sa, sb, bias = (torch.rand(M) + 0.1) * 0.01, (torch.rand(N) + 0.1) * 0.01, torch.randn(N)
    for od in (torch.float32, torch.bfloat16, torch.float16):
        got = int8_gemm(emu, a, b, sa, sb, bias, od, sms=sms)
        hi = reference.int8_gemm(a, b, sa.double(), sb.double(), bias.double(),
                                 out_dtype=torch.float64)
        assert_close_rule(got, hi, reference.int8_gemm(a, b, sa, sb, bias, out_dtype=od))
    got = int8_gemm(emu, a, b, sa, None, None, torch.float32, sms=sms)
    hi = reference.int8_gemm(a, b, sa.double(), None, None, out_dtype=torch.float64)
    assert_close_rule(got, hi, reference.int8_gemm(a, b, sa, None, None, out_dtype=torch.float32))


@pytest.mark.parametrize("dtype,M,N,K", [
    (torch.bfloat16, 1, 33, 512), (torch.float16, 9, 20, 64), (torch.float32, 3, 17, 48),
    (torch.bfloat16, 2, 5, 37)])
def test_int8_weight_only_linear(emu, dtype, M, N, K):
    x = torch.randn(M, K, dtype=dtype)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    s, bias = torch.rand(N) * 0.02, torch.randn(N)
    out, big = guarded((M, N), dtype)
    emu.check(emu.lib.fa_emu_int8_weight_only(
        DT[dtype], _p(x), _p(w), _fp(s), _fp(bias), _p(out), _i64([M, N, K]),
        _i64([x.stride(0), w.stride(0), out.stride(0)])))
    check_guard(big)
    hi = (x.double() @ w.double().t()) * s.double() + bias.double()
    low = (x @ w.to(dtype).t()) * s.to(dtype) + bias.to(dtype)
    assert_close_rule(out, hi, low)
