"""Mamba blocks of ``transformers`` models (Mamba, Mamba2, FalconMamba): the residual add of each
block inside the next block's RMSNorm, the residual stream kept in float32 by the kernel.

A block computes ``norm(x) -> mixer -> x + mixer output``, with ``x`` promoted to float32 first when
the model keeps its residual stream in float32 (``config.residual_in_fp32``, Mamba's default). The
add of block i and the norm of block i+1 read and write the same stream, so ``fastattn.convert``
gives each such block (same object, parameters and state_dict) a forward that, in inference (no
gradient recording, eval mode, not under torch.compile: the hand-over is module state), ends
with one ``fastattn.rms_norm(mixer output, next norm's weight, residual=x,
residual_in_fp32=..., prenorm=True)`` call: the sum (float32 where the model keeps it
so, exactly the sum transformers computes) is returned as the block's output, and the next
block's normalised input is handed over with it. The next block takes the handed-over input only
when it is called with that very tensor (anything that changed the stream in between, a hook for
instance, makes it normalise its input itself). The last block, and a block whose next block
is not converted, add as transformers does.

The next block normalises the float32 sum where transformers first rounds it to the norm's dtype:
one rounding fewer, within the correctness rule. The norms themselves are fastattn RMSNorms
(``convert``'s norm swap, checked on a random input); a block whose norm was kept is not fused.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from fastattn.integrations.decoder import fusable_layers

__all__ = ["FUSED_MAMBA_FAMILIES", "fuse_mamba_blocks"]

FUSED_MAMBA_FAMILIES = ("MambaBlock", "Mamba2Block", "FalconMambaBlock")
_HANDOVER = "_fastattn_handover"  # (stream, normalised stream) from the previous block
_NEXT = "_fastattn_next"  # the next fused block of the stack, or None


def _fused_forward(self, hidden_states, cache_params=None, cache_position=None,
                   attention_mask=None):
    handed = self.__dict__.pop(_HANDOVER, None)
    if torch.is_grad_enabled() or self.training or torch.compiler.is_compiling():
        return self._fastattn_base.forward(self, hidden_states, cache_params=cache_params,
                                           cache_position=cache_position,
                                           attention_mask=attention_mask)
    import fastattn

    if handed is not None and handed[0] is hidden_states:
        residual, h = handed
    else:
        residual = hidden_states.to(torch.float32) if self.residual_in_fp32 else hidden_states
        h = self.norm(hidden_states.to(dtype=self.norm.weight.dtype))
    out = self.mixer(h, cache_params=cache_params, cache_position=cache_position,
                     attention_mask=attention_mask)
    nxt = self.__dict__.get(_NEXT)
    if nxt is None or out.dtype != nxt.norm.weight.dtype:
        return residual + out
    norm = nxt.norm
    h_next, stream = fastattn.rms_norm(
        out, norm.normalized_shape, norm.weight, norm.eps, residual=residual,
        residual_in_fp32=self.residual_in_fp32, prenorm=True, offset=norm.offset,
        backend=norm.backend)
    nxt.__dict__[_HANDOVER] = (stream, h_next)
    return stream


def _rebuild(base: type, state: dict) -> nn.Module:
    cls = _fused_class(base)
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    return obj


def _reduce(self, protocol):
    # pickle/deepcopy rebuild the generated class from its base (which pickles by name); a pending
    # hand-over is not copied
    return _rebuild, (self._fastattn_base,
                      {k: v for k, v in self.__dict__.items() if k != _HANDOVER})


@functools.cache
def _fused_class(base: type) -> type:
    return type(base.__name__.replace("Block", "FastattnBlock"), (base,), {
        "forward": _fused_forward, "__reduce_ex__": _reduce, "_fastattn_base": base,
        "__module__": __name__,
        "__doc__": f"{base.__name__} whose inference forward adds its residual inside the next "
                   "block's RMSNorm kernel.",
    })


def _why_not(block: nn.Module) -> str | None:
    import fastattn

    norm = getattr(block, "norm", None)
    if type(norm) is not fastattn.nn.RMSNorm or norm.residual_in_fp32:
        return "its norm was not converted to fastattn.nn.RMSNorm"
    if not isinstance(getattr(block, "mixer", None), nn.Module):
        return "no mixer module"
    return None


def fuse_mamba_blocks(model: nn.Module, allowed) -> tuple[list[str], list[tuple[str, str]]]:
    """Fuses every block of ``model`` whose class is in FUSED_MAMBA_FAMILIES and whose
    ``allowed(module, fqn)`` is True, each linked to the next block of its ``nn.ModuleList``.
    Returns (fused fqns, [(fqn, why kept)])."""
    kept: list = []
    chosen = dict(fusable_layers(model, FUSED_MAMBA_FAMILIES, _why_not, allowed, kept))
    fused = {id(block) for block in chosen.values()}
    for block in chosen.values():
        block.__class__ = _fused_class(type(block))
        block.__dict__[_NEXT] = None
    for stack in model.modules():
        if not isinstance(stack, nn.ModuleList):
            continue
        for block, nxt in zip(stack[:-1], stack[1:], strict=True):
            if id(block) in fused and id(nxt) in fused:
                block.__dict__[_NEXT] = nxt
    return list(chosen), kept
