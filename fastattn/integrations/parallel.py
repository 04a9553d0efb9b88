"""Parallel-residual blocks of ``transformers`` models whose attention and MLP each normalise the
same input with a LayerNorm of their own (GPT-NeoX with ``use_parallel_residual``, Falcon's new
decoder architecture with ``ln_attn`` / ``ln_mlp``): ``fastattn.convert`` links the two
(converted) norms so that the first call computes both outputs in one ``fastattn.layer_norm``
kernel call (``weight1`` / ``bias1``: one read of the input, both affines) and the second returns
the output handed over to it when it is called with that very tensor (any other input, or a
residual, is normalised as usual). Modules, parameters and state_dict are unchanged; gradients
flow through the fused call (its backward covers ``weight1`` / ``bias1``).
"""

from __future__ import annotations

from torch import nn

from fastattn.integrations.decoder import fusable_layers

__all__ = ["PARALLEL_NORMS", "pair_parallel_norms"]

# layer class -> (first norm, second norm, config flag that makes the block parallel or None)
PARALLEL_NORMS = {
    "GPTNeoXLayer": ("input_layernorm", "post_attention_layernorm", "use_parallel_residual"),
    "FalconDecoderLayer": ("ln_attn", "ln_mlp", None),
}


_SEQUENTIAL = "not a parallel-residual block"


def _why_not(layer: nn.Module) -> str | None:
    import fastattn

    first, second, flag = PARALLEL_NORMS[type(layer).__name__]
    if flag is not None and not getattr(layer, flag, False):
        return _SEQUENTIAL
    a, b = getattr(layer, first, None), getattr(layer, second, None)
    if type(a) is not fastattn.nn.LayerNorm or type(b) is not fastattn.nn.LayerNorm:
        return f"{first} / {second} are not both fastattn.nn.LayerNorm"
    same = (a.normalized_shape == b.normalized_shape and a.eps == b.eps and a.offset == b.offset
            and not a.residual_in_fp32 and not b.residual_in_fp32
            and a.weight is not None and b.weight is not None
            and (a.bias is None) == (b.bias is None) and a.weight.dtype == b.weight.dtype)
    return None if same else f"{first} and {second} differ in shape, eps, affine or dtype"


def pair_parallel_norms(model: nn.Module, allowed) -> tuple[list[str], list[tuple[str, str]]]:
    """Links the two norms of every parallel block of ``model`` (PARALLEL_NORMS) that
    ``allowed(module, fqn)`` allows. Returns (linked layers' fqns, [(fqn, why kept)])."""
    from fastattn.nn.norm import _PARTNER

    kept: list = []
    linked = []
    for fqn, layer in list(fusable_layers(model, tuple(PARALLEL_NORMS), _why_not, allowed, kept)):
        first, second, _ = PARALLEL_NORMS[type(layer).__name__]
        a = getattr(layer, first)
        if _PARTNER in a.__dict__:
            continue
        a.__dict__[_PARTNER] = getattr(layer, second)
        linked.append(fqn)
    # a sequential block (GPT-NeoX without the parallel residual) is not a candidate: not reported
    return linked, [(fqn, why) for fqn, why in kept if why != _SEQUENTIAL]
