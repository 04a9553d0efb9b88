"""Builds fastattn._C: the C++ CPU kernels always, the CUDA kernels when this torch is a CUDA
build and an nvcc is found (decided from torch.version.cuda and the toolkit, never from whether a
GPU happens to be visible, so a GPU-less build box still builds them)."""

import glob
import os
import shutil

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _with_cuda() -> bool:
    if os.environ.get("FASTATTN_SKIP_CUDA_BUILD", "0") == "1":
        return False
    return torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc"))


def _default_arch_list() -> None:
    """torch's extension builder takes the architectures from TORCH_CUDA_ARCH_LIST, else from
    the visible GPUs; with neither it stops with an IndexError. A GPU-less build box builds
    for the targets of this package: A100 (8.0) and H100/H200 (9.0a, for wgmma)."""
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a"


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fvisibility=hidden"]
    link = ["-fopenmp"]
    if os.environ.get("FASTATTN_SANITIZE") == "1":  # `make test-asan`
        cxx = ["-O1", "-g", "-std=c++20", "-fopenmp", "-fno-omit-frame-pointer",
               "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
        link += ["-fsanitize=address,undefined"]
    if not _with_cuda():
        return CppExtension("fastattn._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=link)
    _default_arch_list()
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "-std=c++20", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo"]
    return CUDAExtension("fastattn._C", sources, define_macros=[("FASTATTN_WITH_CUDA", None)],
                         extra_compile_args={"cxx": cxx + ["-DFASTATTN_WITH_CUDA"], "nvcc": nvcc},
                         extra_link_args=link)


setup(
    name="fastattn",
    packages=find_packages(include=["fastattn", "fastattn.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
