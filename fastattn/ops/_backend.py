"""The op families' shared dispatch: dtype tables, backend availability and choice, the C++
extension's fast entry points and argument checks, and the registration of fakes and autograd.

A backend is one of ``"triton"``, ``"cuda"``, ``"cpu"``, ``"reference"``. ``backend="auto"`` walks
the preference list of the op for the tensor's device and takes the first backend that is
available *and* supports the call (each family's ``supports(backend, device, key)`` says why
not, xformers-style); if none does it falls back to ``"reference"`` and warns once per
(op, reason). An explicitly requested backend that is unavailable or does not support the call
raises instead: nothing is swapped silently. The choice depends only on static properties of
the call (``key``), so it is cached per key (:func:`pick`).

Per-call cost: a public function first offers the call to the extension's entry point
(``NATIVE``), which checks the arguments, runs the CPU kernel through the dispatcher and
returns its result, or returns None when the call is not the CPU kernel's; only then does the
Python path (:func:`pick`, the Triton ops, the reference) run. Under ``torch.compile`` the
Python path is traced instead (the op is then one node of the graph).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable

import torch

from fastattn.triton._interpret import interpret as triton_interpret  # noqa: F401

log = logging.getLogger("fastattn")

BACKENDS = ("triton", "cuda", "cpu", "reference")

# the float dtypes the kernels take; float64 runs on the reference only
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# "auto" preference per op and device type. Ops not listed use _DEFAULT_ORDER.
_DEFAULT_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}
AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {}
# public op name -> the C++ op whose kernels decide whether cpu/cuda are available for it
OPS: dict[str, str | None] = {}


def register_op(name: str, cpp_op: str | None, auto_order: dict[str, tuple[str, ...]] | None = None):
    """Called once by each op family at import to appear in fastattn.backends()."""
    OPS[name] = cpp_op
    if auto_order is not None:
        AUTO_ORDER[name] = auto_order


@functools.cache
def _load_extension() -> tuple[bool, str]:
    try:
        importlib.import_module("fastattn._C")
    except ImportError as e:  # not built: the cpu/cuda backends are then unavailable
        return False, f"fastattn._C is not built ({e})"
    return True, ""


def _native_module():
    ok, _ = _load_extension()
    return importlib.import_module("fastattn._C") if ok else None


def check_backend(backend) -> None:
    if not isinstance(backend, str) or backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


# True when a call may take the extension's fast entry point (NATIVE): the extension is built, the
# mode is eager (torch.compile traces the Python path, whose ops it can put in a graph) and the
# backend is one the entry point may run
def fast_path(backend: str) -> bool:
    return ((backend == "auto" or backend == "cpu") and NATIVE is not None
            and not torch.compiler.is_compiling())


@functools.cache
def _load_triton() -> tuple[bool, str]:
    try:
        importlib.import_module("triton")
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    return True, ""


def extension_has_kernel(op: str, dispatch_key: str) -> bool:
    ok, _ = _load_extension()
    if not ok:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{op}", dispatch_key)


@torch.compiler.assume_constant_result  # an import probe: constant while tracing, not traced
def availability(backend: str, device_type: str, cpp_op: str | None = None) -> str | None:
    """None if ``backend`` can run on ``device_type`` here, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "triton":
        ok, why = _load_triton()
        if not ok:
            return why
        if device_type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device"
        if device_type == "cpu":
            return None if triton_interpret() else "CPU tensors need TRITON_INTERPRET=1"
        return f"device type {device_type!r}"
    if backend in ("cpu", "cuda"):
        if backend != device_type:
            return f"the {backend} backend takes {backend} tensors, got {device_type} tensors"
        ok, why = _load_extension()
        if not ok:
            return why
        key = "CPU" if backend == "cpu" else "CUDA"
        if cpp_op is not None and not extension_has_kernel(cpp_op, key):
            return f"fastattn._C has no {key} kernel for {cpp_op}"
        return None
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


def _library_dirs() -> tuple[str, ...]:
    """Folders whose frames are not the user's: fastattn's, torch's (nn.Module.__call__,
    torch.compile) and transformers' (a model's forward, generate)."""
    dirs = []
    for name in ("fastattn", "torch", "transformers"):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__file__", None):
            dirs.append(os.path.dirname(os.path.abspath(mod.__file__)) + os.sep)
    return tuple(dirs)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by the caller of this function point at the
    user's line: the first frame outside fastattn, torch and transformers (the number of frames
    in between depends on the entry point: a public function, a module's forward, convert)."""
    dirs = _library_dirs()
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(dirs):
        frame = frame.f_back
        level += 1
    return level


