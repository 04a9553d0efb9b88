"""After `make check-cuda-build` has built fastattn._C against a CUDA build of torch (no GPU
needed): the library loads and every op with a kernel in csrc/cuda is registered for the CUDA
dispatch key (a binding left out of the build, or one that fails to register, shows here).

    python tests/_check_cuda_build.py BUILD_LIB
"""

import glob
import importlib.util
import os
import re
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuda_ops() -> list[str]:
    """The ops of every TORCH_LIBRARY_IMPL(fastattn, CUDA, m) block in csrc/cuda."""
    ops = []
    for path in sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "*.cpp"))):
        text = open(path).read()
        for block in re.findall(r"TORCH_LIBRARY_IMPL\(fastattn,\s*CUDA,\s*m\)\s*\{(.*?)\n\}",
                                text, re.S):
            ops += re.findall(r'm\.impl\("(\w+)"', block)
    return ops


def main(build_lib: str) -> int:
    assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
    (lib,) = glob.glob(os.path.join(build_lib, "fastattn", "_C*.so"))
    spec = importlib.util.spec_from_file_location("fastattn._C", lib)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    ops = cuda_ops()
    assert len(ops) >= 8, f"found only {ops} in csrc/cuda"
    missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(
        f"fastattn::{op}", "CUDA")]
    cpu = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(
        f"fastattn::{op}", "CPU")]
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); {lib}")
    print(f"CUDA kernels registered: {[op for op in ops if op not in missing]}")
    if missing or cpu:
        print(f"FAILED: no CUDA kernel for {missing}; no CPU kernel for {cpu}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
