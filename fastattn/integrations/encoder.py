"""Fused encoder layers for BERT-style ``transformers`` models (BERT, RoBERTa, XLM-R, ELECTRA:
sentence-transformers' encoders such as all-MiniLM-L6-v2).

``fastattn.convert`` gives each such layer (same object, same parameters, same state_dict) a
forward that, in inference (no gradient recording, eval mode), runs

    one GEMM for q/k/v -> fastattn attention on strided views of it (no head transposes copied)
    -> attention.output.dense -> residual add inside fastattn's LayerNorm -> intermediate.dense
    -> GELU in place -> output.dense -> residual add inside fastattn's LayerNorm

instead of transformers' separate projections, head reshapes, residual adds and LayerNorms. The
GEMMs run ``fastattn.linear`` (float weights: oneDNN's matmul on non-Intel CPUs, see
fastattn.ops.linear) or the layer's ``Int8Linear`` modules; the q/k/v weights are concatenated
once and the projections' own parameters become views into the concatenation, so the state_dict,
``load_state_dict`` (in place) and the modules a user holds stay as they were. ``.to()`` /
``.half()`` and ``load_state_dict(assign=True)`` fuse again.

With gradient recording, in train mode, or with what the fused path does not cover (a head mask,
attention weights asked for, cross-attention, a KV cache, relative position embeddings, a decoder
layer) the layer runs transformers' own forward.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from fastattn.integrations.decoder import (
    _fusable,
    _fused_projection,
    _linear_kind,
    _projection,
    fusable_layers,
)

__all__ = ["FUSED_ENCODER_FAMILIES", "fuse_encoder_layers"]

# encoder layers whose forward is exactly attention (self: query/key/value, scaled dot product
# with the additive mask; output: dense -> dropout -> LayerNorm(. + input)) -> intermediate (dense
# -> activation) -> output (dense -> dropout -> LayerNorm(. + attention output)) (transformers 4.57)
FUSED_ENCODER_FAMILIES = ("BertLayer", "RobertaLayer", "XLMRobertaLayer", "ElectraLayer",
                          "CamembertLayer")


class _Fused:
    """What a fused layer holds besides its modules (not registered: no state_dict entries)."""

    def __init__(self, layer: nn.Module):
        attn = layer.attention.self
        self.qkv = _fused_projection([attn.query, attn.key, attn.value])
        self.attn_out = _projection(layer.attention.output.dense)
        self.intermediate = _projection(layer.intermediate.dense)
        self.out = _projection(layer.output.dense)
        self.num_heads = attn.num_attention_heads
        self.head_dim = attn.attention_head_size
        act = layer.intermediate.intermediate_act_fn
        # GELU (erf) computed in place on the GEMM's output: one pass fewer over the widest
        # activation of the layer; any other activation runs as the model defines it
        self.gelu_inplace = (type(act).__name__ == "GELUActivation"
                             and getattr(act, "act", None) is nn.functional.gelu)
        self.act = act


def _add_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """norm(x + residual), the add inside fastattn's LayerNorm kernel when it is one."""
    import fastattn

    if isinstance(norm, fastattn.nn.LayerNorm):
        return norm(x, residual)[0]
    return norm(x + residual)


def _fused_forward(self, hidden_states, *args, **kwargs):
    base = self._fastattn_base
    fused = self.__dict__.get("_fastattn")
    bound = self._fastattn_signature.bind(self, hidden_states, *args, **kwargs)
    a = bound.arguments
    extra = a.get("kwargs", {})
    if (fused is None or torch.is_grad_enabled() or self.training
            or a.get("head_mask") is not None or a.get("output_attentions")
            or a.get("encoder_hidden_states") is not None
            or a.get("past_key_values") is not None or a.get("past_key_value") is not None
            or extra.get("past_key_value") is not None or extra.get("output_attentions")):
        return base.forward(self, hidden_states, *args, **kwargs)
    import fastattn

    h = hidden_states
    B, L, C = h.shape
    H, D = fused.num_heads, fused.head_dim
    qkv = fused.qkv(h).view(B, L, 3, H, D)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D) strided views
    ctx = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=a.get("attention_mask"))
    ctx = ctx.transpose(1, 2).reshape(B, L, H * D)  # a view: the kernels write token-major
    attn = _add_norm(self.attention.output.LayerNorm, fused.attn_out(ctx), h)
    inter = fused.intermediate(attn)
    if fused.gelu_inplace:
        inter = torch.ops.aten.gelu_(inter)
    else:
        inter = fused.act(inter)
    return (_add_norm(self.output.LayerNorm, fused.out(inter), attn),)


