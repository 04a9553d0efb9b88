"""Drop-in LayerNorm / RMSNorm modules on fastattn's fused kernels.

They subclass ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm``: same constructor, parameters,
state_dict keys, ``reset_parameters`` and ``isinstance`` behaviour (weight initialisation code
keyed on the torch classes keeps working). Only ``forward`` changes, and it takes an optional
``residual=`` for the fused residual add. Two keyword-only constructor options follow
FlashAttention's norms: ``offset`` (``norm(x) * (offset + weight)``: 1.0 is Gemma's RMSNorm, whose
weight is stored zero-centred) and ``residual_in_fp32`` (the running residual, returned by
``forward``, kept in float32 whatever the activations' dtype).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastattn.ops.layer_norm import layer_norm, rms_norm


def _share_state(cls, m: nn.Module, backend: str):
    new = cls.__new__(cls)
    # Shallow copies of the parameter/buffer/hook dicts: the tensors are shared (no copy: same
    # device, dtype and storage, so optimizers and tied weights keep working), the containers are
    # not (registering on one module must not change the other).
    new.__dict__.update({k: (copy.copy(v) if isinstance(v, dict) else v)
                         for k, v in m.__dict__.items()})
    new.backend = backend
    return new


# fastattn.integrations.parallel.pair_parallel_norms: a LayerNorm's partner (the other norm of
# the same input) and the output handed over to it
_PARTNER = "_fastattn_partner"
_HANDOVER = "_fastattn_handover"


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by :func:`fastattn.layer_norm`.

    Shapes: input (*, *normalized_shape) -> output of the same shape and dtype. With
    ``residual`` (input-shaped, same dtype) ``forward`` returns ``(out, input + residual)``, the
    sum computed once in the same pass.
    """

    # defaults for instances made by from_module, which share a torch module's __dict__
    offset: float = 0.0
    residual_in_fp32: bool = False

    def __init__(
        self,
        normalized_shape: int | list[int] | tuple[int, ...] | torch.Size,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        offset: float = 0.0,
        residual_in_fp32: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.backend = backend
        self.offset = float(offset)
        self.residual_in_fp32 = bool(residual_in_fp32)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None, *,
                quantize: str | None = None):
        """-> out, or ``(out, input + residual)`` when residual is given or residual_in_fp32.
        ``quantize="int8"``: out as (int8 rows, float32 per-row scale), the per-token
        quantization of the output for a W8A8 linear, computed by the norm's kernel."""
        if quantize is not None:
            return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                              residual=residual, offset=self.offset,
                              residual_in_fp32=self.residual_in_fp32, quantize=quantize,
                              backend=self.backend)
        if _PARTNER in self.__dict__ or _HANDOVER in self.__dict__:
            out = self._paired(input, residual)
            if out is not None:
                return out
        if self.offset or self.residual_in_fp32:
            return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                              residual=residual, offset=self.offset,
                              residual_in_fp32=self.residual_in_fp32,
                              prenorm=residual is not None or self.residual_in_fp32,
                              backend=self.backend)
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                          residual=residual, backend=self.backend)

    def _paired(self, input: torch.Tensor, residual: torch.Tensor | None):
        """Parallel blocks (GPT-NeoX, Falcon: two LayerNorms of the same input, one for the
        attention, one for the MLP; ``pair_parallel_norms`` links them): the first computes both
        outputs in one kernel call (``weight1``/``bias1``) and hands the second its output, which
        it returns when called with that very tensor. None: compute as usual (also under
        torch.compile, which traces the two norms separately)."""
        if torch.compiler.is_compiling():  # module state written in forward: eager only
            return None
        handed = self.__dict__.pop(_HANDOVER, None)
        if residual is not None:
            return None
        if handed is not None:
            return handed[1] if handed[0] is input else None
        partner = self.__dict__.get(_PARTNER)
        if partner is None:
            return None
        out, out1 = layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                               weight1=partner.weight, bias1=partner.bias, offset=self.offset,
                               backend=self.backend)
        partner.__dict__[_HANDOVER] = (input, out1)
        return out

    @classmethod
    def from_module(cls, m: nn.LayerNorm, *, backend: str = "auto") -> LayerNorm:
        """A fastattn LayerNorm computing what ``m`` computes, holding ``m``'s own parameters
        (same tensors: device, dtype and storage kept), train/eval mode and hooks.
        ``copy.deepcopy(m)`` first for an independent module."""
        if not isinstance(m, nn.LayerNorm):
            raise TypeError(f"m must be a torch.nn.LayerNorm, got {type(m).__name__}")
        return _share_state(cls, m, backend)

    def extra_repr(self) -> str:
        extra = f", offset={self.offset}" if self.offset else ""
        if self.residual_in_fp32:
            extra += ", residual_in_fp32=True"
        return f"{super().extra_repr()}{extra}, backend={self.backend!r}"


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` computed by :func:`fastattn.rms_norm` (eps=None means
    ``torch.finfo(input.dtype).eps``, as torch).

    Shapes: input (*, *normalized_shape) -> output of the same shape and dtype; with
    ``residual`` returns ``(out, input + residual)``.
    """

    # defaults for instances made by from_module, which share a torch module's __dict__
    offset: float = 0.0
    residual_in_fp32: bool = False

    def __init__(
        self,
        normalized_shape: int | list[int] | tuple[int, ...] | torch.Size,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        *,
        offset: float = 0.0,
        residual_in_fp32: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.backend = backend
        self.offset = float(offset)
        self.residual_in_fp32 = bool(residual_in_fp32)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None, *,
                quantize: str | None = None):
        """-> out, or ``(out, input + residual)`` when residual is given or residual_in_fp32.
        ``quantize="int8"``: out as (int8 rows, float32 per-row scale), the per-token
        quantization of the output for a W8A8 linear, computed by the norm's kernel."""
        if quantize is not None:
            return rms_norm(input, self.normalized_shape, self.weight, self.eps,
                        residual=residual, offset=self.offset,
                        residual_in_fp32=self.residual_in_fp32, quantize=quantize,
                        backend=self.backend)
        if self.offset or self.residual_in_fp32:
            return rms_norm(input, self.normalized_shape, self.weight, self.eps,
                            residual=residual, offset=self.offset,
                            residual_in_fp32=self.residual_in_fp32,
                            prenorm=residual is not None or self.residual_in_fp32,
                            backend=self.backend)
        return rms_norm(input, self.normalized_shape, self.weight, self.eps, residual=residual,
                        backend=self.backend)

    @classmethod
    def from_module(cls, m: nn.RMSNorm, *, backend: str = "auto") -> RMSNorm:
        """A fastattn RMSNorm computing what ``m`` computes, holding ``m``'s own parameters
        (same tensors), train/eval mode and hooks. ``copy.deepcopy(m)`` first for an
        independent module."""
        if not isinstance(m, nn.RMSNorm):
            raise TypeError(f"m must be a torch.nn.RMSNorm, got {type(m).__name__}")
        return _share_state(cls, m, backend)

    def extra_repr(self) -> str:
        extra = f", offset={self.offset}" if self.offset else ""
        if self.residual_in_fp32:
            extra += ", residual_in_fp32=True"
        return f"{super().extra_repr()}{extra}, backend={self.backend!r}"
