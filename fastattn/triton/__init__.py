"""Triton kernels, one file per kernel family. Imported lazily by the op layer, so that
fastattn imports without triton installed."""


def _interpreter_numpy_compat() -> None:
    """Triton 3.6's interpreter turns a scalar into a Python int with ``int(array)`` on a
    1-element 1-D array, which NumPy >= 2.4 rejects ("only 0-dimensional arrays can be converted
    to Python scalars"): every loop with a runtime bound (``range(lo, hi)``) then fails under
    TRITON_INTERPRET=1. Convert with ``.item()`` instead; a no-op for compiled kernels."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # triton missing: the triton backend reports itself unavailable
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_index_via_item", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_lang_tensor._index_via_item = True
    interpreter._patch_lang_tensor = patch_lang_tensor


_interpreter_numpy_compat()
