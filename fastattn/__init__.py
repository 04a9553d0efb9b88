"""fastattn: fused attention, LayerNorm/RMSNorm, SiLU-and-mul and int8 GEMM kernels for PyTorch
Transformers.

Importing never fails when the C++ extension (fastattn._C) or triton is missing: those backends
are then reported unavailable by ``fastattn.backends()`` and ``backend="auto"`` skips them.
"""

from fastattn import reference  # noqa: F401
from fastattn.ops import backends
from fastattn.ops.activation import silu_mul
from fastattn.ops.attention import (
    attention_varlen,
    attention_with_kvcache,
    scaled_dot_product_attention,
)
from fastattn.ops.int8 import (
    int8_gemm,
    int8_linear,
    int8_weight_only_linear,
    quantize_per_channel,
    quantize_per_token,
)
from fastattn.ops.layer_norm import layer_norm, rms_norm
from fastattn.ops.linear import linear

__version__ = "0.1.0"

__all__ = [
    "attention_varlen",
    "attention_with_kvcache",
    "backends",
    "int8_gemm",
    "int8_linear",
    "int8_weight_only_linear",
    "layer_norm",
    "linear",
    "quantize_per_channel",
    "quantize_per_token",
    "reference",
    "rms_norm",
    "scaled_dot_product_attention",
    "silu_mul",
]

_LAZY = {"nn": "fastattn.nn", "integrations": "fastattn.integrations",
         "smoothquant": "fastattn.smoothquant", "checkpoint": "fastattn.checkpoint"}


def __getattr__(name):
    import importlib

    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    if name == "convert":
        return importlib.import_module("fastattn.convert").convert
    if name == "load_converted":
        return importlib.import_module("fastattn.checkpoint").load_converted
    raise AttributeError(f"module 'fastattn' has no attribute {name!r}")
