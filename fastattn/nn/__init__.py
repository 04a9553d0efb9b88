"""Drop-in modules. Resolved lazily so that each family imports only what it needs."""

import importlib

_WHERE = {
    "MultiheadAttention": "fastattn.nn.attention",
    "LayerNorm": "fastattn.nn.norm",
    "RMSNorm": "fastattn.nn.norm",
    "Int8Linear": "fastattn.nn.linear",
    "Linear": "fastattn.nn.linear",
    "KVCache": "fastattn.nn.decoding",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'fastattn.nn' has no attribute {name!r}")
