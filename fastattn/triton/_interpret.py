"""Triton's interpreter (``TRITON_INTERPRET=1``: every kernel runs in numpy, on CPU tensors):
whether it is in use, and the patches that make it compute what the compiled kernels compute.

Importing this module imports nothing from triton: the op layer asks :func:`interpret` on every
call, also where triton is not installed. Triton itself is patched only once a kernel module is
imported while the interpreter is in use (:func:`prepare`); compiled kernels leave it untouched.
"""

from __future__ import annotations

import os


def _read_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_interpreting = _read_env()


def interpret() -> bool:
    """True when Triton kernels run through the interpreter. TRITON_INTERPRET is read once (an
    environment lookup costs microseconds, and this is asked on every op call): call
    :func:`refresh` after changing it."""
    return _interpreting


def refresh() -> bool:
    """Re-read TRITON_INTERPRET; returns the new :func:`interpret`."""
    global _interpreting
    _interpreting = _read_env()
    return _interpreting


def prepare() -> None:
    """Called by each kernel module when it is imported. ``triton.jit`` decides at that moment,
    from TRITON_INTERPRET, whether the module's kernels are interpreted or compiled: take the
    same reading, and patch the interpreter before any of its kernels can run in it."""
    if refresh():
        _patch_interpreter()


_patched = False


def _patch_interpreter() -> None:
    global _patched
    if _patched:
        return
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:  # no interpreter here (it needs numpy): no kernel can run in it
        return
    _round_bf16_to_nearest_even(interpreter, np)
    _index_via_item(interpreter)
    _patched = True


def _round_bf16_to_nearest_even(interpreter, np) -> None:
    """Compiled kernels round float32 -> bfloat16 to nearest even (cvt.rn.bf16.f32), as torch
    does; Triton 3.6's interpreter truncates. That is a full bf16 ulp of error instead of half of
    one on every bf16 store and every P rounded for a bf16 product, enough alone to break the 2x
    accuracy rule of the tests. Every cast goes through ``InterpreterBuilder.cast_impl``, so
    rounding there serves every kernel, explicit ``.to`` and implicit store conversions alike."""
    import triton.language as tl

    builder = interpreter.InterpreterBuilder
    original = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            f = np.ascontiguousarray(src.data, dtype=np.float32)
            u = f.view(np.uint32)
            # add 0x7fff plus the lowest kept bit, then drop the low half: ties go to even
            out = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
            nan = np.isnan(f)
            out[nan] = ((u[nan] >> 16) | np.uint32(0x40)).astype(np.uint16)  # stay a (quiet) NaN
            return interpreter.TensorHandle(out, dst_type.scalar)
        return original(self, src, dst_type)

    builder.cast_impl = cast_impl


def _index_via_item(interpreter) -> None:
    """Triton 3.6's interpreter turns a scalar into a Python int with ``int(array)`` on a
    1-element 1-D array, which NumPy >= 2.4 rejects ("only 0-dimensional arrays can be converted
    to Python scalars"): every loop with a runtime bound (``range(lo, hi)``) would fail. Convert
    with ``.item()`` instead."""
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_lang_tensor