@functools.cache
def _warn_fallback(op: str, reason: str) -> None:
    warnings.warn(
        f"fastattn.{op}: no fast backend supports this call ({reason}); "
        "using the pure-PyTorch reference implementation",
        stacklevel=user_stacklevel(),
    )


def choose(
    op: str,
    device: torch.device,
    backend: str,
    supports: Callable[[str], str | None] | None = None,
    cpp_op: str | None = None,
) -> str:
    """Pick the backend for one call.

    ``supports(backend)`` returns None when the kernel handles this particular call (dtype,
    options...) or a reason why not.
    """
    check_backend(backend)
    if backend != "auto":
        why = availability(backend, device.type, cpp_op)
        if why is None and supports is not None and backend != "reference":
            why = supports(backend)
        if why is not None:
            raise RuntimeError(f"fastattn.{op}: backend={backend!r} cannot run this call: {why}")
        return backend
    reasons = []
    order = AUTO_ORDER.get(op, _DEFAULT_ORDER).get(device.type, ())
    for cand in order:
        why = availability(cand, device.type, cpp_op)
        if why is None and supports is not None:
            why = supports(cand)
        if why is None:
            log.debug("fastattn.%s: backend=auto picked %r on %s", op, cand, device.type)
            return cand
        reasons.append(f"{cand}: {why}")
    reason = "; ".join(reasons) if reasons else f"no fast backend for {device.type} tensors"
    _warn_fallback(op, reason)
    log.debug("fastattn.%s: backend=auto fell back to 'reference' (%s)", op, reason)
    return "reference"


_CHOICES: dict = {}


@torch.compiler.assume_constant_result
def pick(op: str, device: torch.device, backend: str, key: tuple,
         supports: Callable[[str, torch.device, tuple], str | None]) -> str:
    """The backend of one call: :func:`choose` with ``supports(backend, device, key)``, cached
    per (op, device, backend, key). ``key`` holds the static properties of the call that
    ``supports`` reads (dtypes, head dim...). Under torch.compile it runs once while tracing (it
    imports modules and reads dispatcher tables, which dynamo cannot trace) and the answer is a
    constant of the graph."""
    ck = (op, device, backend, key, triton_interpret())
    chosen = _CHOICES.get(ck)
    if chosen is None:
        chosen = choose(op, device, backend, lambda b: supports(b, device, key), OPS.get(op))
        _CHOICES[ck] = chosen
    return chosen


def register_family(fakes: dict[str, Callable], autograd: dict[str, tuple[Callable, Callable]],
                    triton_ops: tuple[str, ...]) -> None:
    """Registers a family's fake functions (for its C++ op ``fastattn::NAME`` when the extension
    has it, and for the Triton custom op ``fastattn::triton_NAME``) and the Python autograd of its
    Triton ops: ``autograd[NAME] = (backward, setup_context)``. The C++ ops' autograd is in
    csrc/autograd.cpp."""
    has_cpp = _load_extension()[0]
    for name, fake in fakes.items():
        if name in triton_ops:
            torch.library.register_fake(f"fastattn::triton_{name}")(fake)
        if has_cpp and hasattr(torch.ops.fastattn, name):
            torch.library.register_fake(f"fastattn::{name}")(fake)
    for name, (backward, setup_context) in autograd.items():
        torch.library.register_autograd(f"fastattn::triton_{name}", backward,
                                        setup_context=setup_context)


def backends() -> dict:
    """What is available on this machine and what ``backend="auto"`` picks per op and device."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    avail = {}
    for b in BACKENDS:
        avail[b] = {d: availability(b, d) is None for d in devices}
    reasons = {}
    for b in BACKENDS:
        for d in devices:
            why = availability(b, d)
            if why is not None:
                reasons[f"{b}/{d}"] = why
    auto = {}
    for op, cpp_op in OPS.items():
        auto[op] = {}
        for d in devices:
            pick = "reference"
            for cand in AUTO_ORDER.get(op, _DEFAULT_ORDER).get(d, ()):
                if availability(cand, d, cpp_op) is None:
                    pick = cand
                    break
            auto[op][d] = pick
    return {
        "available": avail,
        "unavailable_reasons": reasons,
        "auto": auto,
        "triton_interpret": triton_interpret(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


# the extension module (fast entry points and argument checks), or None when it is not built
NATIVE = _native_module()