def _fused_apply(self, fn, recurse=True):
    # .to()/.half()/... give the projections new tensors: fuse again from them
    out = self._fastattn_base._apply(self, fn, recurse)
    if self.__dict__.get("_fastattn") is not None:
        self.__dict__["_fastattn"] = _Fused(self)
    return out


def _rebuild_fused(base: type, state: dict) -> nn.Module:
    cls = _fused_class(base)
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    obj.__dict__["_fastattn"] = _Fused(obj)
    return obj


def _reduce_fused(self, protocol):
    # pickle/deepcopy rebuild the generated class from its base (which pickles by name) and fuse
    # the copy's own projections again
    state = {k: v for k, v in self.__dict__.items() if k != "_fastattn"}
    return _rebuild_fused, (self._fastattn_base, state)


@functools.cache
def _fused_class(base: type) -> type:
    return type(base.__name__.replace("Layer", "FastattnLayer"), (base,), {
        "forward": _fused_forward, "_apply": _fused_apply, "__reduce_ex__": _reduce_fused,
        "_fastattn_base": base, "_fastattn_signature": inspect.signature(base.forward),
        "__module__": __name__,
        "__doc__": f"{base.__name__} whose inference forward runs fastattn's fused kernels.",
    })


def _reload_hook(module, incompatible_keys):
    # load_state_dict(assign=True) replaces the projections' tensors: fuse again
    if (module.__dict__.get("_fastattn") is not None
            and not module.attention.self.query.weight.is_meta):
        module.__dict__["_fastattn"] = _Fused(module)


def _why_not(layer: nn.Module) -> str | None:
    try:
        attn = layer.attention.self
        projections = [attn.query, attn.key, attn.value]
        dense = [layer.attention.output.dense, layer.intermediate.dense, layer.output.dense]
        norms = [layer.attention.output.LayerNorm, layer.output.LayerNorm]
    except AttributeError:
        return "not the BERT layer structure"
    if getattr(layer, "is_decoder", False) or getattr(layer, "add_cross_attention", False):
        return "a decoder layer (causal or cross-attention)"
    if getattr(attn, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type {attn.position_embedding_type!r} (relative scores)"
    if not _fusable(projections):
        return "query/key/value projections differ in type, dtype or bias"
    if any(_linear_kind(m) is None for m in dense):
        return "a dense projection that is neither nn.Linear nor Int8Linear"
    if not all(isinstance(n, nn.LayerNorm) or type(n).__name__ == "LayerNorm" for n in norms):
        return "its norms are not LayerNorms"
    if attn.num_attention_heads * attn.attention_head_size != attn.query.weight.shape[0]:
        return "heads x head size differ from the query projection's width"
    return None


def fuse_encoder_layers(model: nn.Module, allowed) -> tuple[list[str], list[tuple[str, str]]]:
    """Fuses every encoder layer of ``model`` whose class is in FUSED_ENCODER_FAMILIES and whose
    ``allowed(module, fqn)`` is True. Returns (fused fqns, [(fqn, why kept)])."""
    fused_fqns, kept = [], []
    for fqn, layer in list(fusable_layers(model, FUSED_ENCODER_FAMILIES, _why_not, allowed, kept)):
        layer.__class__ = _fused_class(type(layer))
        layer.__dict__["_fastattn"] = _Fused(layer)
        layer.register_load_state_dict_post_hook(_reload_hook)
        fused_fqns.append(fqn)
    return fused_fqns, kept
